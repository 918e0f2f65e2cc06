"""The harness's architecture: registries as the one place to add things, one loop for every run.

* A toy transform, model and data task, each registered in one place, show up
  where they should and train through `stn_jax.paper.train.train_and_evaluate`.
* A toy second objective trains through the same loop and evaluation reports
  its metrics.
* A BatchNorm model: its batch statistics are trained, checkpointed, used by
  evaluation and survive a resume bit for bit.
* Every variant of every config file resolves and builds its model abstractly;
  the ``tiny`` variant of each family trains a step, and evaluates on 4
  (forced CPU) devices.

Every registration is undone after its test (the ``registered`` fixture).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from configs import colocalisation, distorted_mnist, mnist_3d, mnist_addition
from configs.common import family_choices
from stn_jax import TRANSFORMS, affine_grid, warp
from stn_jax.layers import SpatialTransformer
from stn_jax.paper import (
    checkpoints,
    evaluation,
    models as models_lib,
    objectives as objectives_lib,
    train as train_lib,
    train_state,
)
from stn_jax.paper.config import resolve
from stn_jax.paper.data import TASKS, tasks as tasks_lib
from stn_jax.paper.models import MODELS, ModelSpec, PaperModel, check_transform
from stn_jax.paper.objectives import OBJECTIVES, Objective
from stn_jax.transforms import Transform

# ----------------------------------------------------------------------------
# Registering and unregistering.
# ----------------------------------------------------------------------------


class Registrations:
    """Adds entries to the registries (each in its one place) and remembers them for removal."""

    def __init__(self):
        self.added: list[tuple[dict, str]] = []

    def transform(self, t: Transform) -> Transform:
        assert t.name not in TRANSFORMS
        TRANSFORMS[t.name] = t  # a transform is one entry in stn_jax.TRANSFORMS
        self.added.append((TRANSFORMS, t.name))
        return t

    def model(self, spec: ModelSpec) -> ModelSpec:
        models_lib.register(spec)
        self.added.append((MODELS._entries, spec.name))
        return spec

    def task(self, task: tasks_lib.DataTask) -> tasks_lib.DataTask:
        tasks_lib.register(task)
        self.added.append((TASKS._entries, task.name))
        return task

    def objective(self, cls: type[Objective]) -> type[Objective]:
        objectives_lib.register(cls)
        self.added.append((OBJECTIVES._entries, cls.name))
        return cls


def _names():
    return tuple(TRANSFORMS), MODELS.names(), TASKS.names(), OBJECTIVES.names()


@pytest.fixture
def registered():
    """`Registrations` for this test; every entry is deleted from its registry afterwards."""
    before = _names()
    reg = Registrations()
    yield reg
    for registry, name in reversed(reg.added):
        registry.pop(name, None)
    assert _names() == before


# ----------------------------------------------------------------------------
# The toys.
# ----------------------------------------------------------------------------


def shift_to_affine(params):
    """``(..., 2)`` translation ``(t_x, t_y)`` -> the affine ``[[1, 0, t_x], [0, 1, t_y]]``."""
    params = jnp.asarray(params)
    one, zero = jnp.ones_like(params[..., 0]), jnp.zeros_like(params[..., 0])
    return jnp.stack([jnp.stack([one, zero, params[..., 0]], -1), jnp.stack([zero, one, params[..., 1]], -1)], -2)


SHIFT = Transform("shift", 2, np.zeros(2, np.float32), 2,
                  lambda p, size, align_corners: affine_grid(shift_to_affine(p), size, align_corners), "Shift", (0, 1))


class ToyDataset:
    """Three classes of bright shapes (a horizontal bar, a vertical bar, a square) at random places on noise.

    The data-set interface of `stn_jax.paper.data.tasks`, held in memory: a
    training batch is a pure function of ``(seed, step)``, each process takes
    its rows, and the test set is fixed by ``test_seed``.
    """

    num_classes = 3

    def __init__(self, options, *, seed, global_batch_size, process_index, process_count, cache_dir):
        del cache_dir
        self.options = dict(options)
        size = int(options["size"])
        self.image_shape = (size, size, 1)
        self.element_spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                             "label": jax.ShapeDtypeStruct((), jnp.int32)}
        self.seed, self.global_batch_size = int(seed), int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.first = process_index * self.local_batch_size
        self.test_size = int(options["test_size"])
        self._test = self._make(np.random.default_rng([int(options["test_seed"]), 1]), self.test_size)

    def _make(self, rng, n):
        size = self.image_shape[0]
        labels = rng.integers(0, 3, n).astype(np.int32)
        images = (self.options["noise"] * rng.random((n,) + self.image_shape)).astype(np.float32)
        shapes = {0: (2, 6), 1: (6, 2), 2: (4, 4)}  # (rows, cols) of each class's shape
        for i, label in enumerate(labels):
            h, w = shapes[int(label)]
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            images[i, y:y + h, x:x + w] = 1.0
        return {"image": images, "label": labels}

    def train_batch(self, step):
        batch = self._make(np.random.default_rng([self.seed, int(step)]), self.global_batch_size)
        return {k: v[self.first:self.first + self.local_batch_size] for k, v in batch.items()}

    def test_examples(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self._test.items()}


def _toy_problems(options):
    return [] if options["size"] >= 8 else [f"size must be >= 8, got {options['size']}"]


TOY_TASK = tasks_lib.DataTask("toy", "Toy shapes", {"size": 12, "noise": 0.2, "test_size": 40, "test_seed": 7},
                              ToyDataset, _toy_problems, family="toy")


class ToyHead(nnx.Module):
    """flatten -> FC(width) -> ReLU -> FC(num_classes)."""

    def __init__(self, input_shape, width, num_classes, *, rngs):
        self.hidden = nnx.Linear(int(np.prod(input_shape)), width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


class ToyBNBody(nnx.Module):
    """conv 3x3 -> BatchNorm -> ReLU -> FC(num_classes), channels last."""

    def __init__(self, input_shape, num_classes, *, momentum, rngs):
        self.conv = nnx.Conv(input_shape[-1], 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=momentum, rngs=rngs)
        self.out = nnx.Linear(int(np.prod(input_shape[:-1])) * 4, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv(x)))
        return self.out(x.reshape(x.shape[0], -1))


def _toy_st_build(input_shape, num_classes, transform, rngs, *, hidden, width):
    st = SpatialTransformer(input_shape, transform, localisation={"kind": "fc", "hidden": (hidden,)}, rngs=rngs)
    return PaperModel([st, ToyHead(input_shape, width, num_classes, rngs=rngs)], model_name="toy_st",
                      display_name=MODELS.get("toy_st").display_name(transform), transform=transform, width=width,
                      input_shape=tuple(input_shape), num_classes=num_classes, summary="toy ST -> FC")


def _toy_bn_build(input_shape, num_classes, transform, rngs, *, momentum):
    st = SpatialTransformer(input_shape, transform, localisation={"kind": "fc", "hidden": (8,)}, rngs=rngs)
    body = ToyBNBody(input_shape, num_classes, momentum=momentum, rngs=rngs)
    return PaperModel([st, body], model_name="toy_bn", display_name="Toy-BN", transform=transform, width=None,
                      input_shape=tuple(input_shape), num_classes=num_classes, summary="toy ST -> conv -> BN -> FC")


def toy_config(model: str, transform: str = "", steps: int = 6, objective: dict | None = None, **options):
    return ml_collections.ConfigDict({
        "seed": 0, "batch_size": 8, "total_steps": steps, "log_every": 2, "eval_every": steps,
        "checkpoint_every": 4, "eval_batch_size": 16,
        "optimizer": {"learning_rate": 0.05},
        "model": {"name": model, "transform": transform, "options": options},
        "data": {"task": "toy"},
        "objective": objective or {"name": "classification"},
    })


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def restored(config, workdir: Path):
    """The run of ``config`` (resolved) and its newest checkpoint restored into a `TrainState`."""
    run = evaluation.open_run(resolve(config), Path(workdir))
    manager = checkpoints.checkpoint_manager(Path(workdir), 3, create=False)
    return run, checkpoints.restore_latest(run, manager, run.setup.state)


# ----------------------------------------------------------------------------
# a. A transform, a model and a data task: one place each.
# ----------------------------------------------------------------------------


def test_toy_transform_model_and_task_are_one_registration_each(registered, tmp_path):
    registered.transform(SHIFT)
    spec = registered.model(ModelSpec("toy_st", _toy_st_build, {"hidden": 8, "width": 16},
                                      models_lib.transforms_with_dims(2), "Toy-ST {t}", ("toy",)))
    registered.task(TOY_TASK)

    # The transform: in the library's registry, so the modules and the warp accept it.
    assert "shift" in models_lib.transforms_with_dims(2) and "shift" not in models_lib.transforms_with_dims(3)
    x = jnp.asarray(np.random.default_rng(0).random((2, 12, 12, 1)), jnp.float32)
    moved = warp(x, jnp.array([[2 / 12, 0.0]] * 2), transform="shift")  # reads 1 pixel to the right
    np.testing.assert_allclose(moved[:, :, :-1], x[:, :, 1:], atol=1e-5)
    # The model: accepts the new transform by name, refuses others listing its choices.
    assert "toy_st" in MODELS and check_transform(spec, "shift") == "shift"
    assert spec.display_name("shift") == "Toy-ST Shift"
    with pytest.raises(ValueError, match=r"needs transform to be one of \[.*'shift'\], got 'spiral'"):
        check_transform(spec, "spiral")
    # The paper's transformer models take every 2-D transform, including one registered after them.
    for name in ("st_fcn", "st_cnn", "add_2st_fcn", "svhn_st_single"):
        assert check_transform(MODELS.get(name), "shift") == "shift"
    assert "shift" not in MODELS.get("st3d").transforms
    assert models_lib.model_options("toy_st") == {"hidden": 8, "width": 16}
    # The task: the configs' choices, `resolve` and its checks read it from the registry.
    assert family_choices("toy") == (("toy",), ("toy_st",))
    config = toy_config("toy_st", "shift")
    r = resolve(config)
    assert r.data.to_dict() == {"task": "toy", "size": 12, "noise": 0.2, "test_size": 40, "test_seed": 7,
                                "test_npz": ""}  # every task takes an evaluation file (tasks.EVALUATION_OPTIONS)
    assert r.model.options.to_dict() == {"hidden": 8, "width": 16} and r.model.transform == "shift"
    with pytest.raises(ValueError, match=r"config.data.canvas_size is not an option of data task 'toy'; its "
                                         r"options are noise, size, task, test_npz, test_seed, test_size"):
        resolve(dict(config.to_dict(), data={"task": "toy", "canvas_size": 3}))
    with pytest.raises(ValueError, match=r"config.data \(task 'toy'\): size must be >= 8, got 4"):
        resolve(dict(config.to_dict(), data={"task": "toy", "size": 4}))

    # One tiny run through the training loop.
    result = train_lib.train_and_evaluate(config, tmp_path)
    assert set(result) == {"error", "loss"} and 0 <= result["error"] <= 1 and np.isfinite(result["loss"])
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged if "loss" in m] == [2, 4, 6]
    assert "theta/0/1/mean" in logged[0] and "theta/0/2/mean" not in logged[0]  # two shift parameters
    assert [m["test_error"] for m in logged if "test_error" in m] == [result["error"]]
    assert (tmp_path / "images" / "transformer_step0000006.png").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["transform"] == "shift" and saved["data"]["size"] == 12
    _, state = restored(config, tmp_path)
    assert int(state.step) == 6 and jax.tree.leaves(state.params["loc"])


# ----------------------------------------------------------------------------
# b. A second objective.
# ----------------------------------------------------------------------------


class SoftmaxMSE(Objective):
    """``weight`` x the squared distance between the softmax and the one-hot label (summed over classes)."""

    name = "toy_mse"
    headline = "mse"
    pictures = False
    defaults = {"weight": 1.0}

    @staticmethod
    def _per_example(logits, labels):
        return ((jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])) ** 2).sum(-1)

    def loss(self, model, batch):
        per = self._per_example(model(batch["image"]), batch["label"])
        return self.options["weight"] * per.mean(), {"mse": per.mean()}

    def eval_sums(self, model, batch):
        per = self._per_example(model(batch["image"]), batch["label"])
        return {"squared": (per * batch["mask"]).sum(), "count": batch["mask"].sum()}

    def summarize(self, sums):
        mse = sums["squared"] / max(sums["count"], 1.0)
        return {"mse": mse, "loss": self.options["weight"] * mse}


def test_a_second_objective_trains_and_evaluates_through_the_same_loop(registered, tmp_path):
    registered.task(TOY_TASK)
    registered.model(ModelSpec("toy_st", _toy_st_build, {"hidden": 8, "width": 16}, ("affine",), "Toy-ST {t}",
                               ("toy",)))
    registered.objective(SoftmaxMSE)
    config = toy_config("toy_st", objective={"name": "toy_mse", "weight": 2.0})
    assert resolve(toy_config("toy_st", objective={"name": "toy_mse"})).objective.to_dict() == {
        "name": "toy_mse", "weight": 1.0}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['identity_penalty'\] for objective 'toy_mse'; "
                                         r"valid options: \['weight'\]"):
        resolve(toy_config("toy_st", objective={"name": "toy_mse", "identity_penalty": 0.1}))
    with pytest.raises(ValueError, match=r"unknown objective 'mse'; choose one of .*toy_mse"):
        resolve(toy_config("toy_st", objective={"name": "mse"}))

    result = train_lib.train_and_evaluate(config, tmp_path)
    assert set(result) == {"mse", "loss"} and result[SoftmaxMSE.headline] == pytest.approx(result["loss"] / 2)
    logged = metrics(tmp_path)
    assert all("mse" in m and "error" not in m for m in logged if "loss" in m)
    assert [m["test_mse"] for m in logged if "test_mse" in m] == [result["mse"]]
    assert not (tmp_path / "images").exists()  # pictures = False
    line = objectives_lib.create_objective(resolve(config).objective).result_line(result)  # what the CLIs print
    assert line == f"test_mse={result['mse']!r} test_loss={result['loss']!r}"

    # Evaluation reports the objective's metric over every test example once (40 examples, batches of 16).
    run, state = restored(config, tmp_path)
    test = run.setup.dataset.test_examples(np.arange(run.setup.dataset.test_size))
    logits = jax.jit(lambda p, s, x: run.setup.merge(p, s, train=False)(x))(state.params, state.model_state,
                                                                            test["image"])
    expected = np.mean(((np.asarray(jax.nn.softmax(logits)) - np.eye(3)[test["label"]]) ** 2).sum(-1))
    assert result["mse"] == pytest.approx(float(expected), rel=1e-5)
    again = evaluation.evaluate_checkpoint(config, tmp_path)
    assert again == pytest.approx(result, rel=1e-6)


# ----------------------------------------------------------------------------
# c. Batch statistics: trained, checkpointed, used by evaluation, resumed exactly.
# ----------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_batchnorm_statistics_train_evaluate_and_resume_exactly(registered, tmp_path, monkeypatch):
    registered.task(TOY_TASK)
    registered.model(ModelSpec("toy_bn", _toy_bn_build, {"momentum": 0.5}, ("affine",), "Toy-BN", ("toy",)))
    config = toy_config("toy_bn", steps=8)
    initial = train_state.setup(resolve(config)).state.model_state
    stats = jax.tree_util.tree_leaves_with_path(initial)
    assert len(stats) == 2 and all("bn" in jax.tree_util.keystr(p) for p, _ in stats)  # mean and var

    straight = train_lib.train_and_evaluate(config, tmp_path / "straight")
    run, state = restored(config, tmp_path / "straight")
    assert int(state.step) == 8
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(state.model_state))]
    assert all(moved), "training did not update the batch statistics"

    # Evaluation mode normalises with the running averages: an example's output does not depend on the
    # batch it comes in; training mode normalises with the batch's statistics, so it does.
    x = run.setup.dataset.test_examples(np.arange(16))["image"]
    apply = jax.jit(lambda p, s, x, train: run.setup.merge(p, s, train=train)(x), static_argnums=3)
    eval_all, eval_few = apply(state.params, state.model_state, x, False), apply(state.params, state.model_state,
                                                                                 x[:4], False)
    train_all, train_few = apply(state.params, state.model_state, x, True), apply(state.params, state.model_state,
                                                                                  x[:4], True)
    np.testing.assert_allclose(eval_few, eval_all[:4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(train_few, train_all[:4], atol=1e-4)
    assert not np.allclose(eval_all, train_all, atol=1e-4)
    # ... and `evaluate` uses the trained statistics (the run's own result; other statistics change it).
    assert evaluation.evaluate(run, state) == pytest.approx(straight, rel=1e-6)
    reset = evaluation.evaluate(run, state.replace(model_state=jax.device_put(initial, run.replicated)))
    assert reset["loss"] != pytest.approx(straight["loss"], rel=1e-4)

    # Killed while making step 6's batch (checkpoints at 4), resumed: the same final state, bit for bit.
    train_batch = ToyDataset.train_batch

    def dying(self, step):
        if step == 6:
            raise Interrupt
        return train_batch(self, step)

    monkeypatch.setattr(ToyDataset, "train_batch", dying)
    with pytest.raises(Interrupt):
        train_lib.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.undo()
    assert checkpoints.checkpoint_manager(tmp_path / "resumed", 3, create=False).all_steps() == [4]
    resumed = train_lib.train_and_evaluate(config, tmp_path / "resumed")
    _, again = restored(config, tmp_path / "resumed")
    assert int(again.step) == 8
    for part in ("params", "model_state"):
        a, b = jax.tree_util.tree_leaves_with_path(getattr(state, part)), jax.tree.leaves(getattr(again, part))
        assert len(a) == len(b) > 0
        for (path, x), y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{part}{jax.tree_util.keystr(path)}")
    assert resumed == straight


# ----------------------------------------------------------------------------
# d. Every variant of every config file.
# ----------------------------------------------------------------------------


# Config file -> (its variants, the file's own `VARIANTS`; the tiny variant trained one step here). Files not
# listed: their default `get_config()` resolves (below).
FAMILIES = {
    "distorted_mnist": (list(distorted_mnist.VARIANTS), "rts,st_cnn,affine,tiny"),
    "mnist_addition": (list(mnist_addition.VARIANTS), "add_2st_fcn,tps,tiny"),
    "mnist_3d": (list(mnist_3d.VARIANTS), "st3d,tiny"),
    "quickstart": ([None], None),
}
TINY = ("distorted_mnist", "mnist_addition", "mnist_3d")  # the files with a `tiny` suffix


def _get_config(family: str, arg: str | None):
    module = importlib.import_module(f"configs.{family}")
    return module.get_config() if arg is None else module.get_config(arg)


def _abstract_model(resolved, ds):
    model = nnx.eval_shape(lambda: train_state.create_model(resolved, ds.image_shape, ds.num_classes))
    logits = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2,) + ds.image_shape, jnp.float32))
    return model, logits


def test_every_config_variant_resolves_and_builds(synthetic_mnist):
    """Each variant (and its tiny version) resolves; each distinct model builds abstractly on its data's shape."""
    transforms = {m: len(MODELS.get(m).transforms) for m in distorted_mnist.MODELS}
    assert len(FAMILIES["distorted_mnist"][0]) == len(distorted_mnist.TASKS) * sum(
        t if t > 1 else 1 for t in transforms.values()) >= 5 * 10
    built = {}
    for family, (variants, _) in FAMILIES.items():
        for arg in variants:
            args = [arg] + ([f"{arg},tiny"] if family in TINY else [])
            for a in args:
                config = _get_config(family, a)
                r = resolve(config)
                assert r.model.name in MODELS and r.data.task in TASKS and r.objective.name in OBJECTIVES, a
                if family == "distorted_mnist":  # the argument's task, model and transform
                    task, model, *transform = a.replace(",tiny", "").split(",")
                    assert (r.data.task, r.model.name, r.model.transform) == (task, model, "".join(transform)), a
                ds = tasks_lib.make_dataset(dict(r.data.to_dict(), source=synthetic_mnist), seed=0,
                                            global_batch_size=2)  # reads no data: shapes only
                key = json.dumps([r.model.to_dict(), ds.image_shape, ds.num_classes], sort_keys=True, default=str)
                if key in built:  # the same model on the same input shape (tiny variants, R/P/E)
                    continue
                model, logits = _abstract_model(r, ds)
                built[key] = model
                assert model.model_name == r.model.name and (model.transform or "") == r.model.transform, a
                assert model.input_shape == tuple(ds.image_shape) and logits.shape == (2, ds.num_classes), a
    assert len(built) >= 40


