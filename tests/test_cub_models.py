"""The CUB models and configs (paper Sect. 4.3, Table 3): every variant builds, the transformers start on
distinct parts with the fixed scale, and a tiny run trains and resumes with its BatchNorm statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cub as cub_config
from stn_jax.layers import LocalisationParam, count_params
from stn_jax.paper import models
from stn_jax.paper.config import resolve
from stn_jax.paper.models.cub import INITIAL_CENTRES

# BN-Inception's 5-copy models take a minute to build even abstractly on 2 cores: slow.
VARIANTS = [pytest.param(b, r, marks=[pytest.mark.slow] if b == "inception_bn" else [])
            for b in cub_config.BACKBONES for r in cub_config.ROWS]


@pytest.mark.parametrize("backbone,row", VARIANTS)
def test_every_variant_resolves_and_builds(backbone, row):
    config = resolve(cub_config.get_config(f"{backbone},{row}"))
    name, transform, size = cub_config.ROWS[row]
    assert (config.model.name, config.model.transform, config.data.image_size) == (name, transform, size)
    options = dict(config.model.options.to_dict(), pretrained="")  # abstract build: no weights file needed
    model = models.abstract_model(name, transform or None, (size, size, 3), 30, **options)
    n = {"cub_cnn": 0, "cub_st2": 2, "cub_st4": 4}[name]
    features = {"efficientnet_lite0": 1280, "inception_bn": 1024}[backbone]
    # The backbone alone: 3,371,008 (Lite0) / 10,270,240 (BN-Inception) parameters without a classifier.
    backbone_params = {"efficientnet_lite0": 3_371_008, "inception_bn": 10_270_240}[backbone]
    head = (max(n, 1) * features + 1) * 30
    loc = 0 if n == 0 else backbone_params + (features * 128 + 128) + (7 * 7 * 128 * 128 + 128) + (128 * 2 * n + 2 * n)
    assert count_params(model) == (max(n, 1) * backbone_params) + head + loc
    assert count_params(model, LocalisationParam) == loc


@pytest.mark.slow
def test_transformers_start_on_distinct_parts_with_the_fixed_scale():
    model = models.create_model("cub_st4", transform="attention", input_shape=(64, 64, 3), num_classes=3,
                                rngs=nnx.Rngs(params=0, dropout=0), crop_size=32)
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3), np.float32))
    logits, aux = nnx.jit(lambda m, x: m(x, return_aux=True))(model, x)
    assert logits.shape == (2, 3)
    thetas = np.stack([np.asarray(t) for t in aux["theta"]], 1)  # (B, N, 3)
    np.testing.assert_array_equal(thetas[..., 0], 0.5)
    np.testing.assert_array_equal(thetas[0, :, 1:], np.asarray(INITIAL_CENTRES[4], np.float32))
    # Crop k is the quadrant around its centre: half the side, 32 px -> 32 px (pixel-exact at this size).
    np.testing.assert_allclose(aux["warped"][0][:, 8:24, 8:24], x[:, 8:24, 8:24], atol=1e-6)
    np.testing.assert_allclose(aux["warped"][3][:, 8:24, 8:24], x[:, 40:56, 40:56], atol=1e-6)


def test_bad_options_are_refused():
    kw = dict(transform="attention", input_shape=(64, 64, 3), num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="backbone must be one of"):
        models.abstract_model("cub_st2", "attention", (64, 64, 3), 3, backbone="resnet", crop_size=32)
    with pytest.raises(ValueError, match="multiple of crop_size"):
        models.create_model("cub_st2", **{**kw, "input_shape": (60, 60, 3)}, crop_size=32)
    with pytest.raises(ValueError, match="unknown config argument|config argument must be"):
        cub_config.get_config("efficientnet_lite0,st3_448")


def test_missing_pretrained_file_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="bn_inception-52deb4733.pth"):
        models.abstract_model("cub_cnn", None, (64, 64, 3), 3, backbone="inception_bn", pretrained="imagenet")


@pytest.fixture(scope="module")
def generated_cub(tmp_path_factory):
    from test_cub_data import write_fake_cub

    return write_fake_cub(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the three runs of a variant compile its steps once."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("xla_cache")), 0, 0)):
        jax.config.update(k, v)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


@pytest.mark.slow  # each variant compiles a train and an evaluation step of one to two backbones: minutes on 2 cores
@pytest.mark.parametrize("backbone,row", [(b, r) for b in cub_config.BACKBONES for r in cub_config.ROWS])
def test_every_tiny_variant_trains_and_resumes_bit_identically(backbone, row, generated_cub, compilation_cache,
                                                              tmp_path):
    """configs/cub.py ``<backbone>,<row>,tiny`` (random weights, 64 px) on a generated folder: 2 steps in one go
    equal 1 step, a stop and a resumed step, parameters and BatchNorm statistics (of every part network) alike."""
    from stn_jax.paper import checkpoints, evaluation, train

    config = cub_config.get_config(f"{backbone},{row},tiny")
    config.data.source = str(generated_cub)
    config.data.cache_dir = str(tmp_path / "cache")
    train.train_and_evaluate(config, tmp_path / "straight")
    config.total_steps = 1
    train.train_and_evaluate(config, tmp_path / "resumed")
    config.total_steps = 2
    train.train_and_evaluate(config, tmp_path / "resumed")

    def final_state(workdir):
        run = evaluation.open_run(resolve(config), workdir)
        return checkpoints.restore_latest(run, checkpoints.checkpoint_manager(workdir, 3, create=False),
                                          run.setup.state)

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert int(a.step) == int(b.step) == 2
    stats = jax.tree.leaves(a.model_state)
    assert stats, "the CUB model has BatchNorm statistics"
    for x, y in zip(jax.tree.leaves((a.params, a.model_state)), jax.tree.leaves((b.params, b.model_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_parameter_groups_put_backbones_loc_and_head_apart():
    """The pretrained part networks are group ``backbone``, the localisation network (its own backbone copy
    included) ``loc``, the classifier ``main``."""
    from stn_jax.paper import train_state

    model = models.abstract_model("cub_st2", "attention", (64, 64, 3), 3, crop_size=32)
    _, params, _, _ = train_state.split_model(model)
    labels = train_state.param_labels(params, model.backbone_attributes)
    counts = {g: sum(int(np.prod(p.shape)) for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
                     if label == g) for g in train_state.GROUPS}
    assert counts == {"backbone": 2 * 3_371_008,  # two EfficientNet-Lite0 part networks without classifiers
                      "main": (2 * 1280 + 1) * 3, "loc": count_params(model, LocalisationParam)}
    assert models.cub.CubCNN.backbone_attributes == ("backbone",)


@pytest.mark.parametrize("mode", ["frozen", "folded", "train"])
def test_batch_norm_mode_decides_whether_training_uses_and_updates_batch_statistics(mode):
    """``model.train()`` of a CUB model: every BatchNorm on running statistics when frozen (dropout still
    trains); a forward pass in training mode then leaves the statistics as they are, and updates them when
    not frozen. ``model.eval()`` uses running statistics in both modes."""
    from stn_jax.paper.models.cub import _BatchNormMode

    model = models.abstract_model("cub_cnn", None, (32, 32, 3), 3, batch_norm=mode)
    model.train()
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert len(norms) == 49 and all(m.use_running_average == (mode != "train") for m in norms)
    assert not model.dropout.deterministic
    model.eval()
    assert all(m.use_running_average for m in norms)

    class Small(_BatchNormMode):  # the same switch on one BatchNorm, to run it
        def __init__(self):
            self.batch_norm = mode
            self.norm = nnx.BatchNorm(2, rngs=nnx.Rngs(0))

    small = Small()
    small.train()
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (8, 2)), jnp.float32)
    y = small.norm(x)
    changed = not np.array_equal(np.asarray(small.norm.mean[...]), np.zeros(2))
    assert changed == (mode == "train")
    if mode != "train":  # running statistics (0, 1): the identity up to epsilon
        np.testing.assert_allclose(y, x / np.sqrt(1 + small.norm.epsilon), rtol=1e-6)
    with pytest.raises(ValueError, match="batch_norm must be one of train, frozen, folded"):
        models.abstract_model("cub_cnn", None, (32, 32, 3), 3, batch_norm="eval")


def _bad_weights(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 not a zip archive" + bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize("kind,message", [("directory", "is a directory, not a file"),
                                          ("empty", r"is empty \(0 bytes\)"),
                                          ("corrupt", "is not a readable PyTorch state dict"),
                                          ("absent", "not found")])
def test_a_bad_weights_file_is_one_line_before_any_data_is_cached(tmp_path, generated_cub, kind, message):
    """``--config.model.options.pretrained`` naming a directory, an empty, corrupt or absent file fails in one
    line naming it, before the data set's resize cache is built."""
    from stn_jax.paper.train_state import setup

    if kind == "corrupt":
        pytest.importorskip("torch", reason="reading a .pth file needs PyTorch (the CUB weights are PyTorch files)")
    path = _bad_weights(tmp_path, kind)
    config = cub_config.get_config("efficientnet_lite0,cnn224,tiny")
    config.model.options.pretrained = str(path)
    config.data.source = str(generated_cub)
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        setup(resolve(config))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # compiles a Lite0 training step: a minute or two on 2 cores
def test_feature_drift_tool_reports_gains_batch_statistics_and_each_fifth_step(generated_cub, tmp_path):
    """`experiments.cub_feature_drift` on the tiny (random-weight, 64 px) CNN of a generated folder."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "experiments.cub_feature_drift",
                          "--config=configs/cub.py:efficientnet_lite0,cnn224,tiny",
                          f"--config.data.source={generated_cub}",
                          f"--config.data.cache_dir={tmp_path}", "--config.batch_size=2", "--steps=5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("BatchNorm gains over 21008 channels: median ")
    n = len([line for line in (generated_cub / "train_test_split.txt").read_text().splitlines()
             if line.endswith(" 1")]) - 1  # class 4's training image is listed but absent
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "features with batches of 2 vs running statistics", f"features with batches of 2 vs one batch of {n}",
        f"features with one batch of {n} vs running statistics"], lines
    assert lines[4].startswith("step 5: loss ") and "constant features" in lines[4]
