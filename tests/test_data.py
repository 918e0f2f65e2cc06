"""MNIST-family data: sources, distortions, determinism, sharding, fixed test sets, configs.

Uses the real MNIST files in ``../shared/data/mnist`` (the four original IDX
files); a missing folder fails the tests that need it, with a message. Never
uses the network. Small batches (8) and test sets (8) keep compilation to one
per task.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stn_jax.data import (TASKS, MnistSourceError, canonical_order, default_config, distortions as D, load_mnist,
                          load_tfds_mnist, make_dataset, network_available)
from stn_jax.data import mnist as mnist_lib
from stn_jax.data.pipeline import _resolve

from conftest import MNIST_DIR, MNIST_FILES as FILES, ROOT

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
BATCH = 8


def dataset(mnist_dir, task, batch=BATCH, **options):
    kwargs = {k: options.pop(k) for k in ("seed", "process_index", "process_count", "cache_dir") if k in options}
    config = {"task": task, "source": mnist_dir, "test_size": batch, **options}
    return make_dataset(config, seed=kwargs.pop("seed", 0), global_batch_size=batch, **kwargs)


# ----------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------


def test_idx_folder_reads_mnist(mnist_dir):
    x, y = load_mnist(mnist_dir, "train")
    assert x.shape == (60_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60_000,) and np.bincount(y).tolist() == TRAIN_COUNTS
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    xt, yt = load_mnist(mnist_dir, "test")
    assert xt.shape == (10_000, 28, 28) and np.bincount(yt).tolist() == TEST_COUNTS
    assert 0 < x.mean() < 255 and x.max() == 255


def test_missing_folder_and_file_errors(tmp_path, mnist_dir):
    with pytest.raises(MnistSourceError, match="does not exist.*How to get MNIST"):
        load_mnist(str(tmp_path / "nowhere"), "train")
    for name in FILES[:3]:
        (tmp_path / name).symlink_to(Path(mnist_dir) / name)
    with pytest.raises(MnistSourceError, match="t10k-labels-idx1-ubyte.gz is missing.*--config.data.source"):
        load_mnist(str(tmp_path), "train")


@pytest.mark.parametrize("damage", ["truncated_gzip", "bad_magic", "short_body"])
def test_corrupt_file_error_names_the_file(tmp_path, mnist_dir, damage):
    for name in FILES:
        (tmp_path / name).symlink_to(Path(mnist_dir) / name)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    target.unlink()
    raw = gzip.decompress((Path(mnist_dir) / target.name).read_bytes())
    if damage == "truncated_gzip":
        target.write_bytes(gzip.compress(raw)[:-20])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))
    else:
        target.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(MnistSourceError, match=r"t10k-labels-idx1-ubyte\.gz.*(corrupt|unreadable).*How to get"):
        load_mnist(str(tmp_path), "test")


def test_tfds_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_lib, "network_available", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(MnistSourceError) as info:
        load_mnist("tfds", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "--config.data.source=/path/to/mnist" in message and "tfds_manual_dir" in message
    with pytest.raises(MnistSourceError, match="train-images-idx3-ubyte.gz is missing from the tfds manual folder"):
        load_mnist("tfds", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path))


def test_network_check_is_bounded():
    start = time.monotonic()
    assert network_available("192.0.2.1", 9, timeout=0.5) is False  # TEST-NET-1: never answers
    assert time.monotonic() - start < 2.5


def _pairs(images, labels) -> set:
    return set(zip(map(bytes, images.reshape(len(images), -1)), np.asarray(labels).tolist()))


def test_tfds_manual_dir_is_mnist(tmp_path, mnist_dir):
    """The real tfds path, offline: tfds verifies the four files and prepares (the first 300 per split)."""
    x, y = load_tfds_mnist("test", data_dir=str(tmp_path), manual_dir=mnist_dir, max_examples_per_split=300)
    assert x.shape == (300, 28, 28) and x.dtype == np.uint8 and y.shape == (300,)
    xi, yi = load_mnist(mnist_dir, "test")
    assert _pairs(x, y) == _pairs(xi[:300], yi[:300])  # the first 300 of the file, in tfds' shuffled order
    assert not np.array_equal(y, yi[:300])


@pytest.mark.slow
def test_tfds_full_prepare_equals_idx(tmp_path, mnist_dir):
    """Preparing all of MNIST through tfds (~30-40 s) gives the IDX data exactly, as sets and in canonical order."""
    for split in ("train", "test"):
        x, y = load_mnist("tfds", split, data_dir=str(tmp_path), manual_dir=mnist_dir)
        xi, yi = load_mnist(mnist_dir, split)
        assert np.bincount(y).tolist() == np.bincount(yi).tolist()
        a, b = canonical_order(x, y), canonical_order(xi, yi)
        np.testing.assert_array_equal(x[a], xi[b])
        np.testing.assert_array_equal(y[a], yi[b])
    # So both sources give the same data sets, batch for batch.
    via_tfds = make_dataset({"task": "rts", "source": "tfds", "tfds_data_dir": str(tmp_path), "test_size": BATCH},
                            seed=0, global_batch_size=BATCH)
    assert_batches_equal(via_tfds.train_batch(3), dataset(mnist_dir, "rts").train_batch(3))
    assert_batches_equal(via_tfds.test_set(), dataset(mnist_dir, "rts").test_set())


def test_canonical_order_is_source_independent(mnist_dir):
    x, y = load_mnist(mnist_dir, "test")
    perm = np.random.default_rng(0).permutation(len(y))
    a, b = canonical_order(x, y), canonical_order(x[perm], y[perm])
    np.testing.assert_array_equal(x[a], x[perm][b])
    np.testing.assert_array_equal(y[a], y[perm][b])


# ----------------------------------------------------------------------------
# Every variant: shapes, dtypes, ranges, the fixed test set.
# ----------------------------------------------------------------------------

SHAPES = {"r": (28, 28, 1), "rts": (42, 42, 1), "p": (28, 28, 1), "e": (28, 28, 1), "tc": (60, 60, 1),
          "addition": (42, 42, 2), "mnist3d": (60, 60, 60, 1), "coloc": (84, 84, 1)}


@pytest.mark.parametrize("task", TASKS)
def test_variant_shapes_dtypes_ranges(mnist_dir, task):
    ds = dataset(mnist_dir, task)
    assert ds.image_shape == SHAPES[task]
    assert ds.num_classes == (19 if task == "addition" else 10)
    batch = ds.train_batch(0, with_params=True)
    spec = ds.batch_spec
    assert set(batch) == set(spec) | {"params"}
    for key, s in spec.items():
        assert batch[key].shape == s.shape and batch[key].dtype == s.dtype, key
    image = batch["image"]
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    assert (image.reshape(BATCH, -1) > 0.1).any(axis=1).all()  # every example shows something
    border = np.concatenate([image[:, 0].ravel(), image[:, -1].ravel()])
    assert (border == 0).mean() > 0.5  # background is exactly 0
    labels = batch["label"]
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < ds.num_classes
    src_images, src_labels = ds.source_arrays("train")
    if task == "addition":
        np.testing.assert_array_equal(labels, batch["params"]["labels"].sum(1))
        assert (image.reshape(BATCH, -1, 2).max(1) > 0.5).all()  # a digit in each channel
    else:
        np.testing.assert_array_equal(labels, src_labels[batch["params"]["index"]])
    test = ds.test_set()
    assert set(test) == set(spec)
    assert test["image"].shape == (BATCH,) + SHAPES[task] and test["image"].dtype == np.float32
    assert test["label"].dtype == np.int32
    if task not in ("addition", "coloc"):
        np.testing.assert_array_equal(test["label"], ds.source_arrays("test")[1][:BATCH])


def test_rotate_3d_volumes(mnist_dir):
    ds = dataset(mnist_dir, "mnist3d", rotate_3d=True)
    b = ds.train_batch(0, with_params=True)
    assert b["image"].shape == (BATCH, 60, 60, 60, 1) and 0 <= b["image"].min() and b["image"].max() <= 1
    angles = b["params"]["angles"]
    assert np.abs(angles).max() <= 45 and np.abs(angles).max() > 1
    # The rotated block's ink stays inside: nothing on the faces of the cube.
    faces = [b["image"][:, 0], b["image"][:, -1], b["image"][:, :, 0], b["image"][:, :, -1],
             b["image"][:, :, :, 0], b["image"][:, :, :, -1]]
    assert max(f.max() for f in faces) < 0.05


# ----------------------------------------------------------------------------
# Distributions and geometry.
# ----------------------------------------------------------------------------


def batches(ds, steps):
    out = [ds.train_batch(s, with_params=True) for s in range(steps)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def test_rts_distribution(mnist_dir):
    b = batches(dataset(mnist_dir, "rts"), 40)  # 320 examples
    p = b["params"]
    assert -45 <= p["angle"].min() < -35 and 35 < p["angle"].max() <= 45
    assert 0.7 <= p["scale"].min() < 0.75 and 1.15 < p["scale"].max() <= 1.2
    # Digit centres (ink centroids) spread over the canvas.
    img = b["image"][..., 0]
    ys, xs = np.mgrid[:42, :42]
    mass = img.sum((1, 2))
    cx, cy = (img * xs).sum((1, 2)) / mass, (img * ys).sum((1, 2)) / mass
    for c in (cx, cy):
        assert c.min() < 12 and c.max() > 29 and c.std() > 5
        assert np.histogram(c, bins=3, range=(0, 41))[0].min() > 30
    # keep_inside: no ink is cut off (resampling keeps the ink mass times scale^2).
    src = dataset(mnist_dir, "rts").source_arrays("train")[0]
    ink = src[p["index"]].reshape(len(mass), -1).sum(1) / 255.0
    ratio = mass / (ink * p["scale"] ** 2)
    assert 0.95 < ratio.min() and ratio.max() < 1.05


def test_rotation_distribution_and_identity(mnist_dir):
    p = batches(dataset(mnist_dir, "r"), 30)["params"]
    assert -90 <= p["angle"].min() < -80 and 80 < p["angle"].max() <= 90 and abs(p["angle"].mean()) < 12
    # With no rotation the R map reproduces the digit exactly (our sampler, coordinate conventions).
    digit = jnp.asarray(load_mnist(mnist_dir, "test")[0][0] / 255.0, jnp.float32)
    image, _ = jax.jit(lambda k, d: D.rotated(k, d, max_angle=0.0))(jax.random.key(0), digit)
    np.testing.assert_allclose(image[..., 0], digit, atol=1e-5)


def test_rts_identity_is_a_translation(mnist_dir):
    digit = jnp.asarray(load_mnist(mnist_dir, "test")[0][1] / 255.0, jnp.float32)
    ink = jnp.asarray(D.ink_boxes(np.asarray(digit)[None] > 0)[0])
    image, p = jax.jit(lambda k, d, i: D.rts(k, d, i, max_angle=0.0, min_scale=1.0, max_scale=1.0))(
        jax.random.key(1), digit, ink)
    # Reference: the digit at the drawn (sub-pixel) centre, by bilinear interpolation in NumPy.
    from scipy import ndimage
    shift = np.asarray(p["centre"]) - 13.5
    ref = ndimage.shift(np.pad(np.asarray(digit), ((0, 14), (0, 14))), (shift[1], shift[0]), order=1)
    np.testing.assert_allclose(image[..., 0], ref, atol=1e-4)


def test_projective_and_elastic_distributions(mnist_dir):
    p = batches(dataset(mnist_dir, "p"), 40)["params"]
    assert 0.75 <= p["scale"].min() and p["scale"].max() <= 1.0
    offsets = p["corner_offsets_px"].ravel()
    assert abs(offsets.std() - 5.0) < 0.5 and abs(offsets.mean()) < 0.6
    e = batches(dataset(mnist_dir, "e"), 20)["params"]
    assert 0.75 <= e["scale"].min() and e["scale"].max() <= 1.0
    offsets = e["control_offsets_px"]
    assert offsets.shape[1:] == (16, 2) and abs(offsets.std() - 1.5) < 0.1


def test_homography_maps_the_corners():
    quad = jnp.array([[-0.5, -0.6], [0.7, -0.5], [0.6, 0.55], [-0.5, 0.5]])
    h = np.asarray(D.square_to_quad(quad))
    pts = np.concatenate([D._SQUARE, np.ones((4, 1))], 1) @ h.T
    np.testing.assert_allclose(pts[:, :2] / pts[:, 2:], quad, atol=1e-6)


def test_tc_is_an_exact_copy_plus_clutter(mnist_dir):
    ds = dataset(mnist_dir, "tc")
    b = batches(ds, 10)
    src = ds.source_arrays("train")[0]
    tl = b["params"]["top_left"]
    assert tl.min() >= 0 and tl.max() <= 32 and tl.max() > 25 and tl.min() < 7
    for i in range(len(tl)):
        x, y = tl[i]
        window = b["image"][i, y:y + 28, x:x + 28, 0]
        digit = src[b["params"]["index"][i]] / 255.0
        assert (window >= digit - 1e-6).all()  # the digit, plus non-negative clutter
        outside = b["image"][i, ..., 0].copy()
        outside[y:y + 28, x:x + 28] = 0
        assert (outside > 0).sum() <= 6 * 36  # only clutter outside: at most six 6x6 crops


def test_integer_translation_slice_equals_sampler(mnist_dir):
    digit = jnp.asarray(load_mnist(mnist_dir, "test")[0][2] / 255.0, jnp.float32)
    fn = jax.jit(lambda d, t: (D.translate(d, t, 60), D.translate(d, t, 60, method="sampler")))
    for top_left in ([0, 0], [32, 32], [5, 17]):
        sliced, sampled = fn(digit, jnp.array(top_left))
        np.testing.assert_array_equal(sliced, sampled)


def test_coloc_boxes(mnist_dir):
    ds = dataset(mnist_dir, "coloc")
    b = ds.train_batch(0)
    box, ink = b["box"], b["ink_box"]
    np.testing.assert_allclose(box[:, 2] - box[:, 0], 2 * 28 / 84, atol=1e-6)
    assert (box >= -1 - 1e-6).all() and (box <= 1 + 1e-6).all()
    assert (ink[:, :2] >= box[:, :2] - 1e-6).all() and (ink[:, 2:] <= box[:, 2:] + 1e-6).all()
    for i in range(BATCH):  # no clutter ("T"): everything outside the frame box is 0
        x0, y0, x1, y1 = np.round(((box[i] + 1) * 84 - 1) / 2 + 0.5).astype(int)
        outside = b["image"][i, ..., 0].copy()
        outside[y0:y1, x0:x1] = 0
        assert outside.max() == 0
    eights = dataset(mnist_dir, "coloc", num_clutter=16, digit_class=8)
    assert (eights.source_arrays("train")[1] == 8).all() and len(eights.source_arrays("test")[1]) == 974


def test_mnist3d_extrusion(mnist_dir):
    ds = dataset(mnist_dir, "mnist3d")
    b = ds.train_batch(0, with_params=True)
    src = ds.source_arrays("train")[0]
    for i in range(BATCH):
        vol = b["image"][i, ..., 0]
        depth = np.flatnonzero(vol.reshape(60, -1).max(1) > 0)
        assert len(depth) == 12 and depth[-1] - depth[0] == 11  # 12 contiguous slices
        slices = vol[depth]
        assert (slices == slices[0]).all()  # the same digit in every slice
        x, y = (b["params"]["centre"][i, :2] - 13.5).astype(int)
        np.testing.assert_allclose(slices[0][y:y + 28, x:x + 28], src[b["params"]["index"][i]] / 255.0, atol=1e-7)


# ----------------------------------------------------------------------------
# Determinism, resumption, sharding.
# ----------------------------------------------------------------------------


def assert_batches_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_are_pure_functions_of_seed_and_step(mnist_dir):
    ds = dataset(mnist_dir, "rts")
    first = [ds.train_batch(s) for s in range(4)]  # consecutive steps use the prefetched batch
    resumed = dataset(mnist_dir, "rts")  # a fresh process resuming at step 3
    assert_batches_equal(resumed.train_batch(3), first[3])
    assert_batches_equal(dataset(mnist_dir, "rts", prefetch=False).train_batch(2), first[2])
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    other_seed = dataset(mnist_dir, "rts", seed=1).train_batch(0)
    assert not np.array_equal(other_seed["image"], first[0]["image"])


def test_process_shards_union_is_the_global_batch(mnist_dir):
    whole = dataset(mnist_dir, "rts").train_batch(7)
    shards = [dataset(mnist_dir, "rts", process_index=i, process_count=2).train_batch(7) for i in range(2)]
    for s in shards:
        assert s["image"].shape[0] == BATCH // 2
    joined = jax.tree.map(lambda *xs: np.concatenate(xs), *shards)
    assert_batches_equal(joined, whole)  # bit for bit
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_dataset({"task": "rts"}, seed=0, global_batch_size=9, process_count=2)


# ----------------------------------------------------------------------------
# The fixed test set.
# ----------------------------------------------------------------------------


def test_test_set_fixed_cached_and_verified(tmp_path, mnist_dir, caplog):
    with caplog.at_level(logging.INFO, logger="stn_jax.data.pipeline"):
        ds = dataset(mnist_dir, "rts", seed=0, cache_dir=str(tmp_path))
        first = ds.test_set()
    path = ds.test_cache_path()
    assert path.exists() and path.with_suffix(".json").exists()
    assert ds.test_checksum in caplog.text
    # Another model (training seed), another process: the same test set, read from the cache.
    again = dataset(mnist_dir, "rts", seed=123, cache_dir=str(tmp_path))
    assert_batches_equal(again.test_set(), first)
    assert again.test_checksum == ds.test_checksum
    # Without a cache it is generated again, identically; its examples do not depend on test_size.
    fresh = dataset(mnist_dir, "rts", seed=5).generate_test_set()
    assert_batches_equal(fresh, first)
    prefix = dataset(mnist_dir, "rts", test_size=3).generate_test_set()
    assert_batches_equal(prefix, {k: v[:3] for k, v in first.items()})
    # A changed file is detected.
    arrays = dict(np.load(path))
    arrays["label"] = (arrays["label"] + 1) % 10
    np.savez(path, **arrays)
    with pytest.raises(RuntimeError, match="SHA-256"):
        dataset(mnist_dir, "rts", cache_dir=str(tmp_path)).test_set()
    batches_ = list(ds.test_batches(3))
    assert [len(b["label"]) for b in batches_] == [3, 3, 2]


# ----------------------------------------------------------------------------
# Configuration and config files.
# ----------------------------------------------------------------------------


def _config_module(name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_files():
    dm = _config_module("distorted_mnist")
    c = dm.get_config("rts,st_cnn,tps")
    assert c.data.task == "rts" and c.model.transform == "tps" and c.data.canvas_size == 42
    assert c.data.to_dict() == {**default_config("rts").to_dict(), "test_npz": ""}
    assert dm.get_config("tc,cnn").model.transform == ""
    with pytest.raises(ValueError, match="choose one of r, rts, p, e, tc"):
        dm.get_config("q,cnn")
    with pytest.raises(ValueError, match="choose one of fcn, cnn, st_fcn, st_cnn"):
        dm.get_config("rts,resnet,affine")
    with pytest.raises(ValueError, match="choose one of affine, projective, tps"):
        dm.get_config("rts,st_cnn,spline")
    assert _config_module("mnist_addition").get_config("add_2st_fcn,tps").data.task == "addition"
    assert _config_module("mnist_3d").get_config("st3d").model.transform == "affine3d"
    assert _config_module("colocalisation").get_config("tc").data.num_clutter == 16


def test_config_validation():
    assert _resolve({"task": "rts", "test_npz": "x.npz"})["canvas_size"] == 42  # other components' keys pass
    with pytest.raises(ValueError, match="does not apply to task 'rts'"):
        _resolve({"task": "rts", "num_clutter": 3})
    with pytest.raises(ValueError, match="must be one of r, rts, p, e, tc, addition, mnist3d, coloc"):
        _resolve({"task": "svhn"})
    with pytest.raises(ValueError, match="min_scale"):
        _resolve({"task": "p", "min_scale": 1.5})
