"""SVHN multi-digit data (stn_jax.paper.data.svhn): readers, crops, labels, cache, data sets.

Unit tests write tiny format-1 folders (PNGs, digitStruct.json and an HDF5
digitStruct.mat in the MATLAB v7.3 layout) and tiny MNIST IDX folders in
``tmp_path``; the ``real_data`` tests read ../shared/data/svhn_format1_subset
and ../shared/data/svhn_format1_sample.
"""

from __future__ import annotations

import gzip
import json
import logging
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, shared_path, synthetic_digits
from PIL import Image

from experiments import cli
from stn_jax.paper.data import svhn
from stn_jax.paper.data.files import CacheBuildInterrupted
from stn_jax.paper.data.svhn import cache as svhn_cache

FIELDS = ("label", "left", "top", "width", "height")

# (filename, [(label, left, top, width, height), ...]); label 10 is the digit 0.
ENTRIES = [
    ("1.png", [(1, 10, 8, 9, 16), (9, 20, 9, 10, 16)]),              # "19"
    ("2.png", [(5, 30, 12, 8, 14)]),                                  # "5": the scalar (one-digit) .mat case
    ("3.png", [(2, 4, 4, 7, 12), (10, 12, 5, 7, 12), (3, 20, 4, 7, 12)]),  # "203"
    ("4.png", [(d, 2 + 6 * i, 10, 6, 10) for i, d in enumerate((1, 2, 3, 4, 5, 6))]),  # 6 digits: skipped
    ("5.png", [(7, -4, 20, 10, 14), (10, 5, 21, 10, 14)]),            # "70", partly outside the image
]
DIGITS = {"1.png": "19", "2.png": "5", "3.png": "203", "4.png": "123456", "5.png": "70"}


# ---------------------------------------------------------------------------
# Writers of tiny sources.
# ---------------------------------------------------------------------------


def write_png(path: Path, seed: int, size=(48, 36)) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    image = (rng.uniform(0, 255, (h, w, 3))).astype(np.uint8)
    Image.fromarray(image).save(path)


def json_entries(entries):
    return [{"filename": name, "boxes": [dict(zip(FIELDS, map(float, b))) for b in boxes]} for name, boxes in entries]


def write_json(folder: Path, entries) -> Path:
    path = folder / "digitStruct.json"
    path.write_text(json.dumps(json_entries(entries)))
    return path


