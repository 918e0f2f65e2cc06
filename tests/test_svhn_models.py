"""SVHN multi-digit models (paper Sect. 4.2, A.5), the ``sequence`` objective and configs/svhn.py.

Fast: shapes and counts on abstract models, identity checks at tiny widths, one 2-step training run.
Run: ``python -m pytest -p no:xdist tests/test_svhn_models.py -q``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_synthetic_mnist
from flax import nnx

from stn_jax.layers import LocalisationParam, count_params
from stn_jax.paper import models
from stn_jax.paper.objectives import create_objective

NAMES = (("svhn_cnn", None), ("svhn_st_single", "affine"), ("svhn_st_multi", "affine"))
N_ST = {"svhn_cnn": 0, "svhn_st_single": 1, "svhn_st_multi": 4}


def _conv(cin, cout, k=5):
    return k * k * cin * cout + cout


def _fc(a, b):
    return a * b + b


def hand_count_cnn(size: int) -> int:
    """The baseline's parameters from the A.5 layer list, by hand (3 input channels, 11 classes)."""
    widths = [3, 48, 64, 128, 160, 192, 192, 192, 192]
    convs = sum(_conv(a, b) for a, b in zip(widths[:-1], widths[1:]))
    flat = (size // 16) * (size // 16) * 192        # four 2x2 max-pools
    return convs + _fc(flat, 3072) + _fc(3072, 3072) + 5 * _fc(3072, 11)


def test_registered_with_paper_numbers():
    for name, transform in NAMES:
        spec = models.MODELS.get(name)
        assert set(spec.tasks) == {"svhn", "svhn_synth"}
        assert set(spec.paper) == {("svhn64", transform or ""), ("svhn128", transform or "")}
    assert models.MODELS.get("svhn_cnn").paper[("svhn128", "")] == 5.6
    assert models.MODELS.get("svhn_st_multi").paper[("svhn64", "affine")] == 3.6


@pytest.mark.parametrize("size", (64, 128))
@pytest.mark.parametrize("name,transform", NAMES)
def test_builds_and_output_shapes(name, transform, size):
    model = models.abstract_model(name, transform, (size, size, 3), 11)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits, aux = nnx.eval_shape(lambda m, x: m(x, return_aux=True), model, x)
    assert logits.shape == (2, 5, 11)
    assert [t.shape for t in aux["theta"]] == [(2, 6)] * N_ST[name]
    total, loc = count_params(model), count_params(model, LocalisationParam)
    print(f"{name} {size}px: {total:,} parameters ({loc:,} localisation)")
    assert (loc > 0) == (transform is not None)
    assert model.summary.startswith(model.display_name)


def test_parameter_counts_at_width_one():
    assert count_params(models.abstract_model("svhn_cnn", None, (64, 64, 3), 11)) == hand_count_cnn(64) == 23_380_695
    assert count_params(models.abstract_model("svhn_cnn", None, (128, 128, 3), 11)) == hand_count_cnn(128)
    # ST-CNN Single localisation (A.5 [S]): conv 32@5x5 same - max-pool 2 - conv 32@5x5 same - FC 32 - FC 6.
    single = models.abstract_model("svhn_st_single", "affine", (64, 64, 3), 11)
    loc = _conv(3, 32) + _conv(32, 32) + _fc(32 * 32 * 32, 32) + _fc(32, 6)
    assert count_params(single, LocalisationParam) == loc == 1_076_870
    assert count_params(single) == hand_count_cnn(64) + loc
    # ST-CNN Multi: FC 32 - FC 32 - FC 6 on the flattened inputs of conv 1-4.
    multi = models.abstract_model("svhn_st_multi", "affine", (64, 64, 3), 11)
    loc = sum(_fc(n, 32) + _fc(32, 32) + _fc(32, 6) for n in (64 * 64 * 3, 32 * 32 * 48, 32 * 32 * 64, 16 * 16 * 128))
    assert count_params(multi, LocalisationParam) == loc
    assert count_params(multi) == hand_count_cnn(64) + loc


def test_width_multiplier_and_extra_fc():
    small = models.abstract_model("svhn_cnn", None, (64, 64, 3), 11, width_multiplier=0.25)
    widths = [3, 12, 16, 32, 40, 48, 48, 48, 48]
    expected = (sum(_conv(a, b) for a, b in zip(widths[:-1], widths[1:])) + _fc(16 * 48, 768) + _fc(768, 768)
                + 5 * _fc(768, 11))
    assert count_params(small) == expected
    eleven = models.abstract_model("svhn_cnn", None, (64, 64, 3), 11, fc=(3072, 3072, 3072))
    assert count_params(eleven) == hand_count_cnn(64) + _fc(3072, 3072)


def test_transformers_start_at_the_identity():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    for name in ("svhn_st_single", "svhn_st_multi"):
        model = models.create_model(name, transform="affine", input_shape=(32, 32, 3), num_classes=11,
                                    rngs=nnx.Rngs(params=0, dropout=0), width_multiplier=0.125)
        model.eval()
        logits, aux = model(x, return_aux=True)
        assert logits.shape == (2, 5, 11) and np.isfinite(np.asarray(logits)).all()
        identity = np.array([1, 0, 0, 0, 1, 0], np.float32)
        for theta in aux["theta"]:
            np.testing.assert_allclose(np.asarray(theta), np.broadcast_to(identity, theta.shape), atol=1e-6)
        np.testing.assert_allclose(np.asarray(aux["warped"][0]), np.asarray(x), atol=1e-5)
        assert float(aux["identity_penalty"]) == pytest.approx(0.0, abs=1e-10)


def test_dropout_only_in_training_mode():
    x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
    model = models.create_model("svhn_cnn", input_shape=(32, 32, 3), num_classes=11,
                                rngs=nnx.Rngs(params=0, dropout=0), width_multiplier=0.125)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    model.train()
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x)))


