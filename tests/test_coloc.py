"""Co-localisation (paper Appendix A.2): the triplet loss, IoU, the fixed image set, the encoder's run, the crop's
range, the localisation network's coverage, a tiny run."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from stn_jax.layers import Bound, LocalisationParam
from stn_jax.paper import checkpoints, coloc as C, evaluation, models
from stn_jax.paper.data import make_dataset
from stn_jax.paper.models.coloc import ColocLocalisation, Frozen, FrozenCNN, read_encoder
from stn_jax.paper.objectives import create_objective

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("cheap_compilation")


def _config_module():
    spec = importlib.util.spec_from_file_location("_cfg_coloc", ROOT / "configs" / "colocalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------
# Loss and IoU against hand-computed values.
# ----------------------------------------------------------------------------

DESC_T = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
DESC_RAND = np.array([[0.0, 1.0], [1.0, 1.5], [0.0, 0.0]], np.float32)


def _hand_hinge(alpha: float) -> tuple[float, int]:
    """sum_n sum_{m != n} max(0, |t_n - t_m|^2 - |t_n - r_n|^2 + alpha), written out for the 3 images above."""
    # |t_n - r_n|^2: n=0: 1; n=1: 2.25; n=2: 4.  |t_n - t_m|^2: (0,1)=1, (0,2)=4, (1,2)=1+4=5.
    terms = [1 - 1, 4 - 1,        # n=0, m=1,2
             1 - 2.25, 5 - 2.25,  # n=1, m=0,2
             4 - 4, 5 - 4]        # n=2, m=0,1
    return sum(max(0.0, t + alpha) for t in terms), 6


def test_triplet_terms_hand_computed():
    for alpha in (1.0, 0.5):
        hinge, pairs = C.triplet_terms(jnp.asarray(DESC_T), jnp.asarray(DESC_RAND), alpha)
        want, count = _hand_hinge(alpha)
        np.testing.assert_allclose(float(hinge.sum()), want, rtol=1e-6)
        assert float(pairs.sum()) == count
    # alpha = 1 by hand: n=0: 1 + 4; n=1: 0 + 3.75; n=2: 1 + 2 -> 11.75
    hinge, _ = C.triplet_terms(jnp.asarray(DESC_T), jnp.asarray(DESC_RAND), 1.0)
    np.testing.assert_allclose(np.asarray(hinge), [5.0, 3.75, 3.0], rtol=1e-6)
    # One rolled partner: (0,1), (1,2), (2,0): 1-1+1=1, 5-2.25+1=3.75, 4-4+1=1.
    hinge, pairs = C.triplet_terms(jnp.asarray(DESC_T), jnp.asarray(DESC_RAND), 1.0, num_pairs=1)
    np.testing.assert_allclose(np.asarray(hinge), [1.0, 3.75, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pairs), [1, 1, 1])
    # A masked-out image (weight 0) drops every pair it is in: only (0,1) and (1,0) remain.
    hinge, pairs = C.triplet_terms(jnp.asarray(DESC_T), jnp.asarray(DESC_RAND), 1.0, weights=jnp.array([1., 1., 0.]))
    np.testing.assert_allclose(float(hinge.sum()), 1.0 + 0.0, rtol=1e-6)
    assert float(pairs.sum()) == 2


def test_iou_and_boxes_hand_computed():
    a = jnp.array([0.0, 0.0, 2.0, 2.0])
    np.testing.assert_allclose(float(C.iou(a, jnp.array([1.0, 1.0, 3.0, 3.0]))), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(C.iou(a, a)), 1.0)
    assert float(C.iou(a, jnp.array([2.0, 0.0, 3.0, 1.0]))) == 0.0  # touching: no overlap
    np.testing.assert_allclose(float(C.iou(a, jnp.array([0.0, 0.0, 1.0, 2.0]))), 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(C.theta_to_box(jnp.array([0.5, 0.1, -0.2]))), [-0.4, -0.7, 0.6, 0.3],
                               rtol=1e-6)
    # The digit frame of a 28x28 digit with top-left pixel (10, 20) in 84x84 (data.distortions.colocalisation).
    frame = (2 * np.array([10 - 0.5, 20 - 0.5, 38 - 0.5, 48 - 0.5]) + 1) / 84 - 1
    s, tx, ty = 28 / 84, (frame[0] + frame[2]) / 2, (frame[1] + frame[3]) / 2
    np.testing.assert_allclose(np.asarray(C.theta_to_box(jnp.array([s, tx, ty]))), frame, atol=1e-6)
    # The identity (whole image) against a third-of-the-side box: IoU 1/9 (svhn-cub-coloc-notes: 0.11).
    np.testing.assert_allclose(float(C.iou(C.theta_to_box(jnp.array([1.0, 0.0, 0.0])), jnp.asarray(frame))), 1 / 9,
                               rtol=1e-5)


class _StubModel:
    """Returns fixed descriptors and attention parameters: the objective's arithmetic alone."""

    def __call__(self, x, return_aux=False):
        theta = jnp.array([[1 / 3, 0.0, 0.0], [1 / 3, 0.5, 0.5], [0.2, -0.5, -0.5]])
        return jnp.asarray(DESC_T), {"theta": [theta], "warped": [x], "identity_penalty": jnp.zeros(())}

    def describe_patches(self, x, theta):
        return jnp.asarray(DESC_RAND)