def test_colocalisation_config_names_a_registered_run_or_refuses_in_one_line():
    """Co-localisation's variants resolve when its model is registered; otherwise `resolve` says which models exist.

    (Building its model needs a trained encoder: tests/test_coloc.py trains it.)
    """
    for variant in colocalisation.VARIANTS:
        config = colocalisation.get_config(variant)
        if config.model.name in MODELS:
            r = resolve(config)
            assert r.model.name == config.model.name and r.data.task in TASKS and r.objective.name in OBJECTIVES
            assert r.model.transform == (config.model.transform or r.model.transform)
        else:
            with pytest.raises(ValueError) as info:
                resolve(config)
            message = str(info.value)
            assert "\n" not in message and f"unknown model {config.model.name!r}" in message
            assert all(name in message for name in MODELS.names())
        # A model that is not registered (e.g. before co-localisation had one): one line naming the valid ones.
        with pytest.raises(ValueError) as info:
            resolve(dict(config.to_dict(), model={"name": "coloc", "transform": "attention"}))
        message = str(info.value)
        assert "\n" not in message and message == f"unknown model 'coloc'; choose one of {', '.join(MODELS)}"


def test_other_config_files_resolve_by_default():
    """Config files of other experiments (not enumerated above): their default config resolves."""
    files = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
    assert set(FAMILIES) | {"colocalisation"} <= set(files)
    for name in files:
        if name in FAMILIES or name == "colocalisation":
            continue
        r = resolve(_get_config(name, None))
        assert r.model.name in MODELS and r.data.task in TASKS, name