def write_mat(path: Path, entries) -> Path:
    """A digitStruct.mat in MATLAB's v7.3 (HDF5) layout: /digitStruct/{name,bbox} (N, 1) object references
    into /#refs#; a bbox field is a (1, 1) dataset for one digit, an (n, 1) array of references for several."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = iter(range(10 ** 6))

        def new(data):
            return refs.create_dataset(f"d{next(counter)}", data=data).ref

        names, bboxes = [], []
        for filename, boxes in entries:
            names.append(new(np.array([[ord(c)] for c in filename], np.uint16)))
            group = refs.create_group(f"g{next(counter)}")
            for j, key in enumerate(FIELDS):
                values = [float(b[j]) for b in boxes]
                if len(values) == 1:
                    group.create_dataset(key, data=np.array([[values[0]]], np.float64))
                else:
                    group.create_dataset(key, data=np.array([[new(np.array([[v]], np.float64))] for v in values],
                                                            dtype=h5py.ref_dtype))
            bboxes.append(group.ref)
        group = f.create_group("digitStruct")
        group.create_dataset("name", data=np.array(names, dtype=h5py.ref_dtype).reshape(-1, 1))
        group.create_dataset("bbox", data=np.array(bboxes, dtype=h5py.ref_dtype).reshape(-1, 1))
    with open(path, "r+b") as f:  # MATLAB's text header in the user block
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return path


def make_split(folder: Path, entries=ENTRIES, annotation: str = "json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _) in enumerate(entries):
        write_png(folder / name, i)
    if annotation == "json":
        write_json(folder, entries)
    else:
        write_mat(folder / "digitStruct.mat", entries)
    return folder


@pytest.fixture
def source(tmp_path) -> Path:
    """A source folder with train/ (json), test/ (mat) and extra/ (mat)."""
    root = tmp_path / "svhn"
    make_split(root / "train", ENTRIES, "json")
    make_split(root / "test", ENTRIES, "mat")
    more = [(f"{i}.png", [(i % 10 + 1, 5, 5, 10, 14), (3, 15, 5, 10, 14)]) for i in range(1, 9)]
    make_split(root / "extra", more, "mat")
    return root


def config(**overrides):
    c = svhn.default_config("svhn")
    c.update(dict(train_splits="train,extra", validation_size=2, num_workers=0, test_split="test"))
    c.update(overrides)
    return c


# ---------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("annotation", ["json", "mat"])
def test_reader_digits_and_boxes(tmp_path, annotation):
    folder = make_split(tmp_path / "train", annotation=annotation)
    records = svhn.read_annotations(folder)
    assert [r.filename for r in records] == [e[0] for e in ENTRIES]
    assert {r.filename: r.digits for r in records} == DIGITS
    for r, (_, boxes) in zip(records, ENTRIES):
        assert r.boxes.dtype == np.float64
        np.testing.assert_array_equal(r.boxes, np.array([b[1:] for b in boxes], np.float64))


def test_mat_and_json_agree(tmp_path):
    a = svhn.read_annotations(make_split(tmp_path / "a", annotation="json"))
    b = svhn.read_annotations(make_split(tmp_path / "b", annotation="mat"))
    assert [(r.filename, r.digits, r.boxes.tolist()) for r in a] == [(r.filename, r.digits, r.boxes.tolist())
                                                                       for r in b]


def test_a_long_mat_file_reads_with_its_progress_bar(tmp_path):
    """Over 1,000 entries (the official train and extra files) the reader shows a progress bar."""
    entries = [(f"{i}.png", [(1, 5, 5, 10, 20)]) for i in range(1001)]
    records = svhn.read_digit_struct_mat(write_mat(tmp_path / "digitStruct.mat", entries), progress=True)
    assert len(records) == 1001 and records[-1].filename == "1000.png"


def test_locate_split_forms(source, tmp_path):
    assert svhn.locate_split(source, "train").annotation.name == "digitStruct.json"
    assert svhn.locate_split(source, "test").annotation.name == "digitStruct.mat"
    assert svhn.locate_split(source / "test", "test").path == source / "test"  # the split folder itself
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "train.tar.gz", "w:gz") as tar:
        tar.add(source / "train", arcname="train")
    src = svhn.locate_split(archives, "train")
    assert src.kind == "archive"
    assert [(r.filename, r.digits) for r in svhn.read_annotations(archives / "train.tar.gz")] == \
        [(r.filename, r.digits) for r in svhn.read_annotations(source / "train")]


def test_missing_sources_name_the_path(source, tmp_path):
    with pytest.raises(svhn.SvhnSourceError, match="--config.data.source"):
        svhn.locate_split("", "train")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*ufldl\.stanford\.edu/housenumbers"):
        svhn.locate_split(tmp_path / "nowhere", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(svhn.SvhnSourceError, match=r"empty/extra.*extra\.tar\.gz.*ufldl"):
        svhn.locate_split(empty, "extra")
    (empty / "test").mkdir()
    with pytest.raises(svhn.SvhnSourceError, match=r"test/digitStruct\.mat"):
        svhn.locate_split(empty, "test")
    (source / "train" / "3.png").unlink()
    with pytest.raises(svhn.SvhnSourceError, match=r"train/3\.png is missing"):
        svhn.split_cache(source, "train", tmp_path / "cache", 64)
    with pytest.raises(svhn.SvhnSourceError, match="--config.data.source"):
        svhn.SvhnDataset(config(source=""), seed=0, global_batch_size=2, cache_dir=tmp_path / "c")


def test_corrupt_annotations(tmp_path):
    folder = make_split(tmp_path / "train", annotation="mat")
    mat = folder / "digitStruct.mat"
    good = mat.read_bytes()
    mat.write_bytes(good[:len(good) // 3])  # truncated
    with pytest.raises(svhn.SvhnFormatError, match=r"digitStruct\.mat.*(corrupt|truncated)"):
        svhn.read_annotations(folder)
    mat.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(svhn.SvhnFormatError, match=str(mat)):
        svhn.read_annotations(folder)
    mat.unlink()
    (folder / "digitStruct.json").write_text('[{"filename": "1.png", "boxes": [{"left": 1}]}]')
    with pytest.raises(svhn.SvhnFormatError, match=r"digitStruct\.json"):
        svhn.read_annotations(folder)


def test_labels():
    label, length = svhn.encode_label("203")
    assert label.dtype == np.int32 and label.tolist() == [2, 0, 3, 10, 10] and length == 3
    assert svhn.decode_label(label) == "203"
    with pytest.raises(ValueError):
        svhn.encode_label("123456")


# ---------------------------------------------------------------------------
# Crops.
# ---------------------------------------------------------------------------


def test_crop_geometry():
    boxes = np.array([[40, 30, 10, 20], [50, 32, 10, 20]], np.float64)  # union (40, 30)-(60, 52)
    assert svhn.union_box(boxes) == (40, 30, 60, 52)
    x0, y0, x1, y1 = svhn.crop_box(boxes, "tight")
    assert (x1 - x0, y1 - y0) == pytest.approx((26, 28.6)) and ((x0 + x1) / 2, (y0 + y1) / 2) == (50, 41)
    x0, y0, x1, y1 = svhn.crop_box(boxes, "loose")
    assert x1 - x0 == y1 - y0 == pytest.approx(2 * 28.6) and ((x0 + x1) / 2, (y0 + y1) / 2) == (50, 41)
    # White union box on black: the tight crop is white in its middle 1/1.3 and black at its border.
    image = np.zeros((100, 120, 3), np.uint8)
    image[30:52, 40:60] = 255
    c64 = svhn.crop_64(image, boxes)
    assert c64.shape == (64, 64, 3) and c64.dtype == np.uint8
    assert c64[8:56, 8:56].min() > 200 and c64[:4].max() < 50 and c64[:, :4].max() < 50
    c128 = svhn.crop_128(image, boxes)
    assert c128.shape == (128, 128, 3)
    assert c128[50:78, 50:78].min() > 200 and c128[:30].max() < 50  # the box fills about 1/2.6 of the frame


def test_crop_outside_repeats_edges():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :, 0] = np.arange(20)[None, :] * 10  # red ramp along x
    out = svhn.crop(image, np.array([[-30.0, 2, 20, 10]]), 32, "tight")  # mostly left of the image
    assert out.shape == (32, 32, 3)
    assert (out[:, :8, 0] == 0).all()  # left of x = 0: the edge column (value 0) repeated


# ---------------------------------------------------------------------------
# Cache.
# ---------------------------------------------------------------------------


def test_cache_build_skip_reuse_rebuild(source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = svhn.split_cache(source, "train", cache, 64)
    assert a.image.shape == (4, 64, 64, 3) and a.image.dtype == np.uint8 and isinstance(a.image, np.memmap)
    assert a.label.dtype == np.int32 and a.label.shape == (4, 5) and a.length.dtype == np.int32
    assert list(a.filename) == ["1.png", "2.png", "3.png", "5.png"]  # 4.png (6 digits) skipped
    assert a.meta["counts"]["skipped_too_long"] == 1 and a.meta["skipped_too_long"] == ["4.png"]
    assert [svhn.decode_label(x) for x in a.label] == ["19", "5", "203", "70"]
    assert a.length.tolist() == [2, 1, 3, 2]
    assert a.meta["options"]["image_size"] == 64 and a.meta["files"]["image"]["sha256"]
    np.testing.assert_array_equal(a.box[2, :3], np.array([b[1:] for b in ENTRIES[2][1]], np.float32))
    assert np.isnan(a.box[2, 3:]).all()
    # Reused: no rebuild.
    monkeypatch.setattr(svhn_cache, "build_cache", lambda *a, **k: pytest.fail("cache rebuilt"))
    b = svhn.split_cache(source, "train", cache, 64)
    assert b.path == a.path
    np.testing.assert_array_equal(b.image, a.image)
    monkeypatch.undo()
    # A changed option or source makes a new cache.
    c = svhn.split_cache(source, "train", cache, 128)
    assert c.path != a.path and c.image.shape == (4, 128, 128, 3) and "loose" in c.path.name
    d = svhn.split_cache(source, "train", cache, 64, "loose")
    assert d.path not in (a.path, c.path)
    write_png(source / "train" / "2.png", 99, size=(50, 36))
    e = svhn.split_cache(source, "train", cache, 64)
    assert e.path != a.path
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # no temporary leftovers


def test_cache_corruption_detected(source, tmp_path):
    a = svhn.split_cache(source, "train", tmp_path / "cache", 64)
    path = a.path
    del a
    data = bytearray((path / "image.npy").read_bytes())
    data[-1] ^= 0xFF
    (path / "image.npy").write_bytes(bytes(data))
    with pytest.raises(svhn.SvhnFormatError, match="image.npy has SHA-256"):
        svhn.load_cache(path)


def test_archive_and_folder_give_the_same_cache(source, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "test.tar.gz", "w:gz") as tar:
        tar.add(source / "test", arcname="test")
    a = svhn.split_cache(archives, "test", tmp_path / "cache", 64)
    b = svhn.split_cache(source, "test", tmp_path / "cache", 64)
    assert a.path != b.path
    for name in ("image", "label", "length", "filename"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def truncate(path: Path) -> None:
    """Cuts a file in half (a download or copy that stopped)."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_truncated_image_is_named(source, tmp_path):
    truncate(source / "test" / "3.png")
    with pytest.raises(svhn.SvhnFormatError) as folder_error:
        svhn.split_cache(source, "test", tmp_path / "cache", 64)
    message = str(folder_error.value)
    assert f"SVHN image {source / 'test' / '3.png'} is truncated or unreadable" in message and "\n" not in message
    assert "allow_missing_images=True" in message
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "test.tar.gz", "w:gz") as tar:
        tar.add(source / "test", arcname="test")
    with pytest.raises(svhn.SvhnFormatError, match=r"test\.tar\.gz:test/3\.png is truncated .*download the archive "
                                                  r"again"):
        svhn.split_cache(archives, "test", tmp_path / "cache", 64)
    assert not list((tmp_path / "cache").iterdir())  # no partial cache


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_bad_png_stops_the_build_in_one_line_naming_it(source, tmp_path, capfd, damage, workers):
    """A PNG cut in half, or a file of other bytes under a PNG's name, ends the command in one line naming the
    file, also when the crops are made in worker processes (no worker traceback)."""
    path = source / "train" / "3.png"
    if damage == "truncated":
        truncate(path)
    else:
        path.write_bytes(b"<html><body>404 Not Found</body></html>\n")

    def build(argv):
        svhn.split_cache(source, "train", tmp_path / "cache", 64, num_workers=workers)

    with pytest.raises(SystemExit) as stop:
        cli._reporting(build)([])
    message = str(stop.value.code)
    assert message.startswith(f"error: SVHN image {path} is truncated or unreadable (") and "\n" not in message
    if damage == "not an image":
        assert "(not an image file)" in message
    assert "Traceback" not in capfd.readouterr().err
    assert not list((tmp_path / "cache").iterdir())  # no partial cache


