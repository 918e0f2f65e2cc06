"""MNIST-family data: sources, distortions, determinism, sharding, fixed test sets, configs.

Runs on a small synthetic MNIST in the original IDX format (conftest's
``synthetic_mnist``: 600 training and 200 test digit-like glyphs); the tests
that check the original files themselves (their counts, tfds preparing from
them) carry ``@pytest.mark.real_data`` and read ``../shared/data/mnist``, and
skip, saying why, where it is absent. The tfds tests skip without
tensorflow-datasets. Never uses the network. Small batches (8) and test sets
(8) keep compilation to one per task.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MNIST_FILES as FILES, ROOT, synthetic_digits

from stn_jax.paper.config import resolve
from stn_jax.paper.data import (
    TASKS,
    MnistSourceError,
    balanced_order,
    canonical_order,
    default_config,
    distortions as D,
    load_mnist,
    load_tfds_mnist,
    make_dataset,
    mnist as mnist_lib,
    network_available,
    resolve_options,
)
from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
from stn_jax.paper.models import MODELS

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
BATCH = 8


def _tfds():
    return pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed (it is optional: "
                                                             "the tfds source of MNIST needs it; requirements.txt)")


def dataset(synthetic_mnist, task, batch=BATCH, **options):
    kwargs = {k: options.pop(k) for k in ("seed", "process_index", "process_count", "cache_dir") if k in options}
    config = {"task": task, "source": synthetic_mnist, "test_size": batch, **options}
    return make_dataset(config, seed=kwargs.pop("seed", 0), global_batch_size=batch, **kwargs)


# ----------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------


@pytest.mark.real_data
def test_idx_folder_reads_mnist(mnist_dir):
    x, y = load_mnist(mnist_dir, "train")
    assert x.shape == (60_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60_000,) and np.bincount(y).tolist() == TRAIN_COUNTS
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    xt, yt = load_mnist(mnist_dir, "test")
    assert xt.shape == (10_000, 28, 28) and np.bincount(yt).tolist() == TEST_COUNTS
    assert 0 < x.mean() < 255 and x.max() == 255


def test_idx_folder_reads_what_was_written(synthetic_mnist):
    """The IDX reader returns the synthetic files' arrays exactly (conftest writes them with seeds 0 and 1)."""
    for split, n, seed in (("train", 600, 0), ("test", 200, 1)):
        x, y = load_mnist(synthetic_mnist, split)
        images, labels = synthetic_digits(n, seed)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.shape == (n,)
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)
        assert set(y.tolist()) == set(range(10))


def test_missing_folder_and_file_errors(tmp_path, synthetic_mnist):
    with pytest.raises(MnistSourceError, match="does not exist.*How to get MNIST"):
        load_mnist(str(tmp_path / "nowhere"), "train")
    for name in FILES[:3]:
        (tmp_path / name).symlink_to(Path(synthetic_mnist) / name)
    with pytest.raises(MnistSourceError, match="t10k-labels-idx1-ubyte.gz is missing.*--config.data.source"):
        load_mnist(str(tmp_path), "train")


@pytest.mark.parametrize("damage", ["truncated_gzip", "bad_magic", "short_body"])
def test_corrupt_file_error_names_the_file(tmp_path, synthetic_mnist, damage):
    for name in FILES:
        (tmp_path / name).symlink_to(Path(synthetic_mnist) / name)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    target.unlink()
    raw = gzip.decompress((Path(synthetic_mnist) / target.name).read_bytes())
    if damage == "truncated_gzip":
        target.write_bytes(gzip.compress(raw)[:-20])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))
    else:
        target.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(MnistSourceError, match=r"t10k-labels-idx1-ubyte\.gz.*(corrupt|unreadable).*How to get"):
        load_mnist(str(tmp_path), "test")


def test_tfds_without_network_fails_fast(tmp_path, monkeypatch):
    _tfds()
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