def test_triplet_objective_with_stub_model():
    obj = create_objective({"name": "triplet", "normalize": False})
    assert obj.headline == "localised" and obj.options["alpha"] == 1.0
    third = 1 / 3
    batch = {"image": jnp.zeros((3, 4, 4, 1)), "rand": jnp.zeros((3, 3)), "label": jnp.zeros(3, jnp.int32),
             "box": jnp.array([[-third, -third, third, third], [0.5 - third, 0.5 - third, 0.5 + third, 0.5 + third],
                               [0.0, 0.0, 0.5, 0.5]]),
             "ink_box": jnp.zeros((3, 4)), "mask": jnp.array([1.0, 1.0, 1.0])}
    loss, metrics = obj.loss(_StubModel(), batch)
    np.testing.assert_allclose(float(loss), 11.75 / 6, rtol=1e-6)
    # Images 0 and 1: exact boxes; image 2: disjoint.
    np.testing.assert_allclose(float(metrics["localised"]), 2 / 3, rtol=1e-6)
    sums = jax.tree.map(float, obj.eval_sums(_StubModel(), batch))
    result = obj.summarize(sums)
    assert list(result)[0] == "localised"
    np.testing.assert_allclose(result["localised"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(result["mean_iou"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(result["loss"], 11.75 / 6, rtol=1e-6)
    # Centre error in pixels (4-pixel-wide images: 2 pixels per normalised unit): image 2 is off by
    # (0.75, 0.75); `centred` (a true-size box at the predicted centre) holds for images 0 and 1.
    np.testing.assert_allclose(result["centre_error_px"], np.hypot(0.75, 0.75) * 2 / 3, rtol=1e-5)
    np.testing.assert_allclose(result["centred"], 2 / 3, rtol=1e-6)
    assert obj.result_line(result).startswith("localised=0.666") and " mean_iou=0.666" in obj.result_line(result)
    with pytest.raises(ValueError, match="unknown option"):
        create_objective({"name": "triplet", "margin": 1.0})
    with pytest.raises(ValueError, match="patch_scale"):
        create_objective({"name": "triplet", "patch_scale": "big"})
    # normalize: descriptors scaled to unit length first (a scaled copy of DESC_T gives the same loss).
    unit = create_objective({"name": "triplet", "normalize": True})

    class Scaled(_StubModel):
        def __call__(self, x, return_aux=False):
            d, aux = super().__call__(x, True)
            return d * 7.0, aux

    a, _ = unit.loss(_StubModel(), batch)
    b, _ = unit.loss(Scaled(), batch)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_patch_theta_hand_computed():
    u = jnp.array([[0.3, 0.0, 0.5], [0.9, 0.75, 1.0], [0.1, 0.2, 0.2]])
    theta = C.patch_theta(u, jnp.array([0.5, 0.25, 1.5]))
    # t = (2u - 1)(1 - s): the patch stays inside the image; s >= 1 is centred.
    np.testing.assert_allclose(np.asarray(theta), [[0.5, -0.5, 0.0], [0.25, 0.375, 0.75], [1.5, 0.0, 0.0]],
                               atol=1e-6)
    box = C.theta_to_box(theta[:2])
    assert (np.asarray(box) >= -1 - 1e-6).all() and (np.asarray(box) <= 1 + 1e-6).all()


def test_unit_norm_whole_and_per_part_hand_computed():
    d = jnp.array([[3.0, 4.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, -5.0]])
    # Whole: divided by sqrt(9 + 16 + 4 + 1) = sqrt(30) and by 5; per part (2, 2, 1): each part by its own norm
    # (a zero part stays zero).
    np.testing.assert_allclose(np.asarray(C.unit_norm(d)), [[3, 4, 0, 2, 1] / np.sqrt(30), [0, 0, 0, 0, -1]],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(C.unit_norm(d, (2, 2, 1))), [[0.6, 0.8, 0, 1, 1], [0, 0, 0, 0, -1]],
                               atol=1e-6)
    with pytest.raises(ValueError, match="do not make up"):
        C.unit_norm(d, (2, 2))


class _RecordingStub(_StubModel):
    """The stub with two one-number descriptor parts; it records the random patches it is asked for."""

    descriptor_sizes = (1, 1)

    def describe_patches(self, x, theta):
        self.patches = np.asarray(theta)
        return super().describe_patches(x, theta)


def test_triplet_fixed_patches_and_per_part_normalisation_hand_computed():
    u = jnp.array([[0.9, 0.0, 0.5], [0.1, 1.0, 0.25], [0.5, 0.5, 0.75]])
    batch = {"image": jnp.zeros((3, 4, 4, 1)), "rand": u, "box": jnp.zeros((3, 4)), "mask": jnp.ones(3)}
    obj = create_objective({"name": "triplet", "patch_scale": "fixed", "normalize": False, "normalize_parts": True})
    assert obj.options["patch_fixed_scale"] == pytest.approx(1 / 3)
    stub = _RecordingStub()
    loss, _ = obj.loss(stub, batch)
    # Fixed patches: s = 1/3 whatever u[:, 0], centre (2 u - 1)(1 - 1/3).
    third = 1 / 3
    np.testing.assert_allclose(stub.patches, [[third, -2 / 3, 0.0], [third, 2 / 3, -1 / 3], [third, 0.0, 1 / 3]],
                               atol=1e-6)
    # Per part (two parts of one number): DESC_T -> (0, 0), (1, 0), (0, 1); DESC_RAND -> (0, 1), (1, 1), (0, 0).
    # |t_n - r_n|^2 = 1, 1, 1; |t_n - t_m|^2: (0,1) = 1, (0,2) = 1, (1,2) = 2. Hinge (alpha 1):
    # n=0: 1 + 1; n=1: 1 + 2; n=2: 1 + 2 -> 8 over 6 pairs.
    np.testing.assert_allclose(float(loss), 8 / 6, rtol=1e-6)
    # Both: per part, then the whole scaled to length 1: only image 1's patch (1, 1) changes, to (1, 1) / sqrt 2,
    # so |t_1 - r_1|^2 = 2 - sqrt 2 and image 1's two terms grow by sqrt 2 - 1 each.
    both = create_objective({"name": "triplet", "patch_scale": "fixed", "normalize": True, "normalize_parts": True})
    np.testing.assert_allclose(float(both.loss(stub, batch)[0]), (8 + 2 * (np.sqrt(2) - 1)) / 6, rtol=1e-6)
    with pytest.raises(ValueError, match="descriptor_sizes"):
        obj.loss(_StubModel(), batch)
    with pytest.raises(ValueError, match="patch_fixed_scale"):
        create_objective({"name": "triplet", "patch_fixed_scale": 0.0})


# ----------------------------------------------------------------------------
# The fixed image set.
# ----------------------------------------------------------------------------


def test_fixed_image_set(synthetic_mnist, tmp_path):
    data = {"task": "coloc_set", "source": synthetic_mnist, "digit_class": 3, "test_size": 8}
    ds = make_dataset(data, seed=1, global_batch_size=6, cache_dir=str(tmp_path))
    images = ds.test_set()
    assert ds.test_size == len(images["label"]) == 8 and (images["label"] == 3).all()
    assert images["image"].shape == (8, 84, 84, 1) and images["rand"].shape == (8, 3)
    a, b = ds.train_batch(5, with_params=True), ds.train_batch(5, with_params=True)
    for k in a:
        if k != "params":
            np.testing.assert_array_equal(a[k], b[k])  # a function of (seed, step)
    idx = a["params"]["index"]
    assert len(set(idx.tolist())) == 6  # without replacement
    np.testing.assert_array_equal(a["image"], images["image"][idx])  # training images are the set's
    np.testing.assert_array_equal(a["box"], images["box"][idx])
    assert not np.array_equal(ds.train_batch(6)["rand"], a["rand"])
    assert (a["rand"] >= 0).all() and (a["rand"] < 1).all()
    # Two processes' shards concatenate to the global batch.
    shards = [make_dataset(data, seed=1, global_batch_size=6, process_index=p, process_count=2,
                           cache_dir=str(tmp_path)).train_batch(5) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), a["image"])
    with pytest.raises(ValueError, match="must be at least 2"):
        make_dataset(dict(data, test_size=1), seed=0, global_batch_size=2)


def test_config_arguments():
    from stn_jax.paper.config import resolve

    cfg = _config_module()
    c = cfg.get_config("tc,3")
    assert c.data.num_clutter == 16 and c.data.digit_class == 3 and c.objective.name == "triplet"
    assert cfg.get_config("t").data.digit_class == 8 and cfg.get_config("t").data.num_clutter == 0
    assert cfg.get_config("t,tiny").total_steps < 100
    assert c.model.options.encoder == cfg.ENCODER_WORKDIR == "workdirs/coloc_encoder"  # the encoder run's workdir
    # The encoder is a run of its own: the Sect. 4.1 CNN on upright MNIST (R without rotation).
    e = resolve(cfg.get_config("encoder"))
    assert (e.model.name, e.data.task, e.data.max_angle, e.objective.name) == ("cnn", "r", 0.0, "classification")
    assert e.total_steps == 3000 and e.data.test_size == 10_000
    assert cfg.get_config("encoder,tiny").total_steps < 100
    for bad in ("x", "t,11", "t,3,4", "encoder,3"):
        with pytest.raises(ValueError):
            cfg.get_config(bad)


# ----------------------------------------------------------------------------
# Encoder, model, a tiny run through the one training loop.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_run(synthetic_mnist, tmp_path_factory) -> Path:
    """A tiny run of the encoder's config (``configs/colocalisation.py:encoder,tiny``: width 4, 3 steps)."""
    from stn_jax.paper import train

    c = _config_module().get_config("encoder,tiny")
    c.data.source = synthetic_mnist
    c.total_steps = c.eval_every = c.checkpoint_every = 3
    c.batch_size, c.data.test_size = 8, 32
    workdir = tmp_path_factory.mktemp("coloc") / "encoder"
    train.train_and_evaluate(c, workdir)
    return workdir


def test_encoder_read_from_its_run(encoder_run):
    w = read_encoder(encoder_run)
    assert w["input_shape"] == (28, 28, 1) and w["conv1"][0].shape == (9, 9, 1, 4) and w["step"] == 3
    assert (w["model"], w["task"]) == ("cnn", "r")
    # The frozen encoder computes the classifier's logits exactly, and its descriptor holds both hidden layers.
    from stn_jax.paper.config import resolve
    from stn_jax.paper.train_state import build

    config = resolve(ml_collections.ConfigDict(json.loads((encoder_run / "config.json").read_text())))
    setup = build(config, (28, 28, 1), 10)
    manager = ocp.CheckpointManager(encoder_run / "checkpoints")
    state = manager.restore(3, args=ocp.args.StandardRestore(setup.state))
    cnn = setup.merge(state.params, state.model_state, train=False)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1)), jnp.float32)
    enc = FrozenCNN((28, 28, 1), w)
    np.testing.assert_allclose(np.asarray(enc.logits(x)), np.asarray(cnn(x)), rtol=1e-5, atol=1e-5)
    assert enc(x).shape == (2, 10 * 10 * 4 + 2 * 2 * 4 + 10)


