"""The training loop and its command lines: training, resumption, parallelism, the NaN guard, errors.

Tiny configs (the families' ``tiny`` variants, shrunk further) on conftest's
synthetic MNIST (IDX files of digit-like glyphs); the multi-device and
multi-process runs are subprocesses, since JAX fixes its devices at start-up.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT
from flax import nnx

from configs import distorted_mnist
from stn_jax.paper import train as train_lib, train_state
from stn_jax.paper.config import resolve, trainer_defaults
from stn_jax.paper.data.npz import load_npz_test_set
from stn_jax.paper.models import MODELS

ARG = "r,st_fcn,affine,tiny"


def tiny_config(synthetic_mnist: str, arg: str = ARG, steps: int = 12, **overrides):
    c = distorted_mnist.get_config(arg)
    c.data.source = synthetic_mnist
    c.data.test_size = 64
    c.total_steps = steps
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = steps
    c.checkpoint_every = 4
    c.eval_batch_size = 32
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir: Path) -> list[np.ndarray]:
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def python(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_mnist):
    """One tiny run, shared by the tests that only read its workdir."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(synthetic_mnist, steps=40, **{"optimizer.learning_rate": 0.02, "checkpoint_every": 20,
                                                "log_every": 10})
    result = train_lib.train_and_evaluate(config, workdir)
    return config, workdir, result


def test_tiny_run_trains_and_records_everything(trained):
    config, workdir, result = trained
    losses = [m["loss"] for m in metrics(workdir) if "loss" in m]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, f"the loss did not fall: {losses}"
    assert 0.0 <= result["error"] <= 1.0 and np.isfinite(result["loss"])
    assert [m["test_error"] for m in metrics(workdir) if "test_error" in m] == [result["error"]]
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "st_fcn"
    assert json.loads((workdir / "versions.json").read_text())["jax"] == jax.__version__
    assert (workdir / "images" / "transformer_step0000040.png").is_file()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    logged = metrics(workdir)[0]
    for key in ("learning_rate", "images_per_second", "error", "theta/0/0/mean", "theta/0/0/std"):
        assert key in logged
    assert sorted(ocp.CheckpointManager(workdir / "checkpoints").all_steps()) == [20, 40]