@pytest.mark.real_data
def test_tfds_manual_dir_is_mnist(tmp_path, mnist_dir):
    """The real tfds path, offline: tfds verifies the four files' checksums and prepares (the first 300 per split)."""
    _tfds()
    x, y = load_tfds_mnist("test", data_dir=str(tmp_path), manual_dir=mnist_dir, max_examples_per_split=300)
    assert x.shape == (300, 28, 28) and x.dtype == np.uint8 and y.shape == (300,)
    xi, yi = load_mnist(mnist_dir, "test")
    assert _pairs(x, y) == _pairs(xi[:300], yi[:300])  # the first 300 of the file, in tfds' shuffled order
    assert not np.array_equal(y, yi[:300])


@pytest.mark.slow
@pytest.mark.real_data
def test_tfds_full_prepare_equals_idx(tmp_path, mnist_dir):
    """Preparing all of MNIST through tfds (~30-40 s) gives the IDX data exactly, as sets and in canonical order."""
    _tfds()
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


def test_canonical_order_is_source_independent(synthetic_mnist):
    x, y = load_mnist(synthetic_mnist, "test")
    perm = np.random.default_rng(0).permutation(len(y))
    a, b = canonical_order(x, y), canonical_order(x[perm], y[perm])
    np.testing.assert_array_equal(x[a], x[perm][b])
    np.testing.assert_array_equal(y[a], y[perm][b])


# ----------------------------------------------------------------------------
# Every variant: shapes, dtypes, ranges, the fixed test set.
# ----------------------------------------------------------------------------

SHAPES = {"r": (28, 28, 1), "rts": (42, 42, 1), "p": (28, 28, 1), "e": (28, 28, 1), "tc": (60, 60, 1),
          "addition": (42, 42, 2), "mnist3d": (60, 60, 60, 1), "coloc": (84, 84, 1)}


@pytest.mark.parametrize("task", [t for t in TASKS if t in MNIST_TASKS])
def test_variant_shapes_dtypes_ranges(synthetic_mnist, task):
    ds = dataset(synthetic_mnist, task)
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


def test_rotate_3d_volumes(synthetic_mnist):
    ds = dataset(synthetic_mnist, "mnist3d", rotate_3d=True)
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


def test_rts_distribution(synthetic_mnist):
    b = batches(dataset(synthetic_mnist, "rts"), 40)  # 320 examples
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
    src = dataset(synthetic_mnist, "rts").source_arrays("train")[0]
    ink = src[p["index"]].reshape(len(mass), -1).sum(1) / 255.0
    ratio = mass / (ink * p["scale"] ** 2)
    assert 0.95 < ratio.min() and ratio.max() < 1.05


def test_rotation_distribution_and_identity(synthetic_mnist):
    p = batches(dataset(synthetic_mnist, "r"), 30)["params"]
    assert -90 <= p["angle"].min() < -80 and 80 < p["angle"].max() <= 90 and abs(p["angle"].mean()) < 12
    # With no rotation the R map reproduces the digit exactly (our sampler, coordinate conventions).
    digit = jnp.asarray(load_mnist(synthetic_mnist, "test")[0][0] / 255.0, jnp.float32)
    image, _ = jax.jit(lambda k, d: D.rotated(k, d, max_angle=0.0))(jax.random.key(0), digit)
    np.testing.assert_allclose(image[..., 0], digit, atol=1e-5)


def test_rts_identity_is_a_translation(synthetic_mnist):
    digit = jnp.asarray(load_mnist(synthetic_mnist, "test")[0][1] / 255.0, jnp.float32)
    ink = jnp.asarray(D.ink_boxes(np.asarray(digit)[None] > 0)[0])
    image, p = jax.jit(lambda k, d, i: D.rts(k, d, i, max_angle=0.0, min_scale=1.0, max_scale=1.0))(
        jax.random.key(1), digit, ink)
    # Reference: the digit at the drawn (sub-pixel) centre, by bilinear interpolation in NumPy.
    from scipy import ndimage
    shift = np.asarray(p["centre"]) - 13.5
    ref = ndimage.shift(np.pad(np.asarray(digit), ((0, 14), (0, 14))), (shift[1], shift[0]), order=1)
    np.testing.assert_allclose(image[..., 0], ref, atol=1e-4)