@pytest.mark.parametrize("box,problem", [
    ((9, 60, 9, 10, 16), "lies entirely outside the 48x36 image"),
    ((9, 20, 9, 0, 16), "has zero or negative width or height"),
    ((10, 20, 9, 10, -16), "has zero or negative width or height"),
])
def test_a_bad_box_is_refused_naming_the_image_and_the_box(tmp_path, box, problem):
    """Boxes that cannot be cropped stop the build: the line names the image and the box (label 10 is the
    digit 0). Boxes partly outside the image, as 5.png's in `ENTRIES`, build (`test_cache_build_skip_reuse_rebuild`)."""
    entries = [("1.png", [(1, 10, 8, 9, 16), box]), *ENTRIES[1:]]
    make_split(tmp_path / "svhn" / "train", entries)
    with pytest.raises(svhn.SvhnFormatError) as error:
        svhn.split_cache(tmp_path / "svhn", "train", tmp_path / "cache", 64)
    message = str(error.value)
    label, left, top, width, height = box
    assert (f"SVHN image {tmp_path / 'svhn' / 'train' / '1.png'}: digit box 2 of 2 (label {label % 10}, left "
            f"{left}, top {top}, width {width}, height {height}) {problem}; correct its entry") in message
    assert "\n" not in message and not list((tmp_path / "cache").iterdir())


