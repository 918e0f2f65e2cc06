"""CUB-200-2011 data task (stn_jax.paper.data.cub): reader, classes, errors, crops, determinism, shards.

The default tests write a tiny fake ``CUB_200_2011`` folder (small JPEGs in
three classes, one greyscale and one CMYK, and a fourth class listed in the
annotation files whose images are absent) in the official formats. The
``real_data`` tests read ``../shared/data/cub_200_2011_sample`` (every image
of classes 1-30) and skip, saying why, where it is absent. Never uses the
network.
"""

from __future__ import annotations

import logging
import shutil
import signal
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from stn_jax.paper import evaluation
from stn_jax.paper.data import cub, mnist as mnist_lib
from stn_jax.paper.data.cub import cache as cub_cache
from stn_jax.paper.data.files import CacheBuildInterrupted
from stn_jax.paper.data.tasks import TASKS, default_config, make_dataset, resolve_options
from stn_jax.paper.objectives import create_objective

S, R = 16, 20  # tiny output crop and resize

# (class id, name, [(width, height, mode, is_train)]); class 4's images are listed but absent.
CLASSES = [
    (1, "001.Alpha_Bird", [(40, 30, "RGB", 1), (30, 44, "RGB", 1), (36, 36, "L", 0), (50, 28, "RGB", 0)]),
    (2, "002.Beta_Bird", [(32, 40, "RGB", 1), (44, 33, "CMYK", 1), (40, 40, "RGB", 0)]),
    (3, "003.Gamma_Bird", [(38, 30, "RGB", 1), (30, 30, "RGB", 1), (42, 34, "RGB", 0)]),
    (4, "004.Delta_Bird", [(40, 30, "RGB", 1), (40, 30, "RGB", 0)]),
]


def _picture(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth, left-right asymmetric RGB picture (a flip is detectable after JPEG coding)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    out = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 3 + rng.uniform(0, 6))], -1)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_fake_cub(root: Path) -> Path:
    """Writes a fake ``CUB_200_2011`` folder under ``root``; returns it."""
    folder = root / "CUB_200_2011"
    (folder / "images").mkdir(parents=True)
    images, labels, split, boxes, classes = [], [], [], [], []
    image_id = 0
    for class_id, name, entries in CLASSES:
        classes.append(f"{class_id} {name}")
        (folder / "images" / name).mkdir()
        for k, (w, h, mode, train) in enumerate(entries):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}_{image_id}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {train}")
            # A box left of centre inside the image, except one that passes the bottom border (as a few official
            # ones do).
            bh = h / 2 if image_id != 2 else h
            boxes.append(f"{image_id} {w / 8:.3f} {h / 4:.3f} {w / 2:.3f} {bh:.3f}")
            if class_id == 4:
                continue  # listed, absent
            im = Image.fromarray(_picture(w, h, image_id))
            im = im.convert(mode) if mode != "RGB" else im
            im.save(folder / "images" / rel, quality=95)
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes), ("classes.txt", classes)):
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def fake_cub(tmp_path_factory) -> Path:
    return write_fake_cub(tmp_path_factory.mktemp("cub"))


def _config(source, **kw):
    base = {"task": "cub", "source": str(source), "classes": "1-3", "image_size": S, "resize": R,
            "num_workers": 0, "use_cache": False, "prefetch": False}
    return {**base, **kw}


def _dataset(source, *, seed=0, batch=4, process_index=0, process_count=1, **kw) -> cub.CubDataset:
    return cub.CubDataset(_config(source, **kw), seed=seed, global_batch_size=batch, process_index=process_index,
                          process_count=process_count)


# ---------------------------------------------------------------------------
# Options and annotations.
# ---------------------------------------------------------------------------


def test_registered_with_defaults():
    task = TASKS.get("cub")
    assert (task.title, task.family) == ("CUB-200-2011", "cub")
    c = default_config("cub")
    assert (c.source, c.classes, c.image_size, c.resize, c.num_workers, c.prefetch, c.cache_dir, c.test_size) == (
        "", "", 224, -1, -1, True, "", -1)
    assert cub.resolve_resize(224, -1) == 256 and cub.resolve_resize(448, -1) == 512