def test_projective_and_elastic_distributions(synthetic_mnist):
    p = batches(dataset(synthetic_mnist, "p"), 40)["params"]
    assert 0.75 <= p["scale"].min() and p["scale"].max() <= 1.0
    offsets = p["corner_offsets_px"].ravel()
    assert abs(offsets.std() - 5.0) < 0.5 and abs(offsets.mean()) < 0.6
    e = batches(dataset(synthetic_mnist, "e"), 20)["params"]
    assert 0.75 <= e["scale"].min() and e["scale"].max() <= 1.0
    offsets = e["control_offsets_px"]
    assert offsets.shape[1:] == (16, 2) and abs(offsets.std() - 1.5) < 0.1


def test_homography_maps_the_corners():
    quad = jnp.array([[-0.5, -0.6], [0.7, -0.5], [0.6, 0.55], [-0.5, 0.5]])
    h = np.asarray(D.square_to_quad(quad))
    pts = np.concatenate([D._SQUARE, np.ones((4, 1))], 1) @ h.T
    np.testing.assert_allclose(pts[:, :2] / pts[:, 2:], quad, atol=1e-6)


def test_tc_is_an_exact_copy_plus_clutter(synthetic_mnist):
    ds = dataset(synthetic_mnist, "tc")
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


def test_integer_translation_slice_equals_sampler(synthetic_mnist):
    digit = jnp.asarray(load_mnist(synthetic_mnist, "test")[0][2] / 255.0, jnp.float32)
    fn = jax.jit(lambda d, t: (D.translate(d, t, 60), D.translate(d, t, 60, method="sampler")))
    for top_left in ([0, 0], [32, 32], [5, 17]):
        sliced, sampled = fn(digit, jnp.array(top_left))
        np.testing.assert_array_equal(sliced, sampled)


def test_coloc_boxes(synthetic_mnist):
    ds = dataset(synthetic_mnist, "coloc")
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
    eights = dataset(synthetic_mnist, "coloc", num_clutter=16, digit_class=8)
    test_eights = int((load_mnist(synthetic_mnist, "test")[1] == 8).sum())  # 974 in MNIST
    assert (eights.source_arrays("train")[1] == 8).all() and len(eights.source_arrays("test")[1]) == test_eights
    assert eights.test_size == BATCH and (eights.source_arrays("test")[1] == 8).all()


def test_mnist3d_extrusion(synthetic_mnist):
    ds = dataset(synthetic_mnist, "mnist3d")
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


def test_batches_are_pure_functions_of_seed_and_step(synthetic_mnist):
    ds = dataset(synthetic_mnist, "rts")
    first = [ds.train_batch(s) for s in range(4)]  # consecutive steps use the prefetched batch
    resumed = dataset(synthetic_mnist, "rts")  # a fresh process resuming at step 3
    assert_batches_equal(resumed.train_batch(3), first[3])
    assert_batches_equal(dataset(synthetic_mnist, "rts", prefetch=False).train_batch(2), first[2])
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    other_seed = dataset(synthetic_mnist, "rts", seed=1).train_batch(0)
    assert not np.array_equal(other_seed["image"], first[0]["image"])


@pytest.mark.parametrize("task", ["rts", "p"])
def test_process_shards_union_is_the_global_batch(synthetic_mnist, task):
    """Bit for bit, with shards of 4 and of 1 example, and test-set chunks of 1 (XLA compiles a batch of one
    differently, by up to 1.7e-5 at step 7 of ``p``; the pipeline computes it as the first of two)."""
    whole = dataset(synthetic_mnist, task).train_batch(7)
    for count in (2, BATCH):
        shards = [dataset(synthetic_mnist, task, process_index=i, process_count=count).train_batch(7)
                  for i in range(count)]
        for s in shards:
            assert s["image"].shape[0] == BATCH // count
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *shards)
        assert_batches_equal(joined, whole)  # bit for bit
    one_by_one = dataset(synthetic_mnist, task, process_count=BATCH).generate_test_set()
    assert_batches_equal(one_by_one, dataset(synthetic_mnist, task).generate_test_set())
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_dataset({"task": "rts"}, seed=0, global_batch_size=9, process_count=2)