def test_boxes_partly_outside_pass_the_check():
    record = svhn.SvhnRecord("5.png", "70", np.array([[-4, 20, 10, 14], [40, 30, 10, 14]], np.float64))
    svhn.check_boxes(record, (36, 48, 3), "5.png")  # over the left edge; over the right and bottom edges
    with pytest.raises(svhn.SvhnFormatError, match=r"5\.png: digit box 1 of 1 .*not a finite number"):
        svhn.check_boxes(svhn.SvhnRecord("5.png", "7", np.array([[np.nan, 20, 10, 14]])), (36, 48, 3), "5.png")


def test_a_cache_folder_without_meta_json_is_replaced(source, tmp_path, caplog):
    """A folder that lost its meta.json (deleted by hand, say) is rebuilt and replaced, not a rename error."""
    first = svhn.split_cache(source, "train", tmp_path / "cache", 64)
    (first.path / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="stn_jax.paper.data.files"):
        again = svhn.split_cache(source, "train", tmp_path / "cache", 64)
    assert again.path == first.path and (again.path / "meta.json").is_file()
    np.testing.assert_array_equal(again.image, first.image)
    assert f"replacing {first.path}: it lacks meta.json" in caplog.text
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]


def test_ctrl_c_during_a_cache_build_is_one_line_and_leaves_nothing(source, tmp_path, monkeypatch):
    calls = []

    def crop_then_interrupt(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((64, 64, 3), np.uint8)

    monkeypatch.setattr(svhn_cache, "_crop_job", crop_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as stop:  # a bare one would stop the test session
        svhn.split_cache(source, "train", tmp_path / "cache", 64)
    message = str(stop.value)
    assert isinstance(stop.value, CacheBuildInterrupted) and "\n" not in message
    assert f"while building the cache {tmp_path / 'cache'}/svhn_train_64px_tight_" in message
    assert "the partial cache was removed: run the same command to build it again" in message
    assert not list((tmp_path / "cache").iterdir())


def test_config_cache_dir_wins_over_the_trainers_folder(source, mnist_folder, tmp_path):
    """Both SVHN tasks cache under ``config.data.cache_dir`` when it is set, not in the folder the trainer
    passes (``<workdir>/data``)."""
    option, argument = tmp_path / "C", tmp_path / "W" / "data"
    real = svhn.make_dataset(config(source=str(source), cache_dir=str(option)), seed=0, global_batch_size=2,
                             cache_dir=argument)
    synthetic = svhn.make_dataset(synth_config(mnist_folder, cache_dir=str(option)), seed=0, global_batch_size=2,
                                  cache_dir=argument)
    real.train_batch(0), real.test_examples([0]), synthetic.test_examples([0])
    assert sorted(p.name.split("_")[:2] for p in option.iterdir() if p.suffix != ".json") == [
        ["svhn", "extra"], ["svhn", "synth"], ["svhn", "test"], ["svhn", "train"]]
    assert not argument.exists()


def test_missing_images_can_be_skipped(source, tmp_path):
    (source / "train" / "2.png").unlink()
    a = svhn.split_cache(source, "train", tmp_path / "cache", 64, allow_missing_images=True)
    assert list(a.filename) == ["1.png", "3.png", "5.png"] and a.meta["counts"]["skipped_missing_image"] == 1


# ---------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------


def test_dataset_interface_and_labels(source, tmp_path):
    ds = svhn.make_dataset(config(source=str(source)), seed=3, global_batch_size=6, cache_dir=tmp_path / "c")
    assert isinstance(ds, svhn.SvhnDataset)
    assert ds.image_shape == (64, 64, 3) and ds.num_classes == 11 and ds.num_digits == 5
    assert ds.local_batch_size == 6 and ds.window == 54
    assert {k: (v.shape, v.dtype) for k, v in ds.element_spec.items()} == {
        "image": ((64, 64, 3), np.float32), "label": ((5,), np.int32), "length": ((), np.int32)}
    assert ds.train_size + ds.validation_size == 4 + 8 and ds.validation_size == 2
    batch = ds.train_batch(0, with_params=True)
    assert batch["image"].shape == (6, 64, 64, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and batch["length"].dtype == np.int32
    for label, length in zip(batch["label"], batch["length"]):
        assert 1 <= length <= 5 and (label[:length] <= 9).all() and (label[length:] == 10).all()
    assert not set(batch["index"].tolist()) & set(ds._validation_index.tolist())  # held out
    test = ds.test_set()
    assert ds.test_size == 4 and [svhn.decode_label(x) for x in test["label"]] == ["19", "5", "203", "70"]
    np.testing.assert_array_equal(ds.test_examples(np.array([2, 0]))["image"], test["image"][[2, 0]])
    assert [b["label"].shape[0] for b in ds.test_batches(3)] == [3, 1]
    assert ds.validation_set()["image"].shape == (2, 64, 64, 3)
    small = svhn.make_dataset(config(source=str(source), test_size=2, random_crop=0), seed=0, global_batch_size=2,
                              cache_dir=tmp_path / "c")
    assert small.test_size == 2 and small.window == 64
    arrays = small.split_arrays("test")
    np.testing.assert_array_equal(small.test_set()["image"], arrays.image[:2] / np.float32(255))


def test_train_batches_are_pure_and_shard(source, tmp_path):
    def make(seed=0, **kw):
        return svhn.make_dataset(config(source=str(source)), seed=seed, global_batch_size=8,
                                 cache_dir=tmp_path / "c", **kw)

    ds = make()
    a = ds.train_batch(5, with_params=True)
    b = make().train_batch(5, with_params=True)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ds.train_batch(7)  # another step in between changes nothing
    np.testing.assert_array_equal(ds.train_batch(5)["image"], a["image"])
    assert not np.array_equal(ds.train_batch(6)["image"], a["image"])
    assert not np.array_equal(make(seed=1).train_batch(5)["image"], a["image"])
    assert len(np.unique(a["offset"], axis=0)) > 1  # random windows
    shards = [make(process_index=p, process_count=4).train_batch(5) for p in range(4)]
    for k in ("image", "label", "length"):
        np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), a[k])


def test_bad_options(source, tmp_path):
    with pytest.raises(ValueError, match="train_splits"):
        svhn.SvhnDataset(config(source=str(source), train_splits="train,valid"), seed=0, global_batch_size=2)
    with pytest.raises(ValueError, match="test_seed is not an option of data task 'svhn'"):
        svhn.SvhnDataset(config(source=str(source), test_seed=1), seed=0, global_batch_size=2)
    ds = svhn.SvhnDataset(config(source=str(source), validation_size=100), seed=0, global_batch_size=2,
                          cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="validation_size"):
        ds.train_batch(0)


# ---------------------------------------------------------------------------
# The synthetic stand-in.
# ---------------------------------------------------------------------------


def write_idx(folder: Path, prefix: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):  # a bright stroke-like rectangle per "digit"
        x0, y0 = rng.integers(4, 12, 2)
        images[i, y0:y0 + 14, x0:x0 + int(rng.integers(3, 10))] = rng.integers(150, 256)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 0x00000803, n, 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 0x00000801, n) + labels.tobytes())