class _FixedModel:
    """Stands in for a model: returns the given logits."""

    def __init__(self, logits):
        self.logits = jnp.asarray(logits)

    def __call__(self, x, *, return_aux=False):
        if not return_aux:
            return self.logits
        return self.logits, {"theta": [], "warped": [], "identity_penalty": jnp.zeros(())}


def test_sequence_objective_by_hand():
    labels = np.array([[1, 2, 10, 10, 10], [3, 4, 5, 10, 10]], np.int32)
    logits = np.zeros((2, 5, 11), np.float32)
    for b in range(2):
        for p in range(5):
            logits[b, p, labels[b, p]] = 2.0
    logits[1, 3, 10], logits[1, 3, 7] = 0.0, 2.0      # example 1 gets position 3 wrong (7 instead of "no digit")
    objective = create_objective({"name": "sequence"})
    right = -math.log(math.exp(2) / (math.exp(2) + 10))   # the true class has logit 2, the other 10 have 0
    wrong = -math.log(1 / (math.exp(2) + 10))             # the true class has logit 0, another has 2
    expected = (5 * right + (4 * right + wrong)) / 2
    loss, metrics = objective.loss(_FixedModel(logits), {"image": jnp.zeros((2, 8, 8, 3)), "label": labels})
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["error"]) == pytest.approx(0.5)
    assert float(metrics["position_error"]) == pytest.approx(0.1)
    batch = {"image": jnp.zeros((2, 8, 8, 3)), "label": labels, "mask": jnp.array([1.0, 1.0])}
    summary = objective.summarize({k: float(v) for k, v in objective.eval_sums(_FixedModel(logits), batch).items()})
    assert list(summary)[0] == objective.headline == "error"
    assert summary["error"] == pytest.approx(0.5)
    assert summary["position_error"] == pytest.approx(0.1)
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)
    batch["mask"] = jnp.array([1.0, 0.0])             # the wrong number is padding: not counted
    sums = objective.eval_sums(_FixedModel(logits), batch)
    assert float(sums["count"]) == 1.0 and float(sums["errors"]) == 0.0
    assert float(sums["loss"]) == pytest.approx(5 * right, rel=1e-5)


def test_config_variants():
    from configs import svhn
    c = svhn.get_config("st_multi,64")
    assert (c.model.name, c.model.transform, c.data.task, c.data.image_size) == ("svhn_st_multi", "affine", "svhn", 64)
    assert (c.batch_size, c.total_steps) == (128, 400_000)
    assert c.optimizer.decay_boundaries == (80_000, 160_000, 240_000, 320_000)
    assert c.optimizer.loc_lr_multiplier == 0.1 and c.optimizer.weight_decay == 5e-4
    assert c.objective.name == "sequence"
    c = svhn.get_config("cnn,128,synthetic")
    assert (c.model.name, c.model.transform, c.data.task, c.data.image_size) == ("svhn_cnn", "", "svhn_synth", 128)
    c = svhn.get_config("st_single,64,tiny")
    assert c.data.task == "svhn_synth" and c.model.options.width_multiplier == 0.125 and c.total_steps == 60
    for bad in ("st_multi", "st_multi,96", "nope,64", "cnn,64,real"):
        with pytest.raises(ValueError):
            svhn.get_config(bad)