# ----------------------------------------------------------------------------
# The fixed test set.
# ----------------------------------------------------------------------------


def test_test_set_fixed_cached_and_verified(tmp_path, synthetic_mnist, caplog):
    with caplog.at_level(logging.INFO, logger="stn_jax.paper.data.pipeline"):
        ds = dataset(synthetic_mnist, "rts", seed=0, cache_dir=str(tmp_path))
        first = ds.test_set()
    path = ds.test_cache_path()
    assert path.exists() and path.with_suffix(".json").exists()
    assert ds.test_checksum in caplog.text
    # Another model (training seed), another process: the same test set, read from the cache.
    again = dataset(synthetic_mnist, "rts", seed=123, cache_dir=str(tmp_path))
    assert_batches_equal(again.test_set(), first)
    assert again.test_checksum == ds.test_checksum
    # Without a cache it is generated again, identically; its examples do not depend on test_size.
    fresh = dataset(synthetic_mnist, "rts", seed=5).generate_test_set()
    assert_batches_equal(fresh, first)
    prefix = dataset(synthetic_mnist, "rts", test_size=3).generate_test_set()
    assert_batches_equal(prefix, {k: v[:3] for k, v in first.items()})
    # A changed file is detected.
    arrays = dict(np.load(path))
    arrays["label"] = (arrays["label"] + 1) % 10
    np.savez(path, **arrays)
    with pytest.raises(RuntimeError, match="SHA-256"):
        dataset(synthetic_mnist, "rts", cache_dir=str(tmp_path)).test_set()
    # Read by index (what evaluation does, each process its share).
    assert ds.test_size == BATCH
    idx = np.array([5, 0, 7, 5])
    assert_batches_equal(ds.test_examples(idx), {k: v[idx] for k, v in first.items()})


def test_config_cache_dir_wins_over_the_trainers_folder(tmp_path, synthetic_mnist):
    """``config.data.cache_dir`` is where the test set is cached, whatever folder the caller (the trainer:
    ``<workdir>/data``) passes; that folder is used only when the option is unset."""
    option, argument = tmp_path / "C", tmp_path / "W" / "data"
    assert dataset(synthetic_mnist, "rts", cache_dir=str(argument)).cache_dir == argument  # no option
    ds = make_dataset({"task": "rts", "source": synthetic_mnist, "test_size": BATCH, "cache_dir": str(option)},
                      seed=0, global_batch_size=BATCH, cache_dir=str(argument))
    ds.test_set()
    assert [p.suffix for p in sorted(option.iterdir())] == [".json", ".npz"]
    assert not argument.exists()


def test_balanced_order():
    labels = np.repeat(np.arange(4), [5, 9, 3, 7])
    order = balanced_order(labels, 7)
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation
    np.testing.assert_array_equal(order, balanced_order(labels, 7))  # seeded
    assert not np.array_equal(order, balanced_order(labels, 8))
    for k in (1, 2, 3):  # every prefix of k rounds holds k of each class
        assert np.bincount(labels[order[:4 * k]], minlength=4).tolist() == [k] * 4
    assert np.bincount(labels[order[:15]], minlength=4).tolist() == [4, 4, 3, 4]  # class 2 ran out after 3