@pytest.fixture
def mnist_folder(tmp_path) -> Path:
    folder = tmp_path / "mnist"
    folder.mkdir()
    write_idx(folder, "train", 50, 0)
    write_idx(folder, "t10k", 30, 1)
    return folder


def synth_config(folder, **overrides):
    c = svhn.default_config("svhn_synth")
    c.update(dict(source=str(folder), test_size=6))
    c.update(overrides)
    return c


@pytest.mark.parametrize("size", [64, 128])
def test_synth_shapes_and_labels(mnist_folder, size):
    ds = svhn.make_dataset(synth_config(mnist_folder, image_size=size), seed=0, global_batch_size=16)
    assert isinstance(ds, svhn.SvhnSynthDataset) and ds.framing == ("tight" if size == 64 else "loose")
    assert ds.image_shape == (size, size, 3) and ds.num_classes == 11 and ds.num_digits == 5
    batch = ds.train_batch(0, with_params=True)
    assert batch["image"].shape == (16, size, size, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and batch["length"].dtype == np.int32
    mnist_labels = ds.mnist("train")[1]
    for label, length, index in zip(batch["label"], batch["length"], batch["index"]):
        assert 1 <= length <= 5 and (label[length:] == 10).all()
        assert label[:length].tolist() == mnist_labels[index[:length]].tolist() and (index[length:] == -1).all()
    assert len(set(batch["length"].tolist())) > 1
    assert batch["image"].std(axis=(1, 2, 3)).min() > 0.01  # not blank
    test = ds.test_set()
    assert test["image"].shape == (6, size, size, 3) and ds.test_size == 6


def test_synth_pure_and_sharded(mnist_folder, tmp_path):
    def make(**kw):
        return svhn.make_dataset(synth_config(mnist_folder), seed=1, global_batch_size=8, **kw)

    a = make().train_batch(3)
    b = make().train_batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(make().train_batch(4)["image"], a["image"])
    shards = [make(process_index=p, process_count=2).train_batch(3) for p in range(2)]
    for k in a:
        np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), a[k])
    ds = make()
    test = ds.test_set()
    np.testing.assert_array_equal(ds.test_examples([4, 1])["image"], test["image"][[4, 1]])
    cached = make(cache_dir=tmp_path / "cache")
    for k in test:
        np.testing.assert_array_equal(cached.test_set()[k], test[k])
    assert cached.test_checksum and list((tmp_path / "cache").glob("svhn_synth_test_*.npz"))
    again = make(cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.test_examples([5])["image"], test["image"][[5]])