@pytest.mark.parametrize("family", TINY)
def test_tiny_variant_of_each_family_trains_a_step(family, synthetic_mnist, tmp_path, cheap_compilation):
    """One step of the family's tiny config end to end (data, model, objective, checkpoint, evaluation)."""
    config = _get_config(family, FAMILIES[family][1])
    config.data.source = synthetic_mnist
    config.total_steps = 1
    config.batch_size = 8
    config.data.test_size = 8
    config.eval_batch_size = 8
    result = train_lib.train_and_evaluate(config, tmp_path)
    assert 0.0 <= result["error"] <= 1.0 and np.isfinite(result["loss"])
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1]
    assert checkpoints.checkpoint_manager(tmp_path, 3, create=False).all_steps() == [1]


# ----------------------------------------------------------------------------
# e. The tiny configs on 4 devices.
# ----------------------------------------------------------------------------


def test_tiny_configs_evaluate_on_four_devices(synthetic_mnist, tmp_path):
    """Every tiny config's batch sizes split over 4 devices; one trains 2 steps on 4 forced CPU devices and its
    sharded evaluation (a last batch padded with masked examples) equals the single-device one."""
    for family in TINY:
        for arg in FAMILIES[family][0]:
            c = _get_config(family, f"{arg},tiny")
            assert c.batch_size % 4 == 0 and c.eval_batch_size % 4 == 0, (family, arg)
    arg = "r,st_fcn,affine,tiny"
    overrides = {"total_steps": 2, "checkpoint_every": 2, "data.test_size": 100, "data.source": synthetic_mnist}
    flags = [f"--config=configs/distorted_mnist.py:{arg}", f"--workdir={tmp_path}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]
    out = subprocess.run([sys.executable, "-m", "experiments.train", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on 4 devices" in out.stderr
    line = out.stdout.strip().splitlines()[-1]
    error, loss = (float(part.split("=")[1]) for part in line.split())
    config = distorted_mnist.get_config(arg)
    assert config.eval_batch_size == 256 and 100 % config.eval_batch_size  # one batch, 156 padding examples
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    one = evaluation.evaluate_checkpoint(config, tmp_path)  # this process: 1 device
    assert jax.device_count() == 1
    assert one["error"] == error and one["loss"] == pytest.approx(loss, rel=1e-5)