def test_a_missing_or_unfinished_encoder_stops_in_one_line_naming_path_and_command(encoder_run, tmp_path):
    command = "python -m experiments.train --config configs/colocalisation.py:encoder --workdir"
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as info:
        read_encoder(missing)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message and f"{command} {missing}" in message
    # The model's preflight (before any data is made) says the same.
    assert "does not exist" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.preflight("coloc_st", {"encoder": str(missing)})
    with pytest.raises(FileNotFoundError, match="is not a training run's workdir"):
        read_encoder(tmp_path)
    with pytest.raises(ValueError, match="encoder is not set"):
        models.preflight("coloc_st", {"encoder": ""})
    # A run that has not reached its last step is not used.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(encoder_run, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps(dict(config, total_steps=5)))
    with pytest.raises(FileNotFoundError) as info:
        read_encoder(unfinished)
    message = str(info.value)
    assert "\n" not in message and "has not finished (checkpoints at steps [3] of 5" in message
    assert f"{command} {unfinished}" in message


def test_the_command_line_names_the_missing_encoder(synthetic_mnist, tmp_path):
    """`experiments.train` of a co-localisation config without its encoder: one line, exit status 1."""
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/colocalisation.py:t,tiny",
                          f"--workdir={tmp_path / 'run'}", f"--config.data.source={synthetic_mnist}",
                          f"--config.model.options.encoder={tmp_path / 'no_encoder'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "no_encoder" in line]
    assert len(lines) == 1 and "configs/colocalisation.py:encoder" in lines[0] and "Traceback" not in out.stderr