def test_synth_needs_a_source():
    with pytest.raises(svhn.SvhnSourceError, match="MNIST"):
        svhn.make_dataset({"task": "svhn_synth"}, seed=0, global_batch_size=2)


@pytest.mark.parametrize("size,framing", [(64, "tight"), (128, "loose")])
def test_synth_boxes_are_where_the_ink_is(size, framing):
    """Each digit's ``box`` against the pixels its ink changes: the same number drawn with every digit blank
    but that one, minus the number drawn with all blank (the same random draws: the same background, colours,
    clutter and noise), is nonzero where that digit's ink is."""
    digits, labels = synthetic_digits(300, 0)
    inks = np.array([svhn.ink_box(d) for d in digits])
    blank = np.zeros_like(digits)

    def draw(images, seed):
        return svhn.synth_number(np.random.default_rng(seed), images, labels, size, framing, inks=inks)

    errors = []
    for seed in range(12):
        number = draw(digits, seed)
        ids = number["index"][:number["length"]]
        assert np.isnan(number["box"][len(ids):]).all()
        if len(set(ids.tolist())) < len(ids):
            continue  # a digit used twice cannot be drawn alone
        background = draw(blank, seed)["image"].astype(np.int32)
        for k, i in enumerate(ids):
            alone = blank.copy()
            alone[i] = digits[i]
            change = np.abs(draw(alone, seed)["image"].astype(np.int32) - background).max(-1)
            ys, xs = np.nonzero(change > 0.15 * change.max())
            left, top, width, height = number["box"][k]
            expected = np.clip([left, top, left + width, top + height], 0, size)
            ink = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            errors.append((ink - expected) / [width, height, width, height])
    errors = np.array(errors)  # (digits, 4): each side's error as a fraction of the box's width or height
    assert len(errors) >= 20
    # About one pixel of the digit as drawn before the warp (its ink's soft edge): up to a quarter of a narrow
    # digit's width (a "1" is 3-5 pixels wide), a tenth of its height (20 pixels).
    assert np.abs(errors[:, [0, 2]]).max() <= 0.3 and np.abs(errors[:, [1, 3]]).max() <= 0.12
    assert np.abs(errors.mean(0)).max() <= 0.04  # no bias on any side


