"""Street View House Numbers, multi-digit (paper Sect. 4.2, Table 2): readers, crops, cache, data sets.

Two tasks, one interface (`SvhnDataset`, `SvhnSynthDataset`; `make_dataset`
picks by ``config.data.task``):

* ``svhn``: the real format-1 data ("full numbers") of Netzer et al. 2011;
* ``svhn_synth``: an offline stand-in, house-number-like images composed from
  MNIST digits (no SVHN files needed).

Design of ``svhn``:

* **Sources.** ``config.data.source`` is a folder holding, per split
  (``train``, ``test``, ``extra``), either a sub-folder ``<split>/`` or the
  official archive ``<split>.tar.gz`` (``.tgz``, ``.tar``) as downloaded from
  http://ufldl.stanford.edu/housenumbers/; a split folder itself (whose name is
  the split) works too. A split holds ``N.png`` files and their annotation,
  ``digitStruct.mat`` (MATLAB v7.3 = HDF5, read with h5py; the struct array
  ``digitStruct`` with ``name`` and ``bbox``, whose fields ``label``, ``left``,
  ``top``, ``width``, ``height`` are one scalar dataset for a one-digit number
  and arrays of object references for longer ones) or the common community
  conversion ``digitStruct.json``
  (``[{"filename": "1.png", "boxes": [{"left", "top", "width", "height", "label"}]}]``).
  In both, label 10 means the digit 0. `read_annotations` returns one
  `SvhnRecord` per image (file name, digit string, boxes in float pixels).
  Missing folders, archives, annotation files or images raise `SvhnSourceError`
  (a `FileNotFoundError`) naming the path and where the archives are; an
  unreadable annotation file raises `SvhnFormatError` naming it.
  Archives are read as streams (no extraction to disk).
* **Crops.** ``framing="tight"`` (`crop_64`, Goodfellow et al. 2013): the
  smallest rectangle holding every digit box, enlarged by 30 % in x and in y
  about its centre, cropped and resized to ``image_size`` (64) square; the
  aspect ratio is not kept (Goodfellow et al. 2013 resize the rectangle).
  ``framing="loose"`` (`crop_128`) [U: the paper only says "looser 128x128
  crops with more background, following Ba et al."]: a square centred on the
  digits' union box whose side is ``LOOSE_FACTOR`` (2) times the longer side
  of the 30 %-enlarged box, resized to ``image_size`` (128). The digits then
  have about the same size in pixels as in the 64 px crops, inside twice the
  field of view. ``framing="auto"`` (default) is tight below 128 px, loose from
  128 px. Parts of a crop outside the image repeat the image's edge pixels [U]
  (not black borders that would mark the frame). Resizing is PIL's bilinear
  filter (antialiased when shrinking) on the exact, sub-pixel crop box.
* **Labels.** ``label`` int32 ``(5,)``: the digits left to right (0-9; the
  annotation's 10 becomes 0), then 10 = "no digit" in the unused positions
  (the paper's five 11-way classifiers, paper Sect. 4.2); ``length`` int32
  (1-5). Numbers with more than 5 digits (and entries with no box) are skipped
  and counted in the log, as in Goodfellow et al. 2013.
* **Cache.** Each split is cropped once into ``<cache_dir>/svhn_<split>_<S>px_<framing>_<fingerprint>/``:
  ``image.npy`` uint8 ``(N, S, S, 3)``, ``label.npy`` int32 ``(N, 5)``,
  ``length.npy`` int32 ``(N,)``, ``box.npy`` float32 ``(N, 5, 4)`` (the digit
  boxes in source pixels, NaN-padded), ``filename.npy`` and ``meta.json``
  (options, ``CACHE_VERSION``, counts, SHA-256 of every file). The fingerprint
  hashes the options (size, framing, recipe version, split, missing-image
  policy) and a listing of the source (the annotation file's SHA-256 and every
  image's name and size; for archives their name, size and first/last MiB),
  so a changed option or source makes a new cache. Built with a progress bar,
  in worker processes (``num_workers``), into a temporary folder that is
  renamed when complete (`files.building_folder`: a Ctrl-C or an error removes
  it; a folder left without its ``meta.json`` is rebuilt and replaced); read
  back with ``np.load(mmap_mode="r")``, so 235k images are never all in memory.
  A truncated or unreadable PNG (or bytes that are no image) stops the build
  with one line naming the file, from the worker processes too; so does a
  digit box with zero or negative width or height, or one entirely outside its
  image (`check_boxes`: the line names the image and the box). Boxes partly
  outside the image are normal in SVHN (225 of the 99,289 boxes of the
  official train and test annotations) and are cropped as usual. The SHA-256
  sums are checked on load for caches up to ``VERIFY_LIMIT_BYTES`` (1 GiB),
  larger ones by size (their digests are logged; `verify_cache` checks them
  in full).
* **Training batches** are pure functions of ``(seed, step, example index)``:
  example ``j`` of the global batch of ``step`` draws everything from
  ``np.random.default_rng((TRAIN_STREAM, seed, step, j))``: a uniform index
  into the training pool (with replacement), then its augmentation. Process
  ``p`` of ``P`` computes rows ``[p B / P, (p + 1) B / P)``, so the shards
  concatenate to the single-process batch, bit for bit (every example is
  computed on its own, whatever the batch size), and a resumed run sees the
  same batches.
* **Augmentation** [U: Goodfellow et al. 2013 train on random 54x54 crops of
  the 64x64 image; the paper does not say what it did, and its 64 px network
  input hints that 64 px goes in]: ``random_crop = W`` takes a W x W window at
  a uniformly random integer offset of the S x S crop and resizes it (bilinear)
  back to S x S; test and validation examples take the centred window, resized
  the same way, so train and test see the same scale. ``-1`` (default) means
  ``round(54 / 64 * S)``: 54 at 64 px, 108 at 128 px; ``0`` (or S) turns it off.
* **Splits.** Training draws from the union of ``train_splits`` (default
  ``train,extra`` [U]: the paper's "about 200k images" suggests train + extra,
  235,755 images, as in Goodfellow et al. 2013). ``validation_size`` (5,000
  [S: hyper-parameters were tuned on a 5k validation set]) images are held out
  from that union by a fixed random draw (independent of the seed) [U] and
  never used for training. The test set is the ``test`` split in file order
  (13,068 images), no random window.
* **Images** are float32 RGB in [0, 1]. No mean subtraction here (Goodfellow
  et al. 2013 subtract each image's mean: a model can do it).

Design of ``svhn_synth`` (no counterpart in the paper; a stand-in for offline
studies and tests) [U throughout]: a number of 1-5 MNIST digits, narrowed to
about half as wide as tall, each scaled by 0.97-1.03 and shifted up or down a
little, about touching, slanted by a common shear, drawn in one colour on a
background of another colour (luminance contrast at least 0.3) with a smooth
low-frequency texture, a colour gradient, random clutter strokes, a slight
blur and pixel noise. Each digit's box is the axis-aligned box of its slanted
ink (`synth_number` returns them, ``box``). Framing as for the real data, on
the union of these boxes: tight (the 30 %-enlarged union box fills the frame,
aspect not kept) or loose (a square twice the enlarged box's longer side,
centred on the number), each with a jitter of 5 % in size and 4 % in
position. The layout parameters (``SYNTH_LENGTH_PROBS``, ``SYNTH_SQUEEZE``,
``SYNTH_GAP``, ``SYNTH_DIGIT_SCALE``, ``SYNTH_DY``) are matched to real SVHN:
the number of digits to the frequencies of SVHN train (33,402 images), the
shape and spacing of the digit boxes to 595 real train images (1,293 boxes:
width / height median 0.50, gap between neighbours median 0 of the height,
the digits of a number equally tall and nearly aligned). Measured with
``experiments/svhn_framing.py`` on those 595 images, the 64 px and 128 px
crops then agree with the real ones in digit height, number width (both as
fractions of the crop's side, medians within 1 %) and digit count (within
1 point per length); the real crops are exactly centred on the number, the
synthetic ones up to 4 % off (docs/data.md). Training examples use the MNIST
train digits and ``default_rng((TRAIN_STREAM, seed, step, j))``; test
example ``i`` uses the MNIST test digits and ``default_rng((TEST_STREAM,
test_seed, i))``, so it is a pure function of ``i`` (cached with its SHA-256
when a cache folder is given).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from stn_jax.paper.data.files import (
    IMAGE_ERRORS,
    array_digest,
    atomic_write,
    building_folder,
    cache_folder,
    describe_image_error,
    ignore_interrupts,
    progress,
    sha256_file,
)
from stn_jax.paper.data.tasks import EVALUATION_OPTIONS, resolve_options

log = logging.getLogger(__name__)

TASKS = ("svhn", "svhn_synth")
SPLITS = ("train", "test", "extra")
MAX_DIGITS = 5          # [P] five digit classifiers
NUM_CLASSES = 11        # [P] 10 digits + "no digit"
NO_DIGIT = 10           # label value of an unused position
ANNOTATIONS = ("digitStruct.mat", "digitStruct.json")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
OFFICIAL_URL = "http://ufldl.stanford.edu/housenumbers/"
HOW_TO_GET = (
    f"The official SVHN format-1 archives are at {OFFICIAL_URL} (train.tar.gz, test.tar.gz, extra.tar.gz): put "
    "them, or the folders train/, test/, extra/ they unpack to, into one folder and pass it as "
    "--config.data.source=/path/to/svhn.")

TIGHT_ENLARGE = 1.3     # Goodfellow et al. 2013: the union box enlarged by 30 % in x and y
LOOSE_FACTOR = 2.0      # [U] loose framing: square side = 2 x the longer side of the enlarged box
GOODFELLOW_WINDOW = 54 / 64  # Goodfellow et al. 2013: random 54x54 crops of the 64x64 image
CROP_VERSION = 1        # bump when the crop recipe changes (invalidates caches)
CACHE_VERSION = 1       # bump when the cache layout changes
SYNTH_VERSION = 2       # bump when the synthetic generator changes (invalidates cached synthetic test sets)
VERIFY_LIMIT_BYTES = 1 << 30

TRAIN_STREAM = 0x5452   # "TR": separate random streams
TEST_STREAM = 0x5445    # "TE"
VALID_STREAM = 0x5641   # "VA"
HOLDOUT_SEED = 0x484F   # "HO": the fixed draw of the validation hold-out

# The synthetic numbers' layout [U], matched to real SVHN (see the module docstring). Lengths: SVHN train's
# 5,137 / 18,130 / 8,691 / 1,434 / 9 numbers of 1-5 digits (and one of 6) of its 33,402 images.
SYNTH_LENGTH_PROBS = (0.1538, 0.5428, 0.2602, 0.0429, 0.0003)
SYNTH_DIGIT_SCALE = (0.97, 1.03)  # each digit's size factor (MNIST digits' ink is 20 px tall)
SYNTH_SQUEEZE = (0.5, 0.65)     # the number's width factor: MNIST digits are 0.75 as wide as tall (median)
SYNTH_GAP = (-1.0, 3.0)         # pixels between neighbouring digits' ink at MNIST scale
SYNTH_DY = 0.6                  # standard deviation of each digit's vertical shift, pixels at MNIST scale
SYNTH_SHEAR = 0.3               # the number's slant: x += shear * y, shear uniform in [-0.3, 0.3]


class SvhnSourceError(FileNotFoundError):
    """An SVHN folder, archive, annotation file or image is missing; the message names it and the archives."""


class SvhnFormatError(ValueError):
    """An annotation file (digitStruct.mat / .json) or cache is corrupt or not in the expected layout."""


# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


def default_config(task: str = "svhn") -> ml_collections.ConfigDict:
    """The data section for ``task`` (``"svhn"`` or ``"svhn_synth"``), every option with its default.

    Provenance tags [P], [S], [U]: defined in `stn_jax.paper`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown data task {task!r}; choose one of {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.task = task
    c.image_size = 64          # [P] 64 (tight crops) or 128 (loose crops)
    c.framing = "auto"         # "tight" | "loose" | "auto" (= tight below 128 px, loose from 128 px)
    c.validation_size = 5_000 if task == "svhn" else 0  # [S] a 5k validation set; held out, never trained on
    c.cache_dir = ""           # "" = the cache_dir argument (the trainer's <workdir>/data), else ~/.cache/stn_jax
    if task == "svhn":
        c.source = ""          # folder with train/ test/ extra/ (or train.tar.gz, ...): must be set
        c.train_splits = "train,extra"  # [U] "about 200k images" (paper) suggests train + extra
        c.random_crop = -1     # [U] window side W (-1 = round(54/64 S), Goodfellow's 54 at 64 px; 0 = off)
        c.test_split = "test"  # [P] the official test split (13,068 images)
        c.test_size = -1       # -1 = the whole split, else its first test_size images (file order)
        c.allow_missing_images = False  # True: images named by the annotation but absent are skipped (counted)
        c.num_workers = -1     # processes that build the crop cache; -1 = all cores (at most 16), 0 = in-process
    else:
        c.source = ""          # an MNIST folder of the four IDX files (e.g. ../shared/data/mnist) or "tfds"
        c.max_length = MAX_DIGITS  # [U] numbers of 1..max_length digits
        c.test_seed = 2015     # [U] fixed, independent of the training seed
        c.test_size = 10_000   # [U] synthetic test numbers (from the MNIST test digits)
    return c


def _validate(p: dict[str, Any]) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(f"config.data (task {p['task']!r}): {message}")

    need(int(p["image_size"]) >= 8, f"image_size must be >= 8, got {p['image_size']}")
    need(p["framing"] in ("auto", "tight", "loose"), f"framing must be auto, tight or loose, got {p['framing']!r}")
    need(int(p["validation_size"]) >= 0, f"validation_size must be >= 0, got {p['validation_size']}")
    need(p["test_size"] == -1 or p["test_size"] >= 1, f"test_size must be -1 or >= 1, got {p['test_size']}")
    if p["task"] == "svhn":
        splits = _split_list(p["train_splits"])
        need(splits and all(s in SPLITS for s in splits),
             f"train_splits must be a comma-separated list of {', '.join(SPLITS)}, got {p['train_splits']!r}")
        need(p["test_split"] in SPLITS, f"test_split must be one of {', '.join(SPLITS)}, got {p['test_split']!r}")
        window = resolve_window(int(p["image_size"]), int(p["random_crop"]))
        need(1 <= window <= int(p["image_size"]),
             f"random_crop must be -1, 0 or in [1, image_size], got {p['random_crop']}")
    else:
        need(1 <= int(p["max_length"]) <= MAX_DIGITS, f"max_length must be in [1, 5], got {p['max_length']}")


def _split_list(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def resolve_framing(image_size: int, framing: str = "auto") -> str:
    """``"tight"`` or ``"loose"``: ``auto`` is tight below 128 px, loose from 128 px."""
    if framing == "auto":
        return "loose" if image_size >= 128 else "tight"
    if framing not in ("tight", "loose"):
        raise ValueError(f"framing must be auto, tight or loose, got {framing!r}")
    return framing


def resolve_window(image_size: int, random_crop: int) -> int:
    """The augmentation window's side: ``-1`` = round(54/64 S), ``0`` = S (off)."""
    if random_crop == -1:
        return int(round(GOODFELLOW_WINDOW * image_size))
    if random_crop == 0:
        return image_size
    return int(random_crop)


# ----------------------------------------------------------------------------
# Annotations.
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SvhnRecord:
    """One annotated image: ``filename`` (``"1.png"``), ``digits`` (``"19"``, left to right) and
    ``boxes`` float64 ``(n, 4)``: each digit's left, top, width, height in pixels."""

    filename: str
    digits: str
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.digits)


def encode_label(digits: str) -> tuple[np.ndarray, int]:
    """``"19"`` -> (``[1, 9, 10, 10, 10]`` int32, 2); raises ValueError for more than 5 digits."""
    if not 1 <= len(digits) <= MAX_DIGITS:
        raise ValueError(f"a number must have 1-{MAX_DIGITS} digits, got {digits!r}")
    label = np.full(MAX_DIGITS, NO_DIGIT, np.int32)
    label[:len(digits)] = [int(c) for c in digits]
    return label, len(digits)


def decode_label(label: Sequence[int]) -> str:
    """Inverse of `encode_label`: the digits before the first 10 ("no digit")."""
    out = []
    for value in np.asarray(label).ravel():
        if value == NO_DIGIT:
            break
        out.append(str(int(value)))
    return "".join(out)


def _digit_char(value: float, where: str) -> str:
    v = float(value)
    if v != int(v) or not 0 <= v <= 10:
        raise SvhnFormatError(f"{where}: digit label {value!r} is not an integer 0-10")
    return str(int(v) % 10)  # the annotation's 10 means the digit 0


def _record(filename: str, labels, lefts, tops, widths, heights, where: str) -> SvhnRecord:
    n = len(labels)
    if not n == len(lefts) == len(tops) == len(widths) == len(heights):
        raise SvhnFormatError(f"{where}: the box fields have different lengths")
    digits = "".join(_digit_char(v, where) for v in labels)
    boxes = np.array([lefts, tops, widths, heights], np.float64).T.reshape(n, 4)
    return SvhnRecord(Path(str(filename)).name, digits, boxes)


def read_digit_struct_json(data: bytes | str | os.PathLike, name: str | None = None) -> list[SvhnRecord]:
    """Reads the community JSON form of digitStruct (a path, or the file's bytes with its ``name``)."""
    if isinstance(data, (str, os.PathLike)):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise SvhnSourceError(f"SVHN annotation file {name} is missing. {HOW_TO_GET}") from None
    name = name or "digitStruct.json"
    try:
        entries = json.loads(data)
        if not isinstance(entries, list):
            raise TypeError(f"the top level is a {type(entries).__name__}, not a list")
        records = []
        for i, entry in enumerate(entries):
            boxes = entry["boxes"]
            where = f"{name}, entry {i} ({entry['filename']})"
            fields = {k: [float(b[k]) for b in boxes] for k in ("label", "left", "top", "width", "height")}
            records.append(_record(entry["filename"], fields["label"], fields["left"], fields["top"],
                                   fields["width"], fields["height"], where))
    except SvhnFormatError:
        raise
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise SvhnFormatError(f"SVHN annotation file {name} is not a valid digitStruct.json "
                              f"({type(e).__name__}: {e}); expected [{{\"filename\": \"1.png\", \"boxes\": "
                              f"[{{\"left\", \"top\", \"width\", \"height\", \"label\"}}]}}]. {HOW_TO_GET}") from None
    return records


def read_digit_struct_mat(data: bytes | str | os.PathLike, name: str | None = None, *,
                          progress: bool = False) -> list[SvhnRecord]:
    """Reads an official ``digitStruct.mat`` (MATLAB v7.3 / HDF5) from a path or the file's bytes.

    ``bbox`` fields are a scalar dataset for a one-digit number and an array of
    object references (each to a 1x1 dataset) for several digits. The full
    ``extra`` annotation (202,353 entries) takes minutes: h5py dereferences
    every value on its own.
    """
    import h5py

    if isinstance(data, (str, os.PathLike)):
        name = name or str(data)
        if not Path(data).is_file():
            raise SvhnSourceError(f"SVHN annotation file {name} is missing. {HOW_TO_GET}")
        handle: Any = str(data)
    else:
        name = name or "digitStruct.mat"
        handle = io.BytesIO(data)

    def corrupt(e: BaseException, where: str = "") -> SvhnFormatError:
        return SvhnFormatError(f"SVHN annotation file {name}{where} is corrupt, truncated or not a MATLAB v7.3 "
                               f"digitStruct.mat ({type(e).__name__}: {e}); download and unpack the split's "
                               f"archive again. {HOW_TO_GET}")

    try:
        f = h5py.File(handle, "r")
    except (OSError, ValueError) as e:
        raise corrupt(e) from None
    records = []
    with f:
        try:
            group = f["digitStruct"]
            names = np.asarray(group["name"][()]).ravel()
            bboxes = np.asarray(group["bbox"][()]).ravel()
            if len(names) != len(bboxes):
                raise ValueError(f"{len(names)} names but {len(bboxes)} bbox entries")
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise corrupt(e) from None
        entries: Iterable[int] = range(len(names))
        if progress and len(names) > 1000:
            entries = progress(entries, total=len(names), desc=f"reading {Path(name).name}")
        for i in entries:
            try:
                chars = _h5_read(h5py.h5r.dereference(names[i], f.id), np.uint16).ravel()
                filename = "".join(chr(int(c)) for c in chars)
                box = h5py.h5r.dereference(bboxes[i], f.id)
                fields = {}
                for key in ("label", "left", "top", "width", "height"):
                    ds = h5py.h5d.open(box, key.encode())
                    if ds.get_type().get_class() == h5py.h5t.REFERENCE:  # several digits: one reference each
                        refs = _h5_read(ds, h5py.ref_dtype).ravel()
                        fields[key] = [float(_h5_read(h5py.h5r.dereference(r, f.id), np.float64).ravel()[0])
                                       for r in refs]
                    else:  # one digit: the value itself
                        fields[key] = [float(v) for v in _h5_read(ds, np.float64).ravel()]
            except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
                raise corrupt(e, f" (entry {i})") from None
            records.append(_record(filename, fields["label"], fields["left"], fields["top"], fields["width"],
                                   fields["height"], f"{name}, entry {i} ({filename})"))
    return records


def _h5_read(dataset, dtype) -> np.ndarray:
    """Reads a whole low-level h5py dataset id (3x faster than the high-level API per small dataset)."""
    import h5py

    out = np.empty(dataset.shape, dtype)
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def _parse_annotation(data: bytes, name: str, progress: bool = False) -> list[SvhnRecord]:
    """Parses annotation bytes read from an archive; a .mat goes through a temporary file (h5py reads a
    file on disk much faster than a Python file object)."""
    if name.endswith(".json"):
        return read_digit_struct_json(data, name)
    with tempfile.TemporaryDirectory(prefix="svhn_digitStruct") as tmp:
        path = Path(tmp) / "digitStruct.mat"
        path.write_bytes(data)
        return read_digit_struct_mat(path, name, progress=progress)


# ----------------------------------------------------------------------------
# Locating a split: a folder or an archive.
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSource:
    """Where one split lives: ``kind`` is ``"folder"`` (``path`` = the folder holding the PNGs and
    ``annotation`` = its digitStruct file) or ``"archive"`` (``path`` = the .tar.gz; ``annotation`` None)."""

    split: str
    kind: str
    path: Path
    annotation: Path | None = None


def _is_archive(path: Path) -> bool:
    return path.is_file() and any(path.name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _folder_source(split: str, folder: Path) -> SplitSource:
    for name in ANNOTATIONS:
        if (folder / name).is_file():
            return SplitSource(split, "folder", folder, folder / name)
    raise SvhnSourceError(f"SVHN annotation file {folder / ANNOTATIONS[0]} is missing (looked for "
                          f"{' and '.join(str(folder / n) for n in ANNOTATIONS)}). {HOW_TO_GET}")


def locate_split(source: str | os.PathLike, split: str) -> SplitSource:
    """Finds ``split`` under ``source``: ``<source>/<split>/``, ``<source>/<split>.tar.gz`` (``.tgz``,
    ``.tar``), or ``source`` itself when it is that split's folder or archive.

    Raises `SvhnSourceError` naming the paths tried and where the official archives are.
    """
    if not source:
        raise SvhnSourceError(f"config.data.source is empty: set --config.data.source to the SVHN folder. "
                              f"{HOW_TO_GET}")
    root = Path(source).expanduser()
    if not root.exists():
        raise SvhnSourceError(f"SVHN source {root} does not exist. {HOW_TO_GET}")
    if root.is_file():
        if _is_archive(root) and root.name.split(".")[0] == split:
            return SplitSource(split, "archive", root)
        raise SvhnSourceError(f"SVHN source {root} is a file, not the {split} split's archive ({split}.tar.gz) "
                              f"or a folder. {HOW_TO_GET}")
    if (root / split).is_dir():
        return _folder_source(split, root / split)
    for suffix in ARCHIVE_SUFFIXES:
        if _is_archive(root / f"{split}{suffix}"):
            return SplitSource(split, "archive", root / f"{split}{suffix}")
    if root.name == split and any((root / n).is_file() for n in ANNOTATIONS):
        return _folder_source(split, root)
    raise SvhnSourceError(f"SVHN split {split!r} is missing: neither the folder {root / split} nor the archive "
                          f"{root / (split + '.tar.gz')} exists. {HOW_TO_GET}")


def _archive_annotation_and_images(path: Path, progress: bool = False) -> tuple[list[SvhnRecord], str, set[str]]:
    """One pass over an archive: (records, the folder of the annotation inside it, PNG names in that folder)."""
    annotation: tuple[str, bytes] | None = None
    pngs: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                if base in ANNOTATIONS and (annotation is None or base == ANNOTATIONS[0]):
                    annotation = (member.name, tar.extractfile(member).read())
                elif base.lower().endswith(".png"):
                    pngs.setdefault(folder, set()).add(base)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SvhnFormatError(f"SVHN archive {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              f"download it again. {HOW_TO_GET}") from None
    if annotation is None:
        raise SvhnSourceError(f"SVHN archive {path} holds no digitStruct.mat or digitStruct.json. {HOW_TO_GET}")
    member_name, data = annotation
    folder = member_name.rpartition("/")[0]
    records = _parse_annotation(data, f"{path}:{member_name}", progress)
    return records, folder, pngs.get(folder, set())


def read_annotations(path: str | os.PathLike, split: str | None = None, *, progress: bool = False) -> list[SvhnRecord]:
    """The records of one split, in the annotation's order.

    ``path``: a ``digitStruct.mat`` / ``digitStruct.json`` file, a split folder
    holding one, a split archive (``train.tar.gz``), or (with ``split``) a folder
    holding the split (`locate_split`).
    """
    p = Path(path).expanduser()
    if split is not None:
        src = locate_split(p, split)
    elif p.is_file() and p.name in ANNOTATIONS:
        src = SplitSource("", "folder", p.parent, p)
    elif _is_archive(p):
        src = SplitSource("", "archive", p)
    elif p.is_dir():
        src = _folder_source(p.name, p)
    else:
        raise SvhnSourceError(f"SVHN annotations {p} do not exist. {HOW_TO_GET}")
    if src.kind == "archive":
        return _archive_annotation_and_images(src.path, progress)[0]
    assert src.annotation is not None
    if src.annotation.name.endswith(".json"):
        return read_digit_struct_json(src.annotation)
    return read_digit_struct_mat(src.annotation, progress=progress)


def load_image(path: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """A PNG (path or bytes) as uint8 RGB ``(H, W, 3)``; ``name`` names it in errors (default: the path).

    Raises `SvhnSourceError` for a missing file and `SvhnFormatError` naming the image when it is
    truncated or not an image (what to do included: one bad file among thousands is otherwise hard to find).
    """
    from PIL import Image

    in_archive = isinstance(path, bytes)
    name = name or ("an SVHN image given as bytes" if in_archive else str(path))
    try:
        with Image.open(io.BytesIO(path) if in_archive else path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SvhnSourceError(f"SVHN image {name} is missing. {HOW_TO_GET}") from None
    except IMAGE_ERRORS as e:
        remedy = ("download the archive again" if in_archive else "replace it with the original file, or delete "
                  "it and set config.data.allow_missing_images=True to skip it")
        raise SvhnFormatError(f"SVHN image {name} is truncated or unreadable ({describe_image_error(e)}): "
                              f"{remedy}. {HOW_TO_GET}") from None


# ----------------------------------------------------------------------------
# Crops.
# ----------------------------------------------------------------------------


def union_box(boxes: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: the smallest rectangle holding every ``(left, top, width, height)`` box."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float((b[:, 0] + b[:, 2]).max()),
            float((b[:, 1] + b[:, 3]).max()))


def crop_box(boxes: np.ndarray, framing: str = "tight") -> tuple[float, float, float, float]:
    """The source rectangle ``(x0, y0, x1, y1)`` a crop covers (see the module docstring).

    tight: the union box enlarged by 30 % in x and y about its centre (Goodfellow et al. 2013);
    loose [U]: the square centred on it whose side is ``LOOSE_FACTOR`` times the tight box's longer side.
    """
    x0, y0, x1, y1 = union_box(boxes)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = max(x1 - x0, 1.0) * TIGHT_ENLARGE, max(y1 - y0, 1.0) * TIGHT_ENLARGE
    if framing == "loose":
        w = h = LOOSE_FACTOR * max(w, h)
    elif framing != "tight":
        raise ValueError(f"framing must be tight or loose, got {framing!r}")
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def crop_and_resize(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The sub-pixel rectangle ``box = (x0, y0, x1, y1)`` of ``image`` (uint8 (H, W, 3)) resized to
    ``size x size`` (PIL bilinear, antialiased when shrinking); outside the image the edge pixels repeat."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = max(math.ceil(x1), ix0 + 1), max(math.ceil(y1), iy0 + 1)
    rows = np.clip(np.arange(iy0, iy1), 0, h - 1)
    cols = np.clip(np.arange(ix0, ix1), 0, w - 1)
    region = np.ascontiguousarray(image[rows][:, cols])
    sub = (x0 - ix0, y0 - iy0, max(x1 - ix0, x0 - ix0 + 1e-3), max(y1 - iy0, y0 - iy0 + 1e-3))
    out = Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR, box=sub)
    return np.asarray(out, np.uint8)


def crop(image: np.ndarray, boxes: np.ndarray, size: int, framing: str = "tight") -> np.ndarray:
    """The ``size x size`` uint8 RGB crop of a house number with digit ``boxes`` (`crop_box`)."""
    return crop_and_resize(image, crop_box(boxes, framing), size)


def crop_64(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Goodfellow et al. 2013's crop: the union box enlarged 30 %, resized to 64x64 uint8 RGB."""
    return crop(image, boxes, 64, "tight")


def crop_128(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The loose crop [U]: a square twice the enlarged box's longer side, resized to 128x128 uint8 RGB."""
    return crop(image, boxes, 128, "loose")


def check_boxes(record: SvhnRecord, image_shape: Sequence[int], name: str) -> None:
    """Refuses a digit box of ``record`` that cannot be cropped: a width or height that is zero or negative (or
    a value that is not a finite number), or a box entirely outside the ``(H, W, ...)`` image. Boxes partly
    outside the image are normal in SVHN and pass.

    Raises `SvhnFormatError`, one line naming the image ``name`` and the box (1-based, its label and pixels).
    """
    height, width = image_shape[:2]
    for k, (left, top, w, h) in enumerate(np.asarray(record.boxes, np.float64).reshape(-1, 4)):
        if not np.isfinite([left, top, w, h]).all():
            problem = "has a value that is not a finite number"
        elif w <= 0 or h <= 0:
            problem = "has zero or negative width or height"
        elif left >= width or top >= height or left + w <= 0 or top + h <= 0:
            problem = f"lies entirely outside the {width}x{height} image"
        else:
            continue
        raise SvhnFormatError(f"SVHN image {name}: digit box {k + 1} of {len(record)} (label {record.digits[k]}, "
                              f"left {left:g}, top {top:g}, width {w:g}, height {h:g}) {problem}; correct its entry "
                              f"in the split's digitStruct file, or delete the image and set "
                              f"config.data.allow_missing_images=True to skip it")


def _crop_job(job: tuple) -> np.ndarray:
    """Worker: ``(png path or bytes, its name for errors, its SvhnRecord, size, framing)`` -> crop (the
    boxes checked against the image first, `check_boxes`)."""
    source, name, record, size, framing = job
    image = load_image(source, name)
    check_boxes(record, image.shape, name)
    return crop(image, record.boxes, size, framing)


# ----------------------------------------------------------------------------
# The preprocessing cache.
# ----------------------------------------------------------------------------


def source_listing(src: SplitSource) -> dict[str, Any]:
    """What identifies a split's content cheaply: the annotation's SHA-256 and every PNG's name and size
    (a folder), or the archive's name, size and the SHA-256 of its first and last MiB."""
    if src.kind == "archive":
        size = src.path.stat().st_size
        h = hashlib.sha256()
        with open(src.path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
        return {"kind": "archive", "name": src.path.name, "size": size, "ends_sha256": h.hexdigest()}
    assert src.annotation is not None
    h = hashlib.sha256()
    count = 0
    with os.scandir(src.path) as it:
        entries = sorted((e.name, e.stat().st_size) for e in it if e.name.lower().endswith(".png") and e.is_file())
    for name, size in entries:
        h.update(f"{name}:{size};".encode())
        count += 1
    return {"kind": "folder", "annotation": src.annotation.name, "annotation_sha256": sha256_file(src.annotation),
            "images": count, "images_sha256": h.hexdigest()}


def cache_options(split: str, image_size: int, framing: str, allow_missing_images: bool) -> dict[str, Any]:
    return {"split": split, "image_size": int(image_size), "framing": resolve_framing(int(image_size), framing),
            "tight_enlarge": TIGHT_ENLARGE, "loose_factor": LOOSE_FACTOR, "crop_version": CROP_VERSION,
            "cache_version": CACHE_VERSION, "max_digits": MAX_DIGITS,
            "allow_missing_images": bool(allow_missing_images)}


def cache_path(src: SplitSource, cache_dir: str | os.PathLike, image_size: int, framing: str = "auto",
               allow_missing_images: bool = False) -> Path:
    """``<cache_dir>/svhn_<split>_<S>px_<framing>_<fingerprint>``: the fingerprint hashes the options and
    `source_listing`."""
    options = cache_options(src.split, image_size, framing, allow_missing_images)
    content = dict(options, source=source_listing(src))
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"svhn_{src.split}_{options['image_size']}px_{options['framing']}_{digest}"


ARRAYS = ("image", "label", "length", "box", "filename")


@dataclass
class SvhnArrays:
    """A cached split: ``image`` uint8 (N, S, S, 3) (memory-mapped), ``label`` int32 (N, 5),
    ``length`` int32 (N,), ``box`` float32 (N, 5, 4), ``filename`` (N,) str, ``meta`` (dict), ``path``."""

    image: np.ndarray
    label: np.ndarray
    length: np.ndarray
    box: np.ndarray
    filename: np.ndarray
    meta: dict
    path: Path

    def __len__(self) -> int:
        return len(self.label)


def _worker_count(num_workers: int) -> int:
    if num_workers < 0:
        return min(os.cpu_count() or 1, 16)
    return int(num_workers)


def _crops(jobs: Iterator[tuple], total: int, num_workers: int, desc: str) -> Iterator[np.ndarray]:
    """Crops of ``jobs`` in order: in-process, or in ``num_workers`` spawned processes, blocks of 1024
    (so a stream of PNG bytes from an archive is never all in memory)."""
    bar = progress(total=total, desc=desc)
    workers = _worker_count(num_workers)
    try:
        if workers <= 1:
            for job in jobs:
                yield _crop_job(job)
                bar.update()
        else:
            with multiprocessing.get_context("spawn").Pool(workers, initializer=ignore_interrupts) as pool:
                block: list[tuple] = []
                for job in jobs:
                    block.append(job)
                    if len(block) == 1024:
                        for out in pool.map(_crop_job, block, chunksize=16):
                            bar.update()
                            yield out
                        block = []
                for out in pool.map(_crop_job, block, chunksize=16):
                    bar.update()
                    yield out
    finally:
        bar.close()


def build_cache(src: SplitSource, path: Path, image_size: int, framing: str = "auto", *,
                allow_missing_images: bool = False, num_workers: int = 0) -> Path:
    """Crops every kept image of ``src`` into the cache folder ``path`` (see the module docstring).

    Writes into a temporary folder beside ``path`` and renames it when complete
    (`building_folder`), so an interrupted build leaves no partial cache and concurrent builders
    (e.g. several processes on one host) do not see each other's files.
    """
    start = time.time()
    framing = resolve_framing(int(image_size), framing)
    size = int(image_size)
    log.info("building the SVHN %s cache (%d px, %s framing) from %s into %s", src.split, size, framing, src.path,
             path)
    if src.kind == "archive":
        records, member_folder, present = _archive_annotation_and_images(src.path, progress=True)
    else:
        assert src.annotation is not None
        records = (read_digit_struct_json(src.annotation) if src.annotation.name.endswith(".json")
                   else read_digit_struct_mat(src.annotation, progress=True))
        with os.scandir(src.path) as it:
            present = {e.name for e in it if e.name.lower().endswith(".png")}
    too_long = [r.filename for r in records if len(r) > MAX_DIGITS]
    empty = [r.filename for r in records if len(r) == 0]
    missing = [r.filename for r in records if r.filename not in present and 0 < len(r) <= MAX_DIGITS]
    if missing and not allow_missing_images:
        where = src.path if src.kind == "folder" else f"{src.path}:{member_folder}/"
        first = (src.path / missing[0]) if src.kind == "folder" else f"{where}{missing[0]}"
        raise SvhnSourceError(f"SVHN image {first} is missing ({len(missing)} of the {len(records)} images that "
                              f"{src.annotation or src.path} names are not in {where}; "
                              f"config.data.allow_missing_images=True skips them). {HOW_TO_GET}")
    missing_set = set(missing)
    kept = [r for r in records if 0 < len(r) <= MAX_DIGITS and r.filename not in missing_set]
    if too_long:
        log.info("SVHN %s: skipped %d numbers with more than %d digits (%s)", src.split, len(too_long), MAX_DIGITS,
                 ", ".join(too_long[:10]) + (", ..." if len(too_long) > 10 else ""))
    if empty:
        log.warning("SVHN %s: skipped %d entries without digit boxes", src.split, len(empty))
    if missing:
        log.warning("SVHN %s: skipped %d annotated images that are absent (allow_missing_images)", src.split,
                    len(missing))
    if not kept:
        raise SvhnSourceError(f"SVHN split {src.split!r} at {src.path} has no usable image (annotated "
                              f"{len(records)}, absent {len(missing)}, too long {len(too_long)}). {HOW_TO_GET}")
    n = len(kept)
    with building_folder(path) as tmp:
        label = np.empty((n, MAX_DIGITS), np.int32)
        length = np.empty((n,), np.int32)
        box = np.full((n, MAX_DIGITS, 4), np.nan, np.float32)
        width = max(len(r.filename) for r in kept)
        filename = np.array([r.filename for r in kept], f"<U{width}")
        for i, r in enumerate(kept):
            label[i], length[i] = encode_label(r.digits)
            box[i, :len(r)] = r.boxes
        image = np.lib.format.open_memmap(tmp / "image.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        desc = f"SVHN {src.split} {size}px"
        if src.kind == "folder":
            jobs = ((str(src.path / r.filename), str(src.path / r.filename), r, size, framing) for r in kept)
            for i, out in enumerate(_crops(jobs, n, num_workers, desc)):
                image[i] = out
        else:
            position = {r.filename: i for i, r in enumerate(kept)}
            order: list[int] = []

            def stream() -> Iterator[tuple]:
                try:
                    with tarfile.open(src.path, "r|*") as tar:
                        for member in tar:
                            folder, _, base = member.name.rpartition("/")
                            if member.isfile() and folder == member_folder and base in position:
                                order.append(position.pop(base))
                                yield (tar.extractfile(member).read(), f"{src.path}:{member.name}",
                                       kept[order[-1]], size, framing)
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise SvhnFormatError(f"SVHN archive {src.path} is corrupt or truncated "
                                          f"({type(e).__name__}: {e}); download it again. {HOW_TO_GET}") from None

            for i, out in enumerate(_crops(stream(), n, num_workers, desc)):
                image[order[i]] = out
            if position:
                raise SvhnSourceError(f"SVHN archive {src.path}: {len(position)} images listed on the first "
                                      f"pass were not found on the second (e.g. {next(iter(position))}); the "
                                      f"archive changed while reading. {HOW_TO_GET}")
        image.flush()
        del image
        for name, array in (("label", label), ("length", length), ("box", box), ("filename", filename)):
            np.save(tmp / f"{name}.npy", array)
        files = {name: {"sha256": sha256_file(tmp / f"{name}.npy"), "bytes": (tmp / f"{name}.npy").stat().st_size}
                 for name in ARRAYS}
        meta = {"cache_version": CACHE_VERSION, "task": "svhn",
                "options": cache_options(src.split, size, framing, allow_missing_images),
                "source": {"path": str(src.path), **source_listing(src)},
                "counts": {"annotated": len(records), "kept": n, "skipped_too_long": len(too_long),
                           "skipped_empty": len(empty), "skipped_missing_image": len(missing)},
                "skipped_too_long": too_long, "files": files, "seconds": round(time.time() - start, 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("SVHN %s cache: %d images in %.1f s (%s)", src.split, n, time.time() - start, path)
    return path


def load_cache(path: str | os.PathLike, *, verify: bool | None = None) -> SvhnArrays:
    """Opens a cache folder (images memory-mapped). ``verify``: check every file's SHA-256 (None = when the
    folder holds at most ``VERIFY_LIMIT_BYTES``; otherwise sizes only, and the recorded digests are logged)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = meta["files"]
        if meta.get("cache_version") != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('cache_version')}, expected {CACHE_VERSION}")
        for name in ARRAYS:
            actual = (path / f"{name}.npy").stat().st_size
            if actual != files[name]["bytes"]:
                raise ValueError(f"{name}.npy has {actual} bytes, meta.json records {files[name]['bytes']}")
        total = sum(f["bytes"] for f in files.values())
        if verify is None:
            verify = total <= VERIFY_LIMIT_BYTES
        if verify:
            for name in ARRAYS:
                digest = sha256_file(path / f"{name}.npy")
                if digest != files[name]["sha256"]:
                    raise ValueError(f"{name}.npy has SHA-256 {digest}, meta.json records {files[name]['sha256']}")
        else:
            log.info("SVHN cache %s: %.1f GB, sizes checked, SHA-256 not (image.npy %s)", path, total / 1e9,
                     files["image"]["sha256"])
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r" if name == "image" else None)
                  for name in ARRAYS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SvhnFormatError(f"SVHN cache {path} is unreadable or corrupt ({type(e).__name__}: {e}); delete the "
                              f"folder to rebuild it") from None
    n = len(arrays["label"])
    if arrays["image"].shape[0] != n or len(arrays["length"]) != n:
        raise SvhnFormatError(f"SVHN cache {path}: arrays of different lengths; delete the folder to rebuild it")
    return SvhnArrays(meta=meta, path=path, **arrays)


def verify_cache(path: str | os.PathLike) -> SvhnArrays:
    """`load_cache` with every SHA-256 checked, whatever the size."""
    return load_cache(path, verify=True)


def split_cache(source: str | os.PathLike, split: str, cache_dir: str | os.PathLike, image_size: int = 64,
                framing: str = "auto", *, allow_missing_images: bool = False, num_workers: int = 0) -> SvhnArrays:
    """The cached crops of ``split`` (built on first use, reused afterwards)."""
    src = locate_split(source, split)
    path = cache_path(src, cache_dir, image_size, framing, allow_missing_images)
    if not (path / "meta.json").is_file():
        build_cache(src, path, image_size, framing, allow_missing_images=allow_missing_images,
                    num_workers=num_workers)
    arrays = load_cache(path)
    log.info("SVHN %s: %d images from %s", split, len(arrays), path)
    return arrays


# ----------------------------------------------------------------------------
# Window augmentation (shared by both tasks).
# ----------------------------------------------------------------------------


def _resize_matrix(window: int, size: int) -> np.ndarray:
    """(size, window) bilinear interpolation weights (pixel centres aligned, edges clamped)."""
    m = np.zeros((size, window), np.float32)
    pos = (np.arange(size) + 0.5) * window / size - 0.5
    pos = np.clip(pos, 0, window - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, window - 1)
    frac = (pos - lo).astype(np.float32)
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m


def window_resize(image: np.ndarray, offset: tuple[int, int], window: int, matrix: np.ndarray | None) -> np.ndarray:
    """The ``window x window`` part of uint8 ``image`` (S, S, 3) at ``offset = (row, col)``, resized back to
    S x S, as float32 in [0, 1] (one example at a time: the same bits whatever the batch)."""
    x = np.asarray(image, np.float32) / np.float32(255)
    if matrix is None:
        return x
    oy, ox = offset
    x = x[oy:oy + window, ox:ox + window]
    x = np.tensordot(matrix, x, axes=(1, 0))             # (S, W, 3)
    x = np.tensordot(matrix, x, axes=(1, 1)).transpose(1, 0, 2)  # (S, S, 3)
    return np.clip(x, 0.0, 1.0)


def _entropy(*values: int) -> list[int]:
    return [int(v) % (1 << 64) for v in values]


# ----------------------------------------------------------------------------
# Data sets.
# ----------------------------------------------------------------------------


class _Base:
    task: str
    params: dict[str, Any]

    def _init_common(self, config_data, seed, global_batch_size, process_index, process_count, cache_dir):
        import jax
        import jax.numpy as jnp

        self.params = resolve_options(config_data)
        self.task = self.params["task"]
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.cache_dir = cache_folder(self.params["cache_dir"], cache_dir)
        s = int(self.params["image_size"])
        self.image_size = s
        self.framing = resolve_framing(s, self.params["framing"])
        self.image_shape = (s, s, 3)
        self.num_classes = NUM_CLASSES
        self.num_digits = MAX_DIGITS
        self.element_spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                             "label": jax.ShapeDtypeStruct((MAX_DIGITS,), jnp.int32),
                             "length": jax.ShapeDtypeStruct((), jnp.int32)}
        self.batch_spec = {k: jax.ShapeDtypeStruct((self.local_batch_size,) + v.shape, v.dtype)
                           for k, v in self.element_spec.items()}

    def _rows(self) -> range:
        first = self.process_index * self.local_batch_size
        return range(first, first + self.local_batch_size)

    @staticmethod
    def _check_step(step: int) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step

    @staticmethod
    def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        out["label"] = out["label"].astype(np.int32)
        out["length"] = out["length"].astype(np.int32)
        return out

    def test_set(self) -> dict[str, np.ndarray]:
        """The whole test set (``image`` float32 (N, S, S, 3), ``label`` int32 (N, 5), ``length`` int32 (N,))."""
        return self.test_examples(np.arange(self.test_size))

    def test_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The test set in order, in batches of ``batch_size`` (the last one may be smaller)."""
        for first in range(0, self.test_size, batch_size):
            yield self.test_examples(np.arange(first, min(first + batch_size, self.test_size)))

    def validation_set(self) -> dict[str, np.ndarray]:
        return self.validation_examples(np.arange(self.validation_size))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, image_shape={self.image_shape}, "
                f"framing={self.framing!r}, local_batch_size={self.local_batch_size}, "
                f"process={self.process_index}/{self.process_count})")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stn_jax"


class SvhnDataset(_Base):
    """Real SVHN multi-digit numbers (task ``svhn``); see the module docstring for the design.

    Attributes: ``image_shape`` (S, S, 3), ``num_classes`` 11, ``num_digits`` 5,
    ``local_batch_size``, ``element_spec`` (per example: ``image`` float32
    (S, S, 3), ``label`` int32 (5,), ``length`` int32 ()), ``train_size``,
    ``validation_size``, ``test_size`` (the caches are built on first use of
    these or of the batches).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self._init_common(config_data, seed, global_batch_size, process_index, process_count, cache_dir)
        if self.task != "svhn":
            raise ValueError(f"SvhnDataset is for task 'svhn', got {self.task!r} (use make_dataset)")
        p = self.params
        if self.cache_dir is None:
            self.cache_dir = _default_cache_dir()
            log.info("SVHN crops are cached under %s (set config.data.cache_dir to change)", self.cache_dir)
        self.train_splits = _split_list(p["train_splits"])
        # Fail early, naming what is missing (the test split is looked for when first used).
        self._sources = {s: locate_split(p["source"], s) for s in self.train_splits}
        if p["test_split"] in self.train_splits:
            log.warning("SVHN test_split %r is also a training split: test numbers are training numbers "
                        "(fine for smoke tests only)", p["test_split"])
        self.window = resolve_window(self.image_size, int(p["random_crop"]))
        self._matrix = None if self.window == self.image_size else _resize_matrix(self.window, self.image_size)
        self._train_arrays: list[SvhnArrays] | None = None
        self._test_arrays: SvhnArrays | None = None

    # -- caches ------------------------------------------------------------

    def split_arrays(self, split: str) -> SvhnArrays:
        """The cached crops of ``split`` (built on first use)."""
        p = self.params
        assert self.cache_dir is not None
        return split_cache(p["source"], split, self.cache_dir, self.image_size, self.framing,
                           allow_missing_images=bool(p["allow_missing_images"]), num_workers=int(p["num_workers"]))

    def _pool(self):
        if self._train_arrays is None:
            arrays = [self.split_arrays(s) for s in self.train_splits]
            offsets = np.cumsum([0] + [len(a) for a in arrays])
            total = int(offsets[-1])
            v = int(self.params["validation_size"])
            if v >= total:
                raise ValueError(f"config.data.validation_size={v} leaves no training images: the training "
                                 f"splits {', '.join(self.train_splits)} hold {total}; set it lower (0 = none)")
            order = np.random.default_rng(_entropy(HOLDOUT_SEED, total)).permutation(total)
            self._validation_index = np.sort(order[:v]).astype(np.int64)
            self._train_index = np.sort(order[v:]).astype(np.int64)
            self._offsets = offsets
            self._train_arrays = arrays
        return self._train_arrays

    def _get(self, pooled: int) -> tuple[SvhnArrays, int]:
        arrays = self._pool()
        k = int(np.searchsorted(self._offsets, pooled, side="right")) - 1
        return arrays[k], int(pooled - self._offsets[k])

    @property
    def train_size(self) -> int:
        self._pool()
        return len(self._train_index)

    @property
    def validation_size(self) -> int:
        self._pool()
        return len(self._validation_index)

    def _test(self) -> SvhnArrays:
        if self._test_arrays is None:
            self._test_arrays = self.split_arrays(self.params["test_split"])
        return self._test_arrays

    @property
    def test_size(self) -> int:
        n = len(self._test())
        size = int(self.params["test_size"])
        return n if size == -1 else min(size, n)

    # -- examples ----------------------------------------------------------

    def _example(self, arrays: SvhnArrays, i: int, offset: tuple[int, int]) -> dict[str, Any]:
        return {"image": window_resize(arrays.image[i], offset, self.window, self._matrix),
                "label": arrays.label[i], "length": arrays.length[i]}

    def _centre(self) -> tuple[int, int]:
        c = (self.image_size - self.window) // 2
        return c, c

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global training batch of ``step``: ``image`` float32 (b, S, S, 3) in
        [0, 1], ``label`` int32 (b, 5), ``length`` int32 (b,). A pure function of ``(seed, step,
        process_index, process_count)``. ``with_params`` adds ``index`` (into the pooled training splits)
        and ``offset`` (the window's row, column)."""
        step = self._check_step(step)
        self._pool()
        n = len(self._train_index)
        span = self.image_size - self.window + 1
        examples, index, offsets = [], [], []
        for j in self._rows():
            rng = np.random.default_rng(_entropy(TRAIN_STREAM, self.seed, step, j))
            pooled = int(self._train_index[rng.integers(n)])
            offset = (int(rng.integers(span)), int(rng.integers(span)))
            arrays, i = self._get(pooled)
            examples.append(self._example(arrays, i, offset))
            index.append(pooled)
            offsets.append(offset)
        out = self._stack(examples)
        if with_params:
            out["index"] = np.asarray(index, np.int64)
            out["offset"] = np.asarray(offsets, np.int32)
        return out

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test images ``indices`` (in [0, test_size)), centred window, no augmentation."""
        arrays = self._test()
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        if not indices.size:
            return self._empty()
        return self._stack([self._example(arrays, int(i), self._centre()) for i in indices])

    def validation_examples(self, indices) -> dict[str, np.ndarray]:
        """Held-out training images ``indices`` (in [0, validation_size)), centred window."""
        self._pool()
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.validation_size):
            raise IndexError(f"validation indices must be in [0, {self.validation_size})")
        if not indices.size:
            return self._empty()
        return self._stack([self._example(*self._get(int(self._validation_index[i])), self._centre())
                            for i in indices])

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}


# ----------------------------------------------------------------------------
# The synthetic stand-in.
# ----------------------------------------------------------------------------


def ink_box(digit: np.ndarray, threshold: int = 32) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (end exclusive) of the pixels above ``threshold``; the whole frame if none."""
    ys, xs = np.nonzero(np.asarray(digit) > threshold)
    if not len(xs):
        return 0, 0, digit.shape[1], digit.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, [0.299, 0.587, 0.114]))


def synth_number(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, size: int, framing: str,
                 max_length: int = MAX_DIGITS, inks: np.ndarray | None = None) -> dict[str, Any]:
    """One synthetic house number (see the module docstring) from MNIST ``digits`` uint8 (N, 28, 28).

    Returns ``image`` uint8 (size, size, 3), ``label`` int32 (5,), ``length``, ``index`` (the MNIST digits used)
    and ``box`` float32 (5, 4): each digit's left, top, width, height in output pixels (the axis-aligned box of
    its slanted ink; x right, y down, the image spans [0, size]), NaN rows after the last digit.
    """
    from PIL import Image, ImageDraw, ImageFilter

    probs = np.asarray(SYNTH_LENGTH_PROBS[:max_length], np.float64)
    n = int(rng.choice(max_length, p=probs / probs.sum())) + 1
    ids = rng.integers(len(digits), size=n)
    # The number, white on black, at MNIST scale (about 20 px tall), on a canvas with room for the layout.
    scale = rng.uniform(*SYNTH_DIGIT_SCALE, n)
    squeeze = rng.uniform(*SYNTH_SQUEEZE)
    gaps = rng.uniform(*SYNTH_GAP, n)
    dy = rng.normal(0, SYNTH_DY, n)
    shear = rng.uniform(-SYNTH_SHEAR, SYNTH_SHEAR)
    pieces, x = [], 4.0
    for k in range(n):
        d = digits[ids[k]]
        x0, y0, x1, y1 = (inks[ids[k]] if inks is not None else ink_box(d))
        w, h = max(1, round((x1 - x0) * scale[k] * squeeze)), max(1, round((y1 - y0) * scale[k]))
        piece = np.asarray(Image.fromarray(np.ascontiguousarray(d[y0:y1, x0:x1])).resize(
            (w, h), Image.Resampling.BILINEAR))
        pieces.append((piece, round(x), round(30.0 - h / 2 + dy[k])))
        x += w + (gaps[k] if k < n - 1 else 0)
    canvas = np.zeros((60, int(round(x)) + 8), np.uint8)
    for piece, px, py in pieces:
        h, w = piece.shape
        region = canvas[py:py + h, px:px + w]
        np.maximum(region, piece[:region.shape[0], :region.shape[1]], out=region)
    # Each digit's box: the axis-aligned box of its slanted ink (pixels above 32, as in `ink_box`), as an SVHN
    # annotator draws it, in slanted canvas coordinates (X', Y), X' = X - shear (Y - 30), where the frame is a
    # rectangle. Columns x0, y0, x1, y1; a pixel (X, Y) covers [X, X + 1] x [Y, Y + 1].
    boxes = np.empty((n, 4))
    for k, (piece, px, py) in enumerate(pieces):
        ys, xs = np.nonzero(piece > 32) if (piece > 32).any() else np.nonzero(np.ones_like(piece))
        X, Y = px + xs, py + ys
        slanted = np.concatenate([X - shear * (Y - 30.0), X - shear * (Y + 1 - 30.0)])
        boxes[k] = slanted.min(), Y.min(), slanted.max() + 1, Y.max() + 1
    bx0, by0 = boxes[:, :2].min(0)
    bx1, by1 = boxes[:, 2:].max(0)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    # The frame: the 30 %-enlarged union box, each side jittered by 5 % and its centre by 4 %; loose: the square
    # twice its longer side, as for the real crops.
    fw = TIGHT_ENLARGE * (bx1 - bx0) * rng.uniform(0.95, 1.05)
    fh = TIGHT_ENLARGE * (by1 - by0) * rng.uniform(0.95, 1.05)
    if framing == "loose":
        fw = fh = LOOSE_FACTOR * max(fw, fh)
    fx = cx + rng.uniform(-0.04, 0.04) * fw
    fy = cy + rng.uniform(-0.04, 0.04) * fh
    # Shrink the canvas first (antialiased) so that the affine warp below is close to 1:1.
    shrink = max(1.0, min(fw, fh) / size)
    alpha = Image.fromarray(canvas)
    if shrink > 1.0:
        alpha = alpha.resize((max(1, round(canvas.shape[1] / shrink)), max(1, round(canvas.shape[0] / shrink))),
                             Image.Resampling.BILINEAR)
    sx, sy = alpha.size[0] / canvas.shape[1], alpha.size[1] / canvas.shape[0]
    # Output pixel (u, v) -> canvas (X, Y): Y = f + e v, X' = c + a u, X = X' + shear (Y - 30).
    a, c = fw / size, fx - fw / 2
    e, f = fh / size, fy - fh / 2
    coeffs = (a * sx, shear * e * sx, (c + shear * (f - 30.0)) * sx, 0.0, e * sy, f * sy)
    box = np.full((MAX_DIGITS, 4), np.nan, np.float32)
    box[:n] = np.stack([(boxes[:, 0] - c) / a, (boxes[:, 1] - f) / e, (boxes[:, 2] - boxes[:, 0]) / a,
                        (boxes[:, 3] - boxes[:, 1]) / e], 1)
    alpha = np.asarray(alpha.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR),
                       np.float32) / 255.0

    # Colours: background and ink with a luminance contrast of at least 0.3.
    bg = rng.uniform(0, 1, 3)
    fg = rng.uniform(0, 1, 3)
    for _ in range(20):
        if abs(_luminance(fg) - _luminance(bg)) >= 0.3:
            break
        fg = rng.uniform(0, 1, 3)
    else:
        fg = np.zeros(3) if _luminance(bg) >= 0.5 else np.ones(3)  # black or white: contrast >= 0.5
    # Background: a smooth low-frequency texture plus a gradient.
    cells = int(rng.integers(2, 7))
    noise = rng.normal(0, rng.uniform(0.03, 0.15), (cells, cells, 3))
    texture = np.stack([np.asarray(Image.fromarray(noise[..., ch].astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC)) for ch in range(3)], -1)
    angle = rng.uniform(0, 2 * np.pi)
    line = np.linspace(-0.5, 0.5, size)
    ramp = np.cos(angle) * line[None, :] + np.sin(angle) * line[:, None]
    image = bg[None, None, :] + texture + ramp[..., None] * rng.uniform(-0.3, 0.3, 3)[None, None, :]
    # Clutter strokes (lines of other colours), more with the loose framing's larger field of view.
    strokes = int(rng.integers(0, 4 if framing == "tight" else 7))
    if strokes:
        colours = []
        for _ in range(strokes):
            mask = Image.new("L", (size, size))
            ImageDraw.Draw(mask).line([tuple(rng.uniform(-0.2, 1.2, 2) * size) for _ in range(int(rng.integers(2, 4)))],
                                      fill=255, width=max(1, int(rng.uniform(0.01, 0.04) * size)))
            colours.append((np.asarray(mask, np.float32) / 255.0, rng.uniform(0, 1, 3), rng.uniform(0.15, 0.6)))
        for mask, colour, opacity in colours:
            m = (mask * opacity)[..., None]
            image = image * (1 - m) + colour[None, None, :] * m
    opacity = rng.uniform(0.8, 1.0)
    a3 = (alpha * opacity)[..., None]
    image = image * (1 - a3) + fg[None, None, :] * a3
    image = image + rng.normal(0, rng.uniform(0.0, 0.04), image.shape)
    out = Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8))
    radius = rng.uniform(0, 1.0) * size / 64
    if radius > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    label, length = encode_label("".join(str(int(labels[i])) for i in ids))
    return {"image": np.asarray(out, np.uint8), "label": label, "length": np.int32(length),
            "index": np.pad(ids, (0, MAX_DIGITS - n), constant_values=-1), "box": box}


class SvhnSynthDataset(_Base):
    """Synthetic house numbers from MNIST digits (task ``svhn_synth``); the `SvhnDataset` interface.

    ``config.data.source``: an MNIST folder of the four IDX files (or ``"tfds"``).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self._init_common(config_data, seed, global_batch_size, process_index, process_count, cache_dir)
        if self.task != "svhn_synth":
            raise ValueError(f"SvhnSynthDataset is for task 'svhn_synth', got {self.task!r} (use make_dataset)")
        if not self.params["source"]:
            raise SvhnSourceError("config.data.source is empty: the svhn_synth task composes MNIST digits; set "
                                  "--config.data.source to a folder with the four MNIST IDX files (e.g. "
                                  "../shared/data/mnist) or to 'tfds'")
        self._digits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._test_cache: dict[str, np.ndarray] | None = None
        self.test_checksum: str | None = None

    def mnist(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images uint8 (N, 28, 28), labels (N,), ink boxes (N, 4))`` of the MNIST ``split``."""
        if split not in self._digits:
            from stn_jax.paper.data.mnist import load_mnist

            images, labels = load_mnist(str(self.params["source"]), split)
            inks = np.array([ink_box(d) for d in images], np.int32).reshape(-1, 4)
            self._digits[split] = (np.asarray(images), np.asarray(labels), inks)
        return self._digits[split]

    def _make(self, entropy: list[int], split: str) -> dict[str, Any]:
        images, labels, inks = self.mnist(split)
        rng = np.random.default_rng(entropy)
        return synth_number(rng, images, labels, self.image_size, self.framing, int(self.params["max_length"]), inks)

    @staticmethod
    def _float(examples: list[dict[str, Any]], with_params: bool = False) -> dict[str, np.ndarray]:
        out = {"image": np.stack([e["image"] for e in examples]).astype(np.float32) / np.float32(255),
               "label": np.stack([e["label"] for e in examples]).astype(np.int32),
               "length": np.asarray([e["length"] for e in examples], np.int32)}
        if with_params:
            out["index"] = np.stack([e["index"] for e in examples])
        return out

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global batch of ``step`` (pure function of seed, step, process);
        ``with_params`` adds ``index`` (the MNIST train digits used, -1 padded)."""
        step = self._check_step(step)
        return self._float([self._make(_entropy(TRAIN_STREAM, self.seed, step, j), "train") for j in self._rows()],
                           with_params)

    @property
    def test_size(self) -> int:
        return int(self.params["test_size"]) if self.params["test_size"] != -1 else len(self.mnist("test")[0])

    @property
    def validation_size(self) -> int:
        return int(self.params["validation_size"])

    def _test_example(self, i: int) -> dict[str, Any]:
        return self._make(_entropy(TEST_STREAM, self.params["test_seed"], i), "test")

    def test_fingerprint(self) -> str:
        images, labels, _ = self.mnist("test")
        h = hashlib.sha256(images.tobytes())
        h.update(np.asarray(labels, np.int64).tobytes())
        ignored = ("source", "cache_dir", "validation_size", *EVALUATION_OPTIONS)
        content = {k: v for k, v in self.params.items() if k not in ignored}
        content.update(version=SYNTH_VERSION, mnist_test=h.hexdigest())
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def _cached_test(self) -> dict[str, np.ndarray] | None:
        """The whole test set as uint8, generated once and cached under ``cache_dir`` (None without one)."""
        if self.cache_dir is None:
            return None
        if self._test_cache is None:
            path = self.cache_dir / f"svhn_synth_test_{self.image_size}px_{self.framing}_{self.test_fingerprint()}.npz"
            meta_path = path.with_suffix(".json")
            if path.is_file() and meta_path.is_file():
                try:
                    with np.load(path) as f:
                        arrays = {k: f[k] for k in f.files}
                    recorded = json.loads(meta_path.read_text())["sha256"]
                except (OSError, ValueError, KeyError) as e:
                    raise SvhnFormatError(f"cached synthetic test set {path} is unreadable ({e}); delete it and "
                                          f"{meta_path} to regenerate") from None
                digest = array_digest(arrays)
                if digest != recorded:
                    raise SvhnFormatError(f"cached synthetic test set {path} has SHA-256 {digest} but {meta_path} "
                                          f"records {recorded}; delete both files to regenerate it")
            else:
                examples = [self._test_example(i) for i in range(self.test_size)]
                arrays = {"image": np.stack([e["image"] for e in examples]),
                          "label": np.stack([e["label"] for e in examples]).astype(np.int32),
                          "length": np.asarray([e["length"] for e in examples], np.int32)}
                digest = array_digest(arrays)
                meta = {"sha256": digest, "task": self.task, "examples": self.test_size, "version": SYNTH_VERSION,
                        "params": {k: v for k, v in self.params.items() if k != "cache_dir"}}
                atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
                atomic_write(meta_path, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
            self.test_checksum = digest
            log.info("svhn_synth test set: %d examples, sha256 %s (%s)", len(arrays["label"]), digest, path)
            self._test_cache = arrays
        return self._test_cache

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test numbers ``indices``: example ``i`` is a pure function of ``(test_seed, i)``."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        if not indices.size:
            return {k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}
        cached = self._cached_test()
        if cached is not None:
            return {"image": cached["image"][indices].astype(np.float32) / np.float32(255),
                    "label": cached["label"][indices], "length": cached["length"][indices]}
        return self._float([self._test_example(int(i)) for i in indices])

    def validation_examples(self, indices) -> dict[str, np.ndarray]:
        """Validation numbers (from the MNIST train digits, their own random stream)."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.validation_size):
            raise IndexError(f"validation indices must be in [0, {self.validation_size})")
        return self._float([self._make(_entropy(VALID_STREAM, self.params["test_seed"], int(i)), "train")
                            for i in indices]) if indices.size else {
            k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}


def make_dataset(config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None) -> SvhnDataset | SvhnSynthDataset:
    """`SvhnDataset` (task ``svhn``) or `SvhnSynthDataset` (task ``svhn_synth``) for ``config_data``."""
    given = config_data.to_dict() if hasattr(config_data, "to_dict") else dict(config_data)
    cls = SvhnSynthDataset if given.get("task") == "svhn_synth" else SvhnDataset
    return cls(config_data, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count, cache_dir=cache_dir)


# ----------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------


def draw_crops(folder: str | os.PathLike, out: str | os.PathLike, names: Sequence[str] | None = None,
               count: int = 8) -> Path:
    """Saves a picture of ``count`` real house numbers from a split ``folder``: the image with the digit
    boxes, the tight 64 px crop and the loose 128 px crop (`crop_64`, `crop_128`) in three rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    src = _folder_source(Path(folder).name, Path(folder).expanduser())
    records = read_annotations(src.path)
    by_name = {r.filename: r for r in records}
    chosen = [by_name[n] for n in names] if names else [r for r in records if (src.path / r.filename).is_file()][:count]
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.6 * len(chosen), 5.2), squeeze=False)
    for col, r in enumerate(chosen):
        image = load_image(src.path / r.filename)
        ax = axes[0, col]
        ax.imshow(image)
        for left, top, w, h in r.boxes:
            ax.add_patch(patches.Rectangle((left, top), w, h, fill=False, color="yellow", lw=0.8))
        for framing, colour in (("tight", "cyan"), ("loose", "magenta")):
            x0, y0, x1, y1 = crop_box(r.boxes, framing)
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=0.8, ls="--"))
        ax.set_title(f"{r.filename}: {r.digits}", fontsize=8)
        axes[1, col].imshow(crop_64(image, r.boxes))
        axes[2, col].imshow(crop_128(image, r.boxes))
        for row in range(3):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    axes[0, 0].set_ylabel("image, boxes", fontsize=8)
    axes[1, 0].set_ylabel("64 px (tight)", fontsize=8)
    axes[2, 0].set_ylabel("128 px (loose)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------


def _problems(params: dict[str, Any]) -> list[str]:
    try:
        _validate(params)
    except ValueError as e:
        return [str(e).split("): ", 1)[-1]]
    return []


def _register() -> None:
    from stn_jax.paper.data.tasks import DataTask, register

    for name, title in (("svhn", "SVHN"), ("svhn_synth", "Synthetic house numbers")):
        options = {k: v for k, v in default_config(name).to_dict().items() if k != "task"}
        register(DataTask(name, title, options, make_dataset, _problems, family="svhn"))


_register()
