"""The linear probe (`stn_jax.paper.probe`, `experiments.linear_probe`) and the crop summary of
`experiments.cub_crops`: exact gradients, a separable problem solved, the penalty chosen on the training set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
from conftest import ROOT

from experiments import cub_crops
from stn_jax.paper import probe


def blobs(n_per_class: int, classes: int, features: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, features))
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, features)) for c in centres])
    return x, np.repeat(np.arange(classes), n_per_class)


def test_loss_gradient_matches_finite_differences():
    x, y = blobs(5, 3, 4, 1.0, 0)
    w = np.random.default_rng(1).normal(size=4 * 3 + 3)
    error = scipy.optimize.check_grad(lambda v: probe._loss_and_grad(v, x, y, 3, 0.1)[0],
                                      lambda v: probe._loss_and_grad(v, x, y, 3, 0.1)[1], w)
    assert error < 1e-5


def test_fit_separates_blobs_and_the_penalty_shrinks_the_weights():
    x, y = blobs(30, 4, 6, 0.5, 2)
    strong, weak = probe.fit(x, y, 4, 1.0), probe.fit(x, y, 4, 1e-3)
    assert weak.evaluate(x, y)["error"] == 0.0
    assert np.linalg.norm(strong.weights) < np.linalg.norm(weak.weights)
    assert weak.evaluate(x, y)["loss"] < strong.evaluate(x, y)["loss"] < np.log(4)


def test_choose_l2_takes_the_best_cross_validated_value_of_the_grid():
    x, y = blobs(20, 3, 50, 4.0, 3)  # few examples, many noisy features: some penalty helps
    best, scores = probe.choose_l2(x, y, 3, grid=(1e-4, 1.0), folds=4)
    assert set(scores) == {1e-4, 1.0} and best == max(scores, key=lambda k: (scores[k], k))
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_crop_summary_measures_the_shift_from_the_initial_centres():
    # Two transformers over three images: the first stays on its start (0, -0.5), the second moves by (0.3, 0.4).
    theta = np.zeros((2, 3, 3))
    theta[..., 0] = 0.5
    theta[0, :, 1:] = (0.0, -0.5)
    theta[1, :, 1:] = (0.3, 0.9)
    summary = cub_crops.summarise(theta)
    assert summary["initial_centre"] == [[0.0, -0.5], [0.0, 0.5]]
    assert summary["mean_abs_shift"] == [0.0, 0.5] and summary["centre_std_over_images"] == [0.0, 0.0]


@pytest.mark.slow  # compiles an EfficientNet-Lite0 forward pass in a subprocess: about a minute on 2 cores
def test_linear_probe_runs_end_to_end_on_a_generated_folder(tmp_path):
    """The command on a generated CUB folder (random backbone weights, 64 px): its result line and record."""
    from test_cub_data import write_fake_cub

    source = write_fake_cub(tmp_path / "cub")
    workdir = tmp_path / "probe"
    out = subprocess.run([sys.executable, "-m", "experiments.linear_probe",
                          "--config=configs/cub.py:efficientnet_lite0,cnn224,tiny", f"--workdir={workdir}",
                          f"--config.data.source={source}", f"--config.data.cache_dir={tmp_path / 'cache'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("test_error=")
    record = json.loads((workdir / "metrics.jsonl").read_text())
    assert record["l2"] in probe.L2_GRID and 0.0 <= record["test_error"] <= 1.0
    assert (workdir / "features.npz").exists() and (workdir / "versions.json").exists()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "experiments.linear_probe",
                        "--config=configs/cub.py:efficientnet_lite0,st2_224,tiny", f"--workdir={tmp_path / 'x'}",
                        f"--config.data.source={source}"], cwd=ROOT, check=True, capture_output=True, text=True)


def test_raw_head_gives_the_probes_logits_and_starts_a_part_model_classifier(tmp_path):
    """``head.npz`` acts on raw features exactly as the probe on standardised ones; a model with N parts
    starts its classifier so that its logits are the mean of the probe's logits on the parts."""
    from flax import nnx

    from stn_jax.paper.models.cub import _start_head, read_head

    x, y = blobs(10, 3, 5, 1.0, 4)
    fitted = probe.fit(x, y, 3, 0.1)
    kernel, bias = fitted.raw_head()
    np.testing.assert_allclose(x @ kernel + bias, fitted.logits(x), rtol=1e-9, atol=1e-9)
    fitted.save_head(tmp_path / "head.npz", [7, 8, 9])
    assert read_head(tmp_path / "head.npz")["class_ids"].tolist() == [7, 8, 9]
    fc = nnx.Linear(2 * 5, 3, rngs=nnx.Rngs(0))
    _start_head(fc, tmp_path / "head.npz", 2, 3)
    a, b = x[:4], x[4:8]
    expected = (fitted.logits(a) + fitted.logits(b)) / 2
    np.testing.assert_allclose(np.asarray(fc(np.concatenate([a, b], 1).astype(np.float32))), expected, atol=1e-4)
    with pytest.raises(ValueError, match="holds a head for 5 features and 3 classes"):
        _start_head(nnx.Linear(6, 3, rngs=nnx.Rngs(0)), tmp_path / "head.npz", 1, 3)
    with pytest.raises(FileNotFoundError, match="write it with python -m experiments.linear_probe"):
        read_head(tmp_path / "absent.npz")
    np.savez(tmp_path / "odd.npz", kernel=np.zeros((5, 3)), bias=np.zeros(2), class_ids=np.zeros(3))
    with pytest.raises(ValueError, match="do not describe one classifier"):
        read_head(tmp_path / "odd.npz")


def _sgd_config(learning_rate: float, boundaries=()):
    import ml_collections
    return ml_collections.ConfigDict(dict(name="sgd", learning_rate=learning_rate, momentum=0.9, nesterov=False,
                                          weight_decay=1e-3, decay_boundaries=boundaries, decay_factor=0.1,
                                          backbone_lr_multiplier=1.0, loc_lr_multiplier=1.0))


def test_recipe_classifier_takes_the_configs_sgd_step():
    """One full-batch step without dropout from a given head: ``W - lr (dL/dW + wd W)`` with the mean
    cross-entropy's gradient computed by hand (the first momentum step is the gradient itself)."""
    x, y = blobs(4, 3, 5, 1.0, 3)
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(5, 3)), rng.normal(size=3)
    got_k, got_b = probe.recipe_classifier(x, y, 3, _sgd_config(0.5), steps=1, batch_size=len(y), dropout=0.0,
                                           start=(kernel, bias))
    z = x @ kernel + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    np.testing.assert_allclose(got_k, kernel - 0.5 * (x.T @ p + 1e-3 * kernel), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, bias - 0.5 * (p.sum(0) + 1e-3 * bias), rtol=1e-5, atol=1e-6)


def test_recipe_classifier_learns_blobs_with_dropout_and_a_rate_drop():
    x, y = blobs(20, 4, 8, 0.5, 5)
    kernel, bias = probe.recipe_classifier(x, y, 4, _sgd_config(0.05, (60,)), steps=120, batch_size=8,
                                           dropout=0.5, seed=1)
    assert probe.head_error(kernel, bias, x, y) == 0.0
    assert probe.head_error(*probe.recipe_classifier(x, y, 4, _sgd_config(0.0), steps=5, batch_size=8,
                                                     dropout=0.5, seed=1), x, y) > 0.25  # the random start