def _tiny_config(tmp_path, **options):
    from configs import svhn
    source = write_synthetic_mnist(tmp_path / "mnist", train=100, test=40)
    c = svhn.get_config("st_single,64,tiny")
    c.data.source = str(source)
    c.data.test_size = 16
    c.total_steps = 2
    c.batch_size = 8
    c.eval_batch_size = 16
    c.log_every = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.optimizer.decay_boundaries = (1,)
    for key, value in options.items():
        c.model.options[key] = value
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/svhn.py 'st_single,64,tiny' on synthetic house numbers, 2 steps: (config, workdir, result)."""
    from stn_jax.paper import train
    folder = tmp_path_factory.mktemp("svhn_tiny")
    config = _tiny_config(folder)
    return config, folder / "run", train.train_and_evaluate(config, folder / "run")


def test_tiny_training_run(tiny_run):
    """End to end: configs/svhn.py 'st_single,64,tiny' on synthetic house numbers, 2 steps, with dropout."""
    _, _, result = tiny_run
    print(f"tiny ST-CNN Single, 2 steps: sequence error {result['error']:.3f}, "
          f"position error {result['position_error']:.3f}, loss {result['loss']:.3f}")
    assert list(result)[0] == "error"
    assert 0.0 <= result["error"] <= 1.0 and 0.0 <= result["position_error"] <= result["error"] + 1e-9
    assert np.isfinite(result["loss"])


def test_evaluate_scores_own_house_numbers(tiny_run, tmp_path):
    """``--config.data.test_npz`` for a house-number model: images (N, 64, 64, 3), labels (N, 5) with 10 = no
    digit; checked like MNIST's (a label of 11 is refused in one line)."""
    from stn_jax.paper import evaluation

    config, workdir, _ = tiny_run
    rng = np.random.default_rng(0)
    labels = np.full((6, 5), 10)
    labels[:, :2] = rng.integers(0, 10, (6, 2))
    np.savez(tmp_path / "numbers.npz", images=rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8), labels=labels)
    mine = config.copy_and_resolve_references()
    mine.data.test_npz = str(tmp_path / "numbers.npz")
    result = evaluation.evaluate_checkpoint(mine, workdir)
    assert 0.0 <= result["error"] <= 1.0 and np.isfinite(result["loss"])
    np.savez(tmp_path / "eleven.npz", images=np.zeros((2, 64, 64, 3), np.uint8), labels=np.full((2, 5), 11))
    mine.data.test_npz = str(tmp_path / "eleven.npz")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\) for this model"):
        evaluation.evaluate_checkpoint(mine, workdir)


def test_relu_layers_start_with_he_initialisation_scaled_for_dropout():
    """Conv and hidden FC kernels have std sqrt(2 keep / fan_in) (He et al.) and the heads sqrt(keep / fan_in)
    (LeCun), where keep is the keep probability of the dropout on the layer's input (0.5 after conv 2, 1 for
    conv 1 and 2); ``dropout_init=False`` gives the unscaled He / LeCun initialisation."""
    from stn_jax.paper.models import svhn

    for dropout_init in (True, False):
        model = models.create_model("svhn_cnn", input_shape=(64, 64, 3), num_classes=11, rngs=nnx.Rngs(0),
                                    width_multiplier=0.25, dropout_init=dropout_init)
        layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, (svhn.ConvBlock, svhn.DenseBlock,
                                                                        svhn.DigitHeads))]
        layers.sort(key=lambda m: model.layers.index(m))
        assert len(layers) == 11
        for i, layer in enumerate(layers):
            kernel = np.asarray((layer.conv if isinstance(layer, svhn.ConvBlock) else layer.linear).kernel[...])
            gain = 1.0 if isinstance(layer, svhn.DigitHeads) else 2.0
            keep = 0.5 if dropout_init and i >= 2 else 1.0
            fan_in = math.prod(kernel.shape[:-1])
            assert kernel.std() == pytest.approx(math.sqrt(gain * keep / fan_in), rel=0.1), (i, kernel.shape)


def test_dropout_init_keeps_the_training_signal_scale():
    """In training mode, inverted dropout 0.5 on nine layers' outputs multiplies the signal's second moment
    by about 2 per layer: with plain He initialisation the logits come out tens of times larger than the
    first layer's output (a saturated softmax and a first step that kills most ReLUs); scaled for the
    dropout they stay within a small factor of it."""
    x = jax.random.uniform(jax.random.key(0), (16, 64, 64, 3))
    ratios = {}
    for dropout_init in (True, False):
        model = models.create_model("svhn_cnn", input_shape=(64, 64, 3), num_classes=11,
                                    rngs=nnx.Rngs(0, dropout=1), width_multiplier=0.25, dropout_init=dropout_init)
        model.train()
        first = model.layers[1](model.layers[0](x))     # minus the mean -> conv 1 (no dropout)
        rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))  # noqa: E731
        ratios[dropout_init] = rms(model(x)) / rms(first)
    assert ratios[False] > 10, ratios
    assert ratios[True] < 4, ratios