def test_small_test_sets_are_class_balanced(synthetic_mnist):
    """A test set smaller than the split is a seeded, class-balanced subset; the whole split is every digit once."""
    ds = dataset(synthetic_mnist, "r", test_size=50)
    labels = ds.test_set()["label"]
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10
    assert dataset(synthetic_mnist, "r", test_size=50, seed=3).test_set()["label"].tolist() == labels.tolist()
    digits = ds.source_arrays("test")[0][:50]
    other = dataset(synthetic_mnist, "r", test_size=50, test_seed=1)  # another subset (and order) of the digits
    assert not np.array_equal(other.source_arrays("test")[0][:50], digits)
    whole = dataset(synthetic_mnist, "r", test_size=-1)
    assert whole.test_size == 200
    _, test_labels = load_mnist(synthetic_mnist, "test")
    assert sorted(whole.source_arrays("test")[1].tolist()) == sorted(test_labels.tolist())


# ----------------------------------------------------------------------------
# Configuration and config files.
# ----------------------------------------------------------------------------


def _config_module(name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _family(family: str) -> tuple[list[str], list[str]]:
    """The registered tasks of a family and the models meant for them (what the config files offer)."""
    tasks = [name for name, t in TASKS.items() if t.family == family]
    return tasks, [name for name, m in MODELS.items() if set(m.tasks) & set(tasks)]


def test_config_files():
    dm = _config_module("distorted_mnist")
    c = dm.get_config("rts,st_cnn,tps")
    assert c.data.task == "rts" and c.model.transform == "tps"
    # A config holds what it changes; `resolve` completes it with the registries' defaults.
    assert c.data.to_dict() == {"task": "rts"} and c.model.options.to_dict() == {}
    resolved = resolve(c)
    assert resolved.data.to_dict() == default_config("rts").to_dict() and resolved.data.canvas_size == 42
    assert resolved.model.options.localisation.kind == "conv"
    assert dm.get_config("tc,cnn").model.transform == ""
    tasks, models = _family("mnist")
    assert {"r", "rts", "p", "e", "tc"} <= set(tasks) and {"fcn", "cnn", "st_fcn", "st_cnn"} <= set(models)
    with pytest.raises(ValueError, match=f"unknown task 'q'; choose one of {', '.join(tasks)}$"):
        dm.get_config("q,cnn")
    with pytest.raises(ValueError, match=f"unknown model 'resnet'; choose one of {', '.join(models)}$"):
        dm.get_config("rts,resnet,affine")
    with pytest.raises(ValueError, match=f"choose one of {', '.join(MODELS.get('st_cnn').transforms)}, got 'spline'"):
        dm.get_config("rts,st_cnn,spline")
    assert _config_module("mnist_addition").get_config("add_2st_fcn,tps").data.task == "addition"
    assert _config_module("mnist_3d").get_config("st3d").model.transform == "affine3d"
    assert _config_module("colocalisation").get_config("tc").data.num_clutter == 16


@pytest.mark.parametrize("task", TASKS.names())
def test_every_task_takes_an_evaluation_file(task):
    """``config.data.test_npz`` (experiments.evaluate's own images) is an option of every task."""
    assert resolve_options({"task": task})["test_npz"] == ""
    assert resolve_options({"task": task, "test_npz": "mine.npz"})["test_npz"] == "mine.npz"


def test_config_validation():
    assert resolve_options({"task": "rts", "test_npz": "x.npz"})["canvas_size"] == 42
    with pytest.raises(ValueError, match=r"config.data.num_clutter is not an option of data task 'rts'; its options "
                                         r"are .*canvas_size"):
        resolve_options({"task": "rts", "num_clutter": 3})
    with pytest.raises(ValueError, match=re.escape(f"unknown data task 'nosuch'; choose one of "
                                                   f"{', '.join(TASKS.names())}")):
        resolve_options({"task": "nosuch"})
    with pytest.raises(ValueError, match="min_scale"):
        resolve_options({"task": "p", "min_scale": 1.5})
    with pytest.raises(ValueError, match="config.data.canvas_size must be a number"):
        resolve_options({"task": "r", "canvas_size": "28"})
    with pytest.raises(ValueError, match="config.data.keep_inside must be True or False"):
        resolve_options({"task": "rts", "keep_inside": 1})