@pytest.mark.parametrize("bad, words", [
    ({"classes": "5-2"}, "reversed"), ({"classes": "x"}, "class ids"), ({"classes": "0-3"}, "1-200"),
    ({"image_size": 448, "resize": 256}, "resize"), ({"resize_mode": "fit"}, "resize_mode"),
    ({"num_workers": -2}, "num_workers"), ({"test_size": 0}, "test_size"),
    ({"source": "tfds", "use_cache": False}, "use_cache"), ({"colour": 1}, "not an option"),
])
def test_bad_options_fail_in_one_line(bad, words):
    with pytest.raises(ValueError, match=words) as e:
        resolve_options({"task": "cub", **bad})
    assert "\n" not in str(e.value)


def test_parse_and_format_classes():
    assert cub.parse_classes("") is None and cub.parse_classes("all") is None
    assert cub.parse_classes("1-3") == (1, 2, 3)
    assert cub.parse_classes("1,5,7-9") == (1, 5, 7, 8, 9)
    assert cub.parse_classes(" 9 , 2-3,2 ") == (2, 3, 9)
    assert cub.format_classes([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"


def test_read_annotations(fake_cub):
    r = cub.read_annotations(fake_cub.parent)  # the folder holding CUB_200_2011/ works too
    assert len(r) == 12 and r.root == fake_cub
    assert r.image_id.tolist() == list(range(1, 13))
    assert r.class_id.tolist() == [1] * 4 + [2] * 3 + [3] * 3 + [4] * 2
    assert r.is_train.tolist() == [True, True, False, False, True, True, False, True, True, False, True, False]
    assert r.class_names[2] == "002.Beta_Bird"
    np.testing.assert_allclose(r.box_xywh[0], [5, 7.5, 20, 15])
    assert r.path[0] == "001.Alpha_Bird/Alpha_Bird_0000_1.jpg"


def test_classes_selection_and_label_remap(fake_cub):
    ds = _dataset(fake_cub, classes="2,3")
    assert ds.num_classes == 2 and ds.class_ids == (2, 3)
    assert ds.kept_class_names == ("002.Beta_Bird", "003.Gamma_Bird")
    assert (ds.train_size, ds.test_size) == (4, 2)
    test = ds.test_set()
    assert test["label"].tolist() == [0, 1]  # image ids 7 (class 2) and 10 (class 3)
    labels = np.concatenate([ds.train_batch(s)["label"] for s in range(4)])
    assert set(labels.tolist()) == {0, 1}
    assert len(_dataset(fake_cub, classes="1-3", test_size=2).test_set()["label"]) == 2


def test_missing_annotation_file_is_named(fake_cub, tmp_path):
    folder = write_fake_cub(tmp_path)
    (folder / "bounding_boxes.txt").unlink()
    with pytest.raises(cub.CubSourceError, match="bounding_boxes.txt is missing") as e:
        _dataset(folder)
    assert cub.OFFICIAL_URL in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(cub.CubSourceError, match="source is empty"):
        _dataset("")


def test_partial_folder_without_classes(fake_cub):
    with pytest.raises(cub.CubSourceError) as e:
        _dataset(fake_cub, classes="")
    message = str(e.value)
    assert "004.Delta_Bird/Delta_Bird_0000_11.jpg is missing" in message
    assert "--config.data.classes=1-3" in message and "\n" not in message


def test_missing_image_of_kept_class(tmp_path):
    folder = write_fake_cub(tmp_path)
    victim = next((folder / "images" / "002.Beta_Bird").iterdir())
    victim.unlink()
    with pytest.raises(cub.CubSourceError, match=f"{victim.name} is missing"):
        _dataset(folder, classes="1-3")
    _dataset(folder, classes="1,3")  # the other classes are fine


def test_greyscale_and_cmyk_become_rgb(fake_cub):
    grey = fake_cub / "images" / "001.Alpha_Bird" / "Alpha_Bird_0002_3.jpg"
    cmyk = fake_cub / "images" / "002.Beta_Bird" / "Beta_Bird_0001_6.jpg"
    assert Image.open(grey).mode == "L" and Image.open(cmyk).mode == "CMYK"
    image, size = cub.decode_resize(grey, R)
    assert image.shape == (R, R, 3) and image.dtype == np.uint8 and size == (36, 36)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    image, size = cub.decode_resize(cmyk, R, "shorter")
    assert image.shape == (R, round(44 * R / 33), 3) and size == (44, 33)
    test = _dataset(fake_cub).test_examples([0])  # image id 3, the greyscale one
    assert test["image"].shape == (1, S, S, 3)
    np.testing.assert_array_equal(test["image"][..., 0], test["image"][..., 2])


# ---------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
def test_shapes_dtypes_ranges(fake_cub, tmp_path, use_cache):
    ds = _dataset(fake_cub, batch=5, use_cache=use_cache, cache_dir=str(tmp_path / "cache"))
    assert (ds.image_shape, ds.num_classes, ds.local_batch_size) == ((S, S, 3), 3, 5)
    assert set(ds.element_spec) == {"image", "label", "box"}
    for batch in (ds.train_batch(0), ds.test_examples(np.arange(ds.test_size))):
        n = len(batch["label"])
        assert batch["image"].shape == (n, S, S, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (n,) and batch["label"].dtype == np.int32
        assert batch["box"].shape == (n, 4) and batch["box"].dtype == np.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert ((0 <= batch["label"]) & (batch["label"] < 3)).all()
        assert (np.abs(batch["box"]) <= 1).all() and (batch["box"][:, 2] > batch["box"][:, 0]).all()
    assert (ds.train_size, ds.test_size) == (6, 4)
    assert ds.test_examples([])["image"].shape == (0, S, S, 3)
    with pytest.raises(IndexError):
        ds.test_examples([4])


def test_cache_equals_jpeg_path_and_is_versioned(fake_cub, tmp_path):
    cache = str(tmp_path / "cache")
    jpeg = _dataset(fake_cub, seed=3)
    cached = _dataset(fake_cub, seed=3, use_cache=True, cache_dir=cache)
    for step in (0, 7):
        a, b = jpeg.train_batch(step), cached.train_batch(step)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    again = _dataset(fake_cub, seed=3, use_cache=True, cache_dir=cache)
    assert again.cache_path == cached.cache_path
    other = _dataset(fake_cub, use_cache=True, cache_dir=cache, resize=R + 2)
    assert other.cache_path != cached.cache_path
    assert len(list(Path(cache).iterdir())) == 2
    # A damaged cache is detected (checksums), naming the folder.
    with open(cached.cache_path / "pixels.bin", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(cub.CubFormatError, match="delete the folder"):
        cub.load_cache(cached.cache_path)


def test_determinism_per_seed_and_step(fake_cub):
    a = _dataset(fake_cub, seed=1)
    b = _dataset(fake_cub, seed=1, prefetch=True)
    later = [a.train_batch(s) for s in (5, 2, 3)]
    for s, x in zip((5, 2, 3), later):
        y = b.train_batch(s)  # prefetched or not, any order
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    b.close()
    c = _dataset(fake_cub, seed=2)
    assert not np.array_equal(a.train_batch(2)["image"], c.train_batch(2)["image"])
    assert not np.array_equal(a.train_batch(2)["image"], a.train_batch(3)["image"])


def test_epochs_are_permutations(fake_cub):
    ds = _dataset(fake_cub, batch=3)  # 6 training images: 2 steps per epoch
    train_ids = set(ds.image_ids[ds._train_rows].tolist())
    epochs = [np.concatenate([ds.train_batch(2 * e + k, with_params=True)["index"] for k in (0, 1)])
              for e in range(3)]
    for ids in epochs:
        assert sorted(ids.tolist()) == sorted(train_ids)
    assert len({tuple(e) for e in epochs}) > 1


def test_process_shards_concatenate(fake_cub):
    whole = _dataset(fake_cub, seed=4, batch=4).train_batch(3, with_params=True)
    parts = [_dataset(fake_cub, seed=4, batch=4, process_index=p, process_count=2).train_batch(3, with_params=True)
             for p in range(2)]
    assert parts[0]["image"].shape[0] == 2
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_centre_crop_at_test_time(fake_cub):
    ds = _dataset(fake_cub)
    test = ds.test_examples([1, 1])  # image id 4: 50 x 28 pixels, box (6.25, 7, 25, 14)
    np.testing.assert_array_equal(test["image"][0], test["image"][1])
    resized, _ = cub.decode_resize(fake_cub / "images" / ds.names[ds._test_rows[1]], R)
    o = (R - S) // 2
    expected = np.multiply(resized[o:o + S, o:o + S], np.float32(1 / 255))
    np.testing.assert_array_equal(test["image"][0], expected)
    # The box in the crop's normalised coordinates (pixel edges at -1 and +1).
    x0, x1 = np.array([6.25, 31.25]) * R / 50 - o
    y0, y1 = np.array([7.0, 21.0]) * R / 28 - o
    np.testing.assert_allclose(test["box"][0], np.clip(np.array([x0, y0, x1, y1]) * 2 / S - 1, -1, 1), atol=1e-6)


def test_flips_happen_in_training(fake_cub):
    ds = _dataset(fake_cub, resize=S)  # no crop freedom: an example is the resized image or its mirror
    resized = {int(i): np.multiply(cub.decode_resize(fake_cub / "images" / n, S)[0], np.float32(1 / 255))
               for i, n in zip(ds.image_ids, ds.names)}
    flips = []
    for step in range(6):
        batch = ds.train_batch(step, with_params=True)
        for image, box, i in zip(batch["image"], batch["box"], batch["index"]):
            plain = np.array_equal(image, resized[int(i)])
            mirrored = np.array_equal(image, resized[int(i)][:, ::-1])
            assert plain != mirrored
            flips.append(mirrored)
            # Boxes span x in [w/8, 5w/8]: (-0.75, 0.25) in the crop, (-0.25, 0.75) mirrored; y in (-0.5, 0.5)
            # except image 2's box, which passes the bottom border and is clipped to +1.
            expected = [-0.25, -0.5, 0.75, 0.5] if mirrored else [-0.75, -0.5, 0.25, 0.5]
            if i == 2:
                expected[3] = 1.0
            np.testing.assert_allclose(box, expected, atol=1e-6)
    assert 0.2 < np.mean(flips) < 0.8
    never = _dataset(fake_cub, resize=S, flip=False).train_batch(0, with_params=True)
    for image, i in zip(never["image"], never["index"]):
        np.testing.assert_array_equal(image, resized[int(i)])


def test_worker_processes_match_in_process(fake_cub):
    a = _dataset(fake_cub, seed=5, batch=4)
    with _dataset(fake_cub, seed=5, batch=4, num_workers=2, prefetch=True) as b:
        for step in (0, 1):
            x, y = a.train_batch(step), b.train_batch(step)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        np.testing.assert_array_equal(a.test_set()["image"], b.test_set()["image"])


def test_make_dataset_through_the_registry(fake_cub, tmp_path):
    ds = make_dataset(_config(fake_cub), seed=0, global_batch_size=2, cache_dir=str(tmp_path))
    assert isinstance(ds, cub.CubDataset) and ds.train_batch(0)["image"].shape == (2, S, S, 3)


def test_config_cache_dir_wins_over_the_trainers_folder(fake_cub, tmp_path):
    option, argument = tmp_path / "C", tmp_path / "W" / "data"
    ds = cub.CubDataset(_config(fake_cub, use_cache=True, cache_dir=str(option)), seed=0, global_batch_size=2,
                        cache_dir=argument)
    assert ds.cache_path.parent == option and not argument.exists()


def _own_copy(fake_cub, tmp_path) -> Path:
    """A copy of the fake CUB folder that a test may damage."""
    return Path(shutil.copytree(fake_cub, tmp_path / "CUB_200_2011"))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_truncated_image_is_named(fake_cub, tmp_path, use_cache):
    folder = _own_copy(fake_cub, tmp_path)
    bad = sorted((folder / "images" / "002.Beta_Bird").iterdir())[-1]  # a test image
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    with pytest.raises(cub.CubFormatError) as error:
        cub.CubDataset(_config(folder, use_cache=use_cache, cache_dir=str(tmp_path / "cache")), seed=0,
                       global_batch_size=2).test_set()
    message = str(error.value)
    assert message.startswith(f"CUB image {bad} is truncated or unreadable") and "\n" not in message
    assert "replace it with the original file" in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # no partial cache


def test_a_cache_folder_without_meta_json_is_replaced(fake_cub, tmp_path, caplog):
    def make():
        return cub.CubDataset(_config(fake_cub, use_cache=True, cache_dir=str(tmp_path / "cache")), seed=0,
                              global_batch_size=2)

    first = make()
    expected = first.test_set()
    (first.cache_path / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="stn_jax.paper.data.files"):
        again = make()
    assert again.cache_path == first.cache_path and (again.cache_path / "meta.json").is_file()
    assert f"replacing {first.cache_path}: it lacks meta.json" in caplog.text
    np.testing.assert_array_equal(again.test_set()["image"], expected["image"])


def test_ctrl_c_during_a_cache_build_is_one_line_and_leaves_nothing(fake_cub, tmp_path, monkeypatch):
    def interrupt(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(cub_cache, "_resize_job", interrupt)
    with pytest.raises(KeyboardInterrupt) as stop:  # a bare one would stop the test session
        cub.CubDataset(_config(fake_cub, use_cache=True, cache_dir=str(tmp_path / "cache")), seed=0,
                       global_batch_size=2)
    message = str(stop.value)
    assert isinstance(stop.value, CacheBuildInterrupted) and "\n" not in message
    assert f"while building the cache {tmp_path / 'cache'}/cub_" in message
    assert not list((tmp_path / "cache").iterdir())


def test_worker_processes_leave_ctrl_c_to_the_parent():
    """A Ctrl-C in a terminal reaches every process of the group: the workers ignore it (no traceback from
    each), and the parent stops them."""
    with cub_cache._spawn_executor(1) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN


def test_evaluation_file_of_own_bird_images(fake_cub, tmp_path):
    """``config.data.test_npz`` for a CUB run: images of the model's input shape, labels of the kept classes."""
    ds = _dataset(fake_cub)
    objective = create_objective({"name": "classification"})
    run = types.SimpleNamespace(setup=types.SimpleNamespace(dataset=ds, objective=objective))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "birds.npz", images=rng.integers(0, 256, (5, S, S, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2, 2, 0]))
    mine = evaluation.npz_test_set(tmp_path / "birds.npz", run)
    assert mine.arrays["image"].shape == (5, S, S, 3) and mine.test_size == 5
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, S, S, 3), np.uint8), labels=np.array([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for this model"):
        evaluation.npz_test_set(tmp_path / "bad.npz", run)


def test_tfds_without_network_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="the tfds source of CUB needs tensorflow-datasets")
    monkeypatch.setattr(mnist_lib, "network_available", lambda *a, **k: False)
    with pytest.raises(cub.CubSourceError, match="config.data.source=/path/to/CUB_200_2011") as e:
        cub.CubDataset({"task": "cub", "source": "tfds", "tfds_data_dir": str(tmp_path)}, seed=0,
                       global_batch_size=2)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# The real sample (classes 1-30).
# ---------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_sample_classes_1_30():
    folder = shared_path("data/cub_200_2011_sample/CUB_200_2011")
    with pytest.raises(cub.CubSourceError, match="--config.data.classes=1-30"):
        cub.CubDataset(_config(folder, classes=""), seed=0, global_batch_size=2)
    ds = cub.CubDataset(_config(folder, classes="1-30", image_size=64, resize=72), seed=0, global_batch_size=4)
    assert (ds.num_classes, ds.train_size, ds.test_size) == (30, 900, 801)  # the README's counts
    batch = ds.train_batch(0)
    assert batch["image"].shape == (4, 64, 64, 3) and ((0 <= batch["label"]) & (batch["label"] < 30)).all()
    # Image id 448 (009.Brewer_Blackbird/Brewer_Blackbird_0028_2682.jpg, a test image) is greyscale.
    position = int(np.flatnonzero(ds.image_ids[ds._test_rows] == 448)[0])
    test = ds.test_examples([position])
    assert test["label"][0] == 8 and test["image"].shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(test["image"][0, ..., 0], test["image"][0, ..., 1])