def test_importing_registries_imports_no_model_and_no_trainer():
    """The data task and the objective register with their registries; the model imports no trainer (no cycle)."""
    code = ("import sys; import stn_jax.paper.objectives as o, stn_jax.paper.data as d; "
            "assert 'triplet' in o.OBJECTIVES and 'coloc_set' in d.TASKS; "
            "assert not any(m.startswith('stn_jax.paper.models') for m in sys.modules), 'models imported'; "
            "import stn_jax.paper.models as m; assert 'coloc_st' in m.MODELS; "
            "assert not {'stn_jax.paper.train', 'stn_jax.paper.train_state'} & set(sys.modules), 'trainer imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]


def _tiny_config(source: str, encoder: Path, steps: int) -> ml_collections.ConfigDict:
    c = _config_module().get_config("t,3,tiny")
    c.data.source = source
    c.data.test_size = 8
    c.batch_size = c.eval_batch_size = 8
    c.total_steps = steps
    c.log_every = c.eval_every = c.checkpoint_every = 2
    c.model.options.encoder = str(encoder)
    return c


def _frozen(state) -> list[np.ndarray]:
    leaves = jax.tree.leaves(state.model_state)
    return [np.asarray(x) for x in leaves]


def test_tiny_run_encoder_frozen_and_resume(encoder_run, synthetic_mnist, tmp_path):
    from stn_jax.paper import train
    from stn_jax.paper.train_state import setup

    workdir = tmp_path / "run"
    config = _tiny_config(synthetic_mnist, encoder_run, 4)
    result = train.train_and_evaluate(config, workdir)
    assert set(result) >= {"localised", "mean_iou", "loss"} and list(result)[0] == "localised"
    assert 0.0 <= result["localised"] <= 1.0 and np.isfinite(result["loss"])
    # The encoder is not trained: the checkpoint's model_state is bit-identical to the loaded weights,
    # and the optimiser's groups hold no encoder weight; the localisation network did move.
    s = setup(train.resolve(config), cache_dir=str(workdir / "data"))
    frozen_vars = nnx.state(s.merge(s.state.params, s.state.model_state, train=False), Frozen)
    assert len(jax.tree.leaves(frozen_vars)) == 6 and not jax.tree.leaves(s.state.params["main"])
    run = evaluation.open_run(train.resolve(config), workdir)
    manager = checkpoints.checkpoint_manager(workdir, 3, create=False)
    state = checkpoints.restore_latest(run, manager, run.setup.state)
    assert int(state.step) == 4
    for a, b in zip(_frozen(s.state), _frozen(state), strict=True):
        np.testing.assert_array_equal(a, b)
    w = read_encoder(encoder_run)
    np.testing.assert_array_equal(np.asarray(frozen_vars["layers"][1]["conv1_kernel"].get_value()), w["conv1"][0])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s.state.params["loc"]),
                                                       jax.tree.leaves(state.params["loc"]))]
    assert any(moved)
    assert (workdir / "images").is_dir() and any((workdir / "images").iterdir())
    # Resume: a longer run in the same workdir continues from step 4 (the loop's resumption).
    longer = train.train_and_evaluate(_tiny_config(synthetic_mnist, encoder_run, 6), workdir)
    assert set(longer) == set(result)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    # Evaluation of the saved run: the same numbers as the loop's final evaluation.
    again = evaluation.evaluate_checkpoint(_tiny_config(synthetic_mnist, encoder_run, 6), workdir)
    np.testing.assert_allclose(again["localised"], longer["localised"])
    np.testing.assert_allclose(again["loss"], longer["loss"], rtol=1e-5)
    # The picture of the boxes over training (paper Fig. 4): step 0 and every kept checkpoint.
    figure = [sys.executable, "-m", "experiments.coloc_figure", "--images=2"]
    out = subprocess.run([*figure, f"--workdir={workdir}", f"--out={tmp_path / 'steps.png'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(steps [0, 2, 4, 6])" in out.stdout and (tmp_path / "steps.png").stat().st_size > 0
    bad = subprocess.run([*figure, f"--workdir={tmp_path}", f"--out={tmp_path / 'no.png'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 1 and "has no config.json" in bad.stderr


def test_model_options_and_parameter_count(encoder_run):
    m = models.create_model("coloc_st", input_shape=(84, 84, 1), num_classes=10, rngs=nnx.Rngs(0),
                            encoder=str(encoder_run), init_scale=0.4)
    assert m.transform == "attention"
    x = jnp.zeros((2, 84, 84, 1))
    desc, aux = m(x, return_aux=True)
    np.testing.assert_allclose(np.asarray(aux["theta"][0]), [[0.4, 0, 0]] * 2, atol=1e-6)  # the initial crop
    assert aux["warped"][0].shape == (2, 28, 28, 1) and desc.shape == (2, 426)
    assert m.descriptor_sizes == (400, 16, 10)  # 10x10x4, 2x2x4, the logits
    parts = models.create_model("coloc_st", input_shape=(84, 84, 1), num_classes=10, rngs=nnx.Rngs(0),
                                encoder=str(encoder_run), descriptor="logits,hidden2")
    assert parts.descriptor_sizes == (10, 16) and parts(x).shape == (2, 26)
    # Trainable: the localisation network only, the paper's list of layers on 11x11x8 = 968 features:
    # conv 9*9*8 + 8, FC 968*8 + 8, FC 8*8 + 8, FC 8*3 + 3.
    n_train = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    n_loc = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, LocalisationParam)))
    assert n_train == n_loc == 656 + 7752 + 72 + 27 == 8507
    abstract = models.abstract_model("coloc_st", "attention", (84, 84, 1), 10)  # shapes only: no encoder needed
    assert "shapes only" in abstract.summary
    with pytest.raises(ValueError, match="output_size"):
        models.create_model("coloc_st", input_shape=(84, 84, 1), num_classes=10, rngs=nnx.Rngs(0),
                            encoder=str(encoder_run), output_size=20)


# ----------------------------------------------------------------------------
# The crop's range and the localisation network's coverage.
# ----------------------------------------------------------------------------


def _one_sgd_step(st, x, target, lr):
    """One SGD step on the localisation network of ``st`` for ``mean |theta - target|^2``; theta before and after."""
    graphdef, params, rest = nnx.split(st, LocalisationParam, ...)

    def loss(p):
        theta = nnx.merge(graphdef, p, rest).localise(x)
        return jnp.mean(jnp.sum((theta - target) ** 2, -1)), theta

    grads, before = jax.grad(loss, has_aux=True)(params)
    after = loss(jax.tree.map(lambda p, g: p - lr * g, params, grads))[1]
    return np.asarray(before), np.asarray(after), grads


def test_a_crop_pushed_beyond_its_bound_comes_back_when_the_loss_asks():
    from stn_jax.layers import SpatialTransformer
    from stn_jax.paper.models.coloc import ColocBound

    st = SpatialTransformer((20, 20, 1), "attention", output_size=(8, 8), rngs=nnx.Rngs(0),
                            localisation=ColocLocalisation((20, 20, 1), rngs=nnx.Rngs(0)),
                            bound=ColocBound((0.1, 1.2), 0.67))
    # Black images: the localisation features are 0, so theta is the bound applied to the head's bias.
    x = jnp.zeros((2, 20, 20, 1))
    st.head.linear.bias.set_value(jnp.array([1.25, 0.75, -0.75]))      # beyond s <= 1.2 and |t| <= 0.67
    inside = jnp.array([0.5, 0.0, 0.0])
    before, after, _ = _one_sgd_step(st, x, inside, lr=0.1)
    np.testing.assert_allclose(before, [[1.2, 0.67, -0.67]] * 2, atol=1e-6)  # the forward pass clips
    # One step: d loss / d theta = 2 (theta - inside) passes straight to the bias: 1.25 - 0.1 * 1.4, 0.75 - 0.134.
    np.testing.assert_allclose(after, [[1.11, 0.616, -0.616]] * 2, atol=1e-5)
    assert (after[:, 0] < 1.2).all() and (np.abs(after[:, 1:]) < 0.67).all()
    # A loss that pushes further out moves nothing: the raw output does not drift beyond the bound.
    outside = jnp.array([1.5, 0.9, -0.9])
    before, after, grads = _one_sgd_step(st, x, outside, lr=0.1)
    np.testing.assert_array_equal(after, before)
    assert not any(np.any(g) for g in jax.tree.leaves(grads))
    # A sigmoid / tanh range (`stn_jax.layers.Bound`) at the same place (raw 10: s, t within 1e-4 of the bound)
    # passes almost no gradient: its crop stays where it is.
    raw = jnp.array([10.0, 10.0, -10.0])
    squash = lambda r: Bound((0.1, 1.2), 0.67).apply(r, "attention")
    old = jax.grad(lambda r: jnp.sum((squash(r) - inside) ** 2))(raw)
    new = jax.grad(lambda r: jnp.sum((ColocBound((0.1, 1.2), 0.67).apply(r, "attention") - inside) ** 2))(raw)
    np.testing.assert_allclose(np.asarray(new), [1.4, 1.34, -1.34], rtol=1e-5)
    assert np.abs(np.asarray(old)).max() < 1e-4 * np.abs(np.asarray(new)).min()
    # translation -1 keeps the crop inside the image: |t| <= 1 - s.
    theta = ColocBound((0.1, 1.2), -1.0).apply(jnp.array([0.5, 0.9, -0.2]), "attention")
    np.testing.assert_allclose(np.asarray(theta), [0.5, 0.5, -0.2], atol=1e-6)


def test_the_localisation_network_sees_every_input_pixel():
    body = ColocLocalisation((84, 84, 1), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (4, 84, 84, 1))
    assert body.conv(x).shape == (4, 21, 21, 8) and body(x).shape == (4, 8)  # 11 x 11 x 8 = 968 FC inputs
    assert body.fcs[0].in_features == 968
    grad = np.abs(np.asarray(jax.grad(lambda x: body(x).sum())(x))).sum((0, 3))  # (84, 84)
    assert grad[83].sum() > 0 and grad[:, 83].sum() > 0 and grad[83, 83] > 0  # the last row, column, pixel
    assert (grad.sum(1) > 0).all() and (grad.sum(0) > 0).all()  # every row and column
    with pytest.raises(ValueError, match="stride 5 must be between 1 and kernel_size 4"):
        ColocLocalisation((84, 84, 1), kernel_size=4, stride=5, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------
# experiments.coloc_losses: the loss of hand-placed crops.
# ----------------------------------------------------------------------------


def test_coloc_losses_hand_placed_crops(encoder_run, synthetic_mnist, tmp_path):
    from experiments import coloc_losses as L
    from stn_jax.paper.train_state import setup

    config = _tiny_config(synthetic_mnist, encoder_run, 4)
    c = L.variant(config, "hidden2,logits", "per_part", "fixed")
    assert (c.objective.normalize, c.objective.normalize_parts, c.objective.patch_scale) == (False, True, "fixed")
    s = setup(c)
    scores = L.score_crops(s)
    assert list(scores) == list(L.COLUMNS)
    # The untrained model's crops: the objective's own evaluation of the model (its eval step, its crops).
    run = evaluation.Run(s, evaluation.make_mesh(), evaluation.make_eval_step(s), evaluation.make_picture_step(s))
    np.testing.assert_allclose(scores["start"]["loss"], evaluation.evaluate(run, s.state)["loss"], rtol=1e-5)
    np.testing.assert_allclose(scores["start"]["scale"], 0.5, rtol=1e-6)
    # The digit's frame is its box exactly; the empty corner crop misses it; the whole image has IoU 1/9.
    np.testing.assert_allclose(scores["digit frame"]["mean_iou"], 1.0, rtol=1e-5)
    assert scores["empty"]["mean_iou"] == 0.0
    np.testing.assert_allclose(scores["whole image"]["mean_iou"], 1 / 9, rtol=1e-4)
    # The digit frame's loss by hand: crops and fixed patches (s = 1/3) through the model's encoder, each part
    # normalised, every pair m != n.
    model = s.merge(s.state.params, s.state.model_state, train=False)
    data = s.dataset.test_set()
    box, u = np.asarray(data["box"]), np.asarray(data["rand"])
    frame = np.column_stack([(box[:, 2] - box[:, 0]) / 2, (box[:, :2] + box[:, 2:]) / 2])
    np.testing.assert_allclose(frame[:, 0], 28 / 84, rtol=1e-5)
    patches = np.column_stack([np.full(len(u), 1 / 3), (2 * u[:, 1:] - 1) * (1 - 1 / 3)])

    def unit_parts(d):
        d = np.asarray(d, np.float64)
        h2, logits = d[:, :16], d[:, 16:]
        assert logits.shape[1] == 10
        norm = lambda p: np.sqrt(np.sum(p ** 2, 1, keepdims=True) + 1e-12)  # a zero part (dead ReLUs) stays 0
        return np.concatenate([p / norm(p) for p in (h2, logits)], 1)

    t = unit_parts(model.describe_patches(jnp.asarray(data["image"]), jnp.asarray(frame, jnp.float32)))
    r = unit_parts(model.describe_patches(jnp.asarray(data["image"]), jnp.asarray(patches, jnp.float32)))
    n = len(t)
    hinge = [max(0.0, np.sum((t[i] - t[j]) ** 2) - np.sum((t[i] - r[i]) ** 2) + 1.0)
             for i in range(n) for j in range(n) if i != j]
    np.testing.assert_allclose(scores["digit frame"]["loss"], np.mean(hinge), rtol=1e-4)


def test_coloc_losses_command_line_prints_a_row_per_combination(encoder_run, synthetic_mnist, tmp_path):
    from experiments.coloc_losses import COLUMNS

    out = tmp_path / "table.md"
    command = [sys.executable, "-m", "experiments.coloc_losses", "--config=configs/colocalisation.py:t,3,tiny",
               f"--config.data.source={synthetic_mnist}", f"--config.model.options.encoder={encoder_run}",
               "--config.data.test_size=8", "--config.batch_size=8", "--config.eval_batch_size=8",
               "--patch_scales=fixed"]
    variants = ["--descriptors=hidden1,hidden2,logits", "--descriptors=logits", "--normalize=false,per_part"]
    result = subprocess.run([*command, *variants, f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| descriptor | normalize | random patch | digit frame | whole image | empty |")
    assert [r.split(" | ")[:3] for r in rows[1:]] == [
        ["| hidden1+hidden2+logits", "none", "fixed 0.333"], ["| hidden1+hidden2+logits", "per_part", "fixed 0.333"],
        ["| logits", "none", "fixed 0.333"], ["| logits", "per_part", "fixed 0.333"]]
    assert all(len(r.split(" | ")) == 3 + len(COLUMNS) for r in rows[1:])
    assert out.read_text().strip() == result.stdout.strip()
    bad = subprocess.run([*command, "--normalize=sideways"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert bad.returncode == 1 and "unknown normalisation 'sideways'" in bad.stderr