def test_evaluate_prints_the_result_line(trained, synthetic_mnist, tmp_path):
    _, workdir, result = trained
    flags = [f"--config=configs/distorted_mnist.py:{ARG}", f"--workdir={workdir}",
             f"--config.data.source={synthetic_mnist}", "--config.data.test_size=64", "--config.eval_batch_size=32"]
    out = python("-m", "experiments.evaluate", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    error, loss = (float(part.split("=")[1]) for part in line.split())
    assert line.startswith("test_error=") and " test_loss=" in line
    assert error == pytest.approx(result["error"]) and loss == pytest.approx(result["loss"], rel=1e-5)

    # The same model scored on a user's own array file: 20 copies of one uint8 test digit labelled 3.
    test = load_npz_test_set  # the reader the flag uses
    images = (np.random.default_rng(0).random((20, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "mine.npz", images=images, labels=np.full(20, 3))
    mine = test(tmp_path / "mine.npz", image_shape=(28, 28, 1), num_classes=10)
    assert mine.arrays["image"].shape == (20, 28, 28, 1) and mine.arrays["image"].dtype == np.float32
    assert mine.test_size == 20 and mine.test_examples(np.array([0, 19]))["label"].tolist() == [3, 3]
    np.testing.assert_allclose(mine.test_examples(np.array([4]))["image"][0, ..., 0], images[4] / 255.0)
    with pytest.raises(ValueError, match=r"the model expects \(42, 42, 1\)"):
        test(tmp_path / "mine.npz", image_shape=(42, 42, 1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        test(tmp_path / "mine.npz", num_classes=3)
    out = python("-m", "experiments.evaluate", *flags, f"--config.data.test_npz={tmp_path / 'mine.npz'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("test_error=")


ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)  # absl's prefix: I1207 23:01:04.541600 ...


def assert_quiet(stderr: str) -> None:
    """No library log lines (absl-formatted orbax INFO, JAX's backend probe) on a terminal."""
    assert not ABSL_LINE.search(stderr) and "INFO" not in stderr and "backend" not in stderr, stderr[-3000:]


def test_evaluate_from_the_workdir_alone_is_quiet(trained):
    """``experiments.evaluate --workdir W`` without ``--config`` scores the run with its own config.json; the
    terminal holds the result and the project's lines only; an override is announced; ``--verbosity`` brings the
    libraries' INFO lines back."""
    _, workdir, result = trained
    out = python("-m", "experiments.evaluate", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    error, loss = (float(part.split("=")[1]) for part in out.stdout.strip().split())
    assert error == pytest.approx(result["error"]) and loss == pytest.approx(result["loss"], rel=1e-5)
    assert_quiet(out.stderr)
    assert f"restored the checkpoint of step 40 from {workdir}/checkpoints" in out.stderr
    out = python("-m", "experiments.evaluate", f"--workdir={workdir}", "--config.data.test_size=32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_quiet(out.stderr)
    assert ("warning: evaluating with a setting other than the run's config.json: data.test_size: 64 -> 32"
            in out.stderr.splitlines())
    loud = python("-m", "experiments.evaluate", f"--workdir={workdir}", "--verbosity=0")
    assert loud.returncode == 0 and ABSL_LINE.search(loud.stderr), loud.stderr[-3000:]
    missing = python("-m", "experiments.evaluate", f"--workdir={workdir / 'absent'}")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: {workdir / 'absent'} has no config.json: pass the --workdir of a training run"]


def test_evaluate_without_a_checkpoint_says_so(tmp_path, synthetic_mnist):
    out = python("-m", "experiments.evaluate", f"--config=configs/distorted_mnist.py:{ARG}",
                 f"--workdir={tmp_path}", f"--config.data.source={synthetic_mnist}")
    assert out.returncode != 0
    assert f"no checkpoint in {tmp_path}/checkpoints" in out.stderr and "experiments.train" in out.stderr
    assert "Traceback" not in out.stderr


def test_npz_test_sets_are_checked(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 28, 28), np.float32), label=np.zeros(3))
    with pytest.raises(ValueError, match=r"must hold arrays 'images' and 'labels'; missing \['labels'\]"):
        load_npz_test_set(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", images=np.full((3, 28, 28), 2.0, np.float32), labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        load_npz_test_set(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 28, 28), np.int64), labels=np.zeros(3))
    with pytest.raises(ValueError, match="must be uint8 or float"):
        load_npz_test_set(tmp_path / "c.npz")


class Interrupt(Exception):
    pass


def test_killed_and_resumed_run_ends_bit_identical(tmp_path, synthetic_mnist, monkeypatch):
    config = tiny_config(synthetic_mnist, steps=12)
    train_lib.train_and_evaluate(config, tmp_path / "straight")

    make_dataset = train_state.make_dataset

    def dying_dataset(*args, **kwargs):  # the process dies while making step 7's batch (checkpoints: 4)
        dataset = make_dataset(*args, **kwargs)
        train_batch = dataset.train_batch

        def batch(step, **kw):
            if step == 7:
                raise Interrupt
            return train_batch(step, **kw)

        dataset.train_batch = batch
        return dataset

    monkeypatch.setattr(train_state, "make_dataset", dying_dataset)
    with pytest.raises(Interrupt):
        train_lib.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.undo()
    assert ocp.CheckpointManager(tmp_path / "resumed" / "checkpoints").latest_step() == 4
    train_lib.train_and_evaluate(config, tmp_path / "resumed")

    for a, b in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_mnist, monkeypatch):
    make_dataset = train_state.make_dataset

    def poisoned_dataset(*args, **kwargs):  # step 5's images hold a NaN
        dataset = make_dataset(*args, **kwargs)
        train_batch = dataset.train_batch

        def batch(step, **kw):
            out = train_batch(step, **kw)
            if step == 5:
                out = dict(out, image=np.where(np.arange(out["image"].size).reshape(out["image"].shape) == 3,
                                               np.nan, out["image"]).astype(np.float32))
            return out

        dataset.train_batch = batch
        return dataset

    monkeypatch.setattr(train_state, "make_dataset", poisoned_dataset)
    workdir = tmp_path / "nan"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite at step 5 .*last good checkpoint is step 4"):
        train_lib.train_and_evaluate(tiny_config(synthetic_mnist, steps=12), workdir)
    assert ocp.CheckpointManager(workdir / "checkpoints").all_steps() == [4]
    assert all(np.isfinite(p).all() for p in final_params(workdir))


def test_a_finite_loss_with_a_non_finite_gradient_discards_the_update(synthetic_mnist):
    """The step's guard reads the gradient too: a NaN in one gradient, the loss finite, keeps the old state."""
    s = train_state.setup(resolve(tiny_config(synthetic_mnist)))
    batch = s.dataset.train_batch(0)
    step = jax.jit(train_lib.make_train_step(s))
    clean, _ = step(s.state, batch)
    loss = s.objective.loss

    def poisoned(model, batch):  # the same value; d/dw of sqrt(|w - w|) at 0 is NaN
        value, m = loss(model, batch)
        w = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
        return value + 0.0 * jnp.sqrt(jnp.abs(w - jax.lax.stop_gradient(w))).sum(), m

    s.objective.loss = poisoned
    new, m = jax.jit(train_lib.make_train_step(s))(s.state, batch)
    assert np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"])
    assert int(new.step) == 1 and int(new.first_nonfinite_step) == 0 and int(clean.first_nonfinite_step) == -1
    old = jax.tree.leaves((s.state.params, s.state.opt_state))
    assert any(not np.array_equal(a, b) for a, b in zip(old, jax.tree.leaves((clean.params, clean.opt_state))))
    for a, b in zip(old, jax.tree.leaves((new.params, new.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_flags(workdir: Path, synthetic_mnist: str) -> list[str]:
    return ["-m", "experiments.train", f"--config=configs/distorted_mnist.py:{ARG}", f"--workdir={workdir}",
            f"--config.data.source={synthetic_mnist}", "--config.total_steps=4", "--config.batch_size=16",
            "--config.log_every=1", "--config.data.test_size=32", "--config.eval_batch_size=32",
            "--config.checkpoint_every=4"]


def test_four_devices_and_two_processes_match_one_device(tmp_path, synthetic_mnist):
    """Data parallelism over 4 devices and over 2 processes (gloo) gives the single-device losses. The terminal of
    a run is quiet: the resolved config, the project's progress lines, no library INFO lines."""
    one = python(*_train_flags(tmp_path / "one", synthetic_mnist))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_quiet(one.stderr)
    assert "config (every default filled, widths solved):" in one.stderr and "\nparameters: " in one.stderr
    assert "training st_fcn/affine on r, steps 0 -> 4 on 1 device\n" in one.stderr
    recorded = json.loads((tmp_path / "one" / "config.json").read_text())
    assert recorded["model"]["options"]["width"] > 0  # solved, not left to the model
    four = python(*_train_flags(tmp_path / "four", synthetic_mnist),
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr[-3000:]
    assert "on 4 devices" in four.stderr

    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, *_train_flags(tmp_path / "two", synthetic_mnist),
                               f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "on 2 devices" in outputs[0][1]

    losses = {name: [m["loss"] for m in metrics(tmp_path / name) if "loss" in m] for name in ("one", "four", "two")}
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["four"], losses["one"], rtol=1e-5)
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5)


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.lr=0.1",
     "unknown config key 'config.optimizer.lr'; valid keys under 'config.optimizer': "
     + ", ".join(sorted(trainer_defaults()["optimizer"]))),
    ("--config.model.options.widht=8", "unknown option(s) ['widht'] for model 'st_fcn'; valid options: "
                                       "['align_corners', 'bound',"),
    ("--config.identity_penalty=0.1",  # moved to config.objective
     f"unknown config key 'config.identity_penalty'; valid keys: {', '.join(sorted(trainer_defaults()))}"),
    ("--config.objective.identity_penalti=0.1", "unknown option(s) ['identity_penalti'] for objective "
                                                "'classification'; valid options: ['identity_penalty']"),
    ("--config=configs/distorted_mnist.py:rts,resnet",
     f"unknown model 'resnet'; choose one of {', '.join(distorted_mnist.MODELS)}"),
    ("--config=configs/distorted_mnist.py:q,cnn",
     f"unknown task 'q'; choose one of {', '.join(distorted_mnist.TASKS)}"),
    ("--config.optimizer.name=rmsprop", "config.optimizer.name must be one of sgd, adam, got 'rmsprop'"),
    ("--config=configs/distorted_mnist.py:rts,st_cnn,spline",
     f"model 'st_cnn' needs a transform; choose one of {', '.join(MODELS.get('st_cnn').transforms)}, got 'spline'"),
])
def test_bad_config_flags_list_the_choices(tmp_path, flag, message):
    config = [] if flag.startswith("--config=") else [f"--config=configs/distorted_mnist.py:{ARG}"]
    out = python("-m", "experiments.train", *config, flag, f"--workdir={tmp_path}", timeout=120)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_every_family_config_builds_its_model_and_data(synthetic_mnist):
    """Each family's default and tiny configs resolve to a model and a data set that fit together (shapes only).

    (tests/test_architecture.py builds every variant of every config file abstractly and trains each family.)
    """
    import importlib

    from stn_jax.paper import data as data_lib

    for family, arg in [("distorted_mnist", "tc,st_cnn,tps"), ("mnist_addition", "add_2st_fcn,tps,tiny"),
                        ("mnist_3d", "st3d,tiny"), ("distorted_mnist", "rts,cnn")]:
        c = importlib.import_module(f"configs.{family}").get_config(arg)
        for key in ("seed", "batch_size", "total_steps", "checkpoint_every"):
            assert key in c
        c.data.source = synthetic_mnist
        r = resolve(c)
        assert r.model.name == arg.split(",")[0 if family != "distorted_mnist" else 1]
        ds = data_lib.make_dataset(r.data, seed=0, global_batch_size=2)
        model = nnx.eval_shape(lambda: train_state.create_model(r, ds.image_shape, ds.num_classes))
        assert model.model_name == r.model.name and model.input_shape == tuple(ds.image_shape)
        assert (model.transform or "") == r.model.transform and model.num_classes == ds.num_classes
        logits = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2,) + ds.image_shape, jnp.float32))
        assert logits.shape == (2, ds.num_classes)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_groups_follow_optax_with_their_multipliers(name):
    """One update of ``make_optimizer`` equals optax's own optimiser on each group: the localisation group at
    ``loc_lr_multiplier`` and the backbone (a ``main`` leaf under a backbone attribute) at
    ``backbone_lr_multiplier`` x the learning rate, weight decay added to the gradient."""
    import ml_collections
    import optax

    opt = ml_collections.ConfigDict({**trainer_defaults()["optimizer"], "name": name, "learning_rate": 0.1,
                                     "loc_lr_multiplier": 0.01, "backbone_lr_multiplier": 0.1,
                                     "weight_decay": 1e-3})
    vec = lambda *v: np.array(v, np.float32)  # noqa: E731
    params = {"loc": {"w": vec(1.0, -2.0)}, "main": {"backbone": {"w": vec(2.0, 1.0)}, "fc": {"w": vec(0.5, 3.0)}}}
    grads = {"loc": {"w": vec(0.2, 0.4)}, "main": {"backbone": {"w": vec(0.3, -0.1)}, "fc": {"w": vec(-1.0, 0.25)}}}
    labels = train_state.param_labels(params, ("backbone",))
    assert labels == {"loc": {"w": "loc"}, "main": {"backbone": {"w": "backbone"}, "fc": {"w": "main"}}}
    tx = train_state.make_optimizer(opt, labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    for where, rate in ((("loc",), 0.001), (("main", "backbone"), 0.01), (("main", "fc"), 0.1)):
        base = optax.adam(rate) if name == "adam" else optax.sgd(rate, momentum=0.9)
        reference = optax.chain(optax.add_decayed_weights(1e-3), base)
        get = lambda tree: functools.reduce(lambda t, k: t[k], where, tree)  # noqa: E731
        expected, _ = reference.update(get(grads), reference.init(get(params)), get(params))
        np.testing.assert_allclose(get(updates)["w"], expected["w"], rtol=1e-6)
    rates = train_state.learning_rates(opt, ("main", "backbone", "loc"), jnp.int32(0))
    assert {k: round(float(v), 8) for k, v in rates.items()} == {
        "learning_rate": 0.1, "learning_rate_backbone": 0.01, "learning_rate_loc": 0.001}


def test_schedule_drops_at_each_boundary_and_boundaries_are_checked():
    import ml_collections

    opt = ml_collections.ConfigDict({**trainer_defaults()["optimizer"], "learning_rate": 0.1,
                                     "decay_boundaries": (3, 5), "decay_factor": 0.5})
    schedule = train_state.make_schedule(opt)
    assert [round(float(schedule(s)), 6) for s in range(7)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    base = {"model": {"name": "cnn"}, "data": {"task": "rts"}}
    assert resolve({**base, "optimizer": {"decay_boundaries": 7}}).optimizer.decay_boundaries == (7,)
    for bad in ((5, 3), (0,), "1500", (1.5,)):
        with pytest.raises(ValueError, match="decay_boundaries"):
            resolve({**base, "optimizer": {"decay_boundaries": bad}})
    with pytest.raises(ValueError, match="unknown config key 'config.optimizer.decay_every'"):
        resolve({**base, "optimizer": {"decay_every": 100}})


def test_warmup_ramps_linearly_then_follows_the_drops():
    import ml_collections

    opt = ml_collections.ConfigDict({**trainer_defaults()["optimizer"], "learning_rate": 0.1,
                                     "decay_boundaries": (3,), "decay_factor": 0.5, "warmup_steps": 4})
    schedule = train_state.make_schedule(opt)
    assert [round(float(schedule(s)), 6) for s in range(6)] == [0.025, 0.05, 0.075, 0.05, 0.05, 0.05]
    rates = train_state.learning_rates(opt, ("main", "loc"), jnp.int32(1))
    assert round(float(rates["learning_rate"]), 8) == 0.05
    with pytest.raises(ValueError, match="warmup_steps"):
        resolve({"model": {"name": "cnn"}, "data": {"task": "rts"}, "optimizer": {"warmup_steps": -1}})