def test_svhn_framing_prints_the_table_and_draws(source, mnist_folder, tmp_path):
    """`experiments.svhn_framing` on a generated format-1 folder and MNIST: the table (real tight crops: the
    number fills 1/1.3 of the width, centred) and the picture; a missing folder is one line."""
    tool = [sys.executable, "-m", "experiments.svhn_framing", f"--mnist={mnist_folder}", "--count=12"]
    out = subprocess.run([*tool, f"--source={source}", f"--out={tmp_path / 'framing.png'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["statistic", "source", "size", "median", "p10", "p90"]
    assert "number width   real         64   0.769  0.769  0.769" in lines
    assert "centre offset  real        128   0.000  0.000  0.000" in lines
    assert sum(line.startswith(("digit height", "number width", "centre offset")) for line in lines) == 12
    real = next(line for line in lines if line.startswith("real ("))
    assert real.split() == ["real", "(4)", "25.0", "50.0", "25.0", "0.0", "0.0"]  # 19, 5, 203, 70
    assert next(line for line in lines if line.startswith("synthetic (")).startswith("synthetic (12)")
    with Image.open(tmp_path / "framing.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 300
    missing = subprocess.run([*tool, f"--source={tmp_path / 'nowhere'}", f"--out={tmp_path / 'no.png'}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"error: SVHN source {tmp_path / 'nowhere'} does not exist" in missing.stderr


# ---------------------------------------------------------------------------
# Real data (../shared).
# ---------------------------------------------------------------------------

KNOWN = {"1.png": "19", "2.png": "23", "100.png": "109", "2182.png": "595"}


@pytest.mark.real_data
def test_real_subset_labels_and_crops():
    folder = shared_path("data/svhn_format1_subset") / "train"
    records = {r.filename: r for r in svhn.read_annotations(folder)}
    assert len(records) == 595
    for name, digits in KNOWN.items():
        assert records[name].digits == digits
    for name in KNOWN:
        image = svhn.load_image(folder / name)
        for crop, size in ((svhn.crop_64, 64), (svhn.crop_128, 128)):
            out = crop(image, records[name].boxes)
            assert out.shape == (size, size, 3) and out.dtype == np.uint8
            assert out.std() > 10, f"{name}: a blank {size} px crop"


@pytest.mark.real_data
def test_real_sample_mat_files():
    root = shared_path("data/svhn_format1_sample")
    expected = {"train": ["19", "23", "25"], "test": ["5", "210", "6"], "extra": ["478", "71", "174"]}
    subset = shared_path("data/svhn_format1_subset") / "train"
    json_records = {r.filename: r for r in svhn.read_annotations(subset)}
    for split, digits in expected.items():
        records = svhn.read_annotations(root, split)
        assert len(records) == (39 if split == "train" else 40)  # entries of absent images are kept too
        assert [r.digits for r in records[:3]] == digits
        if split == "train":
            for r in records:
                if r.filename in KNOWN:
                    assert r.digits == KNOWN[r.filename]
                if r.filename in json_records:
                    np.testing.assert_array_equal(r.boxes, json_records[r.filename].boxes)


@pytest.mark.real_data
def test_real_dataset_from_the_subset(tmp_path):
    root = shared_path("data/svhn_format1_subset")
    c = config(source=str(root), train_splits="train", test_split="train", validation_size=50, test_size=8)
    ds = svhn.make_dataset(c, seed=0, global_batch_size=4, cache_dir=tmp_path / "cache")
    test = ds.test_set()
    assert [svhn.decode_label(x) for x in test["label"][:2]] == ["19", "23"]
    assert test["image"].shape == (8, 64, 64, 3) and test["image"].std() > 0.05
    batch = ds.train_batch(0)
    assert batch["image"].shape == (4, 64, 64, 3) and ds.train_size == 545
    sample = svhn.split_cache(shared_path("data/svhn_format1_sample"), "test", tmp_path / "cache", 64,
                              allow_missing_images=True)  # the .mat names 40 images, 3 are present
    assert [svhn.decode_label(x) for x in sample.label] == ["5", "210", "6"]
    assert sample.meta["counts"]["skipped_missing_image"] == 37
