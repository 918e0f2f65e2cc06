"""CUB-200-2011 fine-grained birds (paper Sect. 4.3, Table 3): reader, resize cache, data set.

Task ``cub`` ("CUB-200-2011", family ``cub``); `CubDataset` has the common
data-set interface (`stn_jax.paper.data.tasks`).

Provenance tags [P], [S], [R], [U]: `stn_jax.paper` (here [R] is the authors'
public Caffe examples); the recipe is the paper's Sect. 4.3 and Appendix A.6.

* **Sources** (``config.data.source``):

  - a folder with the official ``CUB_200_2011/`` layout (the folder itself or
    one holding ``CUB_200_2011/``): ``images.txt`` (``<id> <path>``),
    ``image_class_labels.txt`` (``<id> <class 1-200>``),
    ``train_test_split.txt`` (``<id> <1 = train, 0 = test>``),
    ``bounding_boxes.txt`` (``<id> <x> <y> <width> <height>``, pixels),
    ``classes.txt`` (``<class> <name>``) and ``images/``. A missing annotation
    file raises `CubSourceError` (a `FileNotFoundError`) naming it and
    ``OFFICIAL_URL``; inconsistent files raise `CubFormatError`.
  - ``"tfds"``: tensorflow-datasets ``caltech_birds2011`` (``tfds.builder(...,
    data_dir=tfds_data_dir)``, prepared by ``download_and_prepare`` if
    needed; the official split; its normalised box). Offline and unprepared
    it fails at once (no tfds retries) with a message naming the folder
    option. Its images go through the same resize cache (``use_cache`` must
    be True).

* **Classes.** ``classes`` keeps some classes: ``"1-30"``, ``"1,5,7-9"``
  (1-based official class ids); ``""`` or ``"all"`` keeps all 200. Labels are
  remapped to ``0..K-1`` in class-id order (``class_ids``, ``class_names``
  say which). A folder lacking images of kept classes is an error naming the
  first missing file; with ``classes`` unset it also suggests the complete
  classes (e.g. ``--config.data.classes=1-30`` for the project's sample).

* **Images** [P: "random 224 crops of images resized to 256, flips"; R: the
  448 px example resizes to 512x512 and takes random 448 crops with mirroring].
  Each JPEG is decoded with PIL and converted to RGB (greyscale "L", CMYK,
  palette images too), then resized (PIL bilinear, antialiased) to
  ``resize`` x ``resize`` (``resize_mode="square"``, default [R]: the Caffe
  examples' data layers resize to a square, not keeping the aspect ratio)
  or so that its shorter side is ``resize`` (``"shorter"`` [U], the
  torchvision habit). ``resize=-1`` means ``round(image_size * 8 / 7)``:
  256 for 224 [P], 512 for 448 [R]. Training takes a uniformly random
  ``image_size`` crop at an integer offset and flips it horizontally with
  probability 1/2 (``flip``); test examples take the centre crop, no flip.
  Output ``image`` float32 RGB in [0, 1] ``(B, S, S, 3)`` (no mean/std: the
  backbone's preprocessing does that), ``label`` int32 ``(B,)``, and
  ``box`` float32 ``(B, 4)``: the bird's official box as ``(x0, y0, x1, y1)``
  in the output crop's normalised coordinates (pixel edges: -1 = left/top
  edge, +1 = right/bottom edge, the ``align_corners=False`` convention),
  clipped to the image first (a few official boxes pass the border by up to
  32 px) and to [-1, 1] after (the visible part), mirrored with the image.
  Training uses the labels only [P]; the box is for pictures and checks.

* **Training batches** are pure functions of ``(seed, step, process)``:
  example ``j`` of the global batch of step ``s`` is position ``g = s B + j``
  of an endless sequence of epochs; epoch ``e = g // N`` is the permutation
  ``default_rng((PERM_STREAM, seed, e)).permutation(N)`` of the ``N``
  training images [U: epochs without replacement, as the Caffe data layers
  read a shuffled list; every image once per epoch matters for 5,994 images],
  and its crop offset and flip come from ``default_rng((TRAIN_STREAM, seed,
  s, j))``. Process ``p`` of ``P`` computes rows ``[p B / P, (p + 1) B / P)``,
  so shards concatenate to the global batch bit for bit, and a resumed run
  needs no iterator state.

* **Resize cache** (``use_cache=True``, default). Decoding a ~500x375 JPEG and
  resizing it costs milliseconds per image, every epoch; the cache does it
  once. Each kept image (both splits, in image-id order) is resized once into
  ``<cache_dir>/cub_<R>px_<mode>_<classes>_<fingerprint>/``: ``pixels.bin``
  (the resized images' uint8 RGB bytes back to back, read with
  ``np.memmap``), ``arrays.npz`` (``offset``, ``shape`` (h, w), ``orig_size``
  (w, h), ``class_id``, ``is_train``, ``box_xywh``, ``image_id``, ``name``)
  and ``meta.json`` (options, ``CACHE_VERSION``, counts, SHA-256 and size of
  both files). The fingerprint hashes the options (resize, mode, recipe
  version, classes), the SHA-256 of the four per-image annotation files and
  every kept image's name and byte size, so a changed option or source makes
  a new cache. Built with a progress bar, in ``num_workers`` processes,
  into a temporary folder renamed when complete (`files.building_folder`: a
  Ctrl-C or an error, such as a truncated JPEG, which is named, removes it; a
  folder left without its ``meta.json`` is rebuilt and replaced). Loading checks sizes and
  ``arrays.npz``'s SHA-256, and ``pixels.bin``'s when it is at most
  ``VERIFY_LIMIT_BYTES`` (1 GiB). Sizes: 196,608 bytes an image at 256
  square (the 1,701-image sample: 334 MB; all 11,788: 2.3 GB), 786,432 at
  512 (1.3 GB; 9.3 GB). ``cache_dir``: the option when set (a cache shared by
  runs), else the ``cache_dir`` argument (the trainer's ``<workdir>/data``),
  else ``~/.cache/stn_jax``. ``use_cache=False`` decodes the JPEGs at every
  step instead (no disk; slower).

* **Workers and prefetch.** ``num_workers`` (``-1`` = the machine's cores,
  at most 16; ``0`` = all in the calling thread) does two jobs. JPEG
  decoding (building the cache, or every step with ``use_cache=False``) runs
  in that many spawned processes (`concurrent.futures.ProcessPoolExecutor`,
  spawn-safe), one chunk of the batch each; they return uint8 crops. Reading
  from the cache runs in that many *threads* (NumPy copies release the GIL)
  that write straight into the float32 batch: measured, worker processes
  made cache reads 2-3x slower (pickling the crops costs more than cropping
  them). With ``prefetch`` the next step's batch is started in a background
  thread as soon as a batch is returned, so it is made while the training
  step runs. `CubDataset.close` (or ``with CubDataset(...)``) stops the
  workers; garbage collection and interpreter exit do too.

* **Measured** training-pipeline images/s (`benchmark`, batch 16, the
  1,701-image sample, no prefetch, no training step; a 2-core CPU shared
  with other jobs, load average 10-16, so the numbers are low and noisy and
  extra workers had no free core to run on):

  ==================  ==========  ==========  ==========  ==========
  source              224, 0 wkr  224, 2 wkr  448, 0 wkr  448, 2 wkr
  ==================  ==========  ==========  ==========  ==========
  resize cache        960-1,560   790-2,110   115-231     196
  JPEG every step     94-108      69-104      51-58       41-45
  ==================  ==========  ==========  ==========  ==========

  (2 wkr: 2 threads for cache reads, 2 processes for JPEGs. Cache reads in
  2 worker *processes*, an earlier version, gave 500 and 78-91.) With
  ``prefetch`` and a 0.5 s stand-in training step, the loop waited for data
  at the equivalent of 4,656 (cache, 224), 576 (JPEG, 224), 728 (cache, 448)
  and 185 (JPEG, 448) images/s: a step longer than making a batch hides
  it. At 448 px the float32 batch alone is 38 MB (the conversion is about a
  third of the time). Building the sample's cache took 17 s at 256 px with 2
  worker processes (1,701 JPEGs, 334 MB).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from stn_jax.paper.data.files import (
    IMAGE_ERRORS,
    building_folder,
    cache_folder,
    describe_image_error,
    ignore_interrupts,
    progress,
    sha256_file,
)
from stn_jax.paper.data.tasks import resolve_options

log = logging.getLogger(__name__)

TASK = "cub"
TITLE = "CUB-200-2011"
NUM_CLASSES_ALL = 200
OFFICIAL_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
HOW_TO_GET = (f"CUB-200-2011 (CUB_200_2011.tgz) is at {OFFICIAL_URL}: unpack it and pass the CUB_200_2011 folder "
              "as --config.data.source=/path/to/CUB_200_2011 (or use --config.data.source=tfds online).")
PER_IMAGE_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
ANNOTATION_FILES = PER_IMAGE_FILES + ("classes.txt",)
TFDS_NAME = "caltech_birds2011"
TFDS_DOWNLOAD_HOST = "data.caltech.edu"
RESIZE_MODES = ("square", "shorter")

TRAIN_STREAM = 0x5452   # "TR"
PERM_STREAM = 0x5045    # "PE": the epoch permutations
RECIPE_VERSION = 1      # bump when the decode/resize recipe changes (invalidates caches)
CACHE_VERSION = 1       # bump when the cache layout changes
VERIFY_LIMIT_BYTES = 1 << 30
CACHE_ARRAYS = ("offset", "shape", "orig_size", "class_id", "is_train", "box_xywh", "image_id", "name")



class CubSourceError(FileNotFoundError):
    """A CUB folder, annotation file or image is missing (or tfds cannot get it); the message names it."""


class CubFormatError(ValueError):
    """An annotation file or cache is corrupt or inconsistent."""


# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """The data section of task ``cub``, every option with its default (tags: module docstring)."""
    c = ml_collections.ConfigDict()
    c.task = TASK
    c.source = ""             # a CUB_200_2011 folder, or "tfds": must be set
    c.classes = ""            # "" / "all" = all 200; "1-30", "1,5,7-9": 1-based class ids, labels remapped
    c.image_size = 224        # [P] 224; 448 for the paper's 448 px models
    c.resize = -1             # -1 = round(image_size * 8 / 7): [P] 256 for 224, [R] 512 for 448
    c.resize_mode = "square"  # [R] "square" (aspect not kept, as the Caffe examples) | [U] "shorter" side
    c.flip = True             # [P] random horizontal flips in training
    c.num_workers = -1        # example/cache-building processes; -1 = the cores (at most 16), 0 = in-process
    c.prefetch = True         # dispatch the next step's batch while the current one is used
    c.use_cache = True        # [U] resize every image once into cache_dir (False: decode JPEGs every step)
    c.cache_dir = ""          # "" = the cache_dir argument (trainer: <workdir>/data), else ~/.cache/stn_jax
    c.test_size = -1          # -1 = the whole test split (of the kept classes), else its first test_size images
    c.tfds_data_dir = ""      # source="tfds": tfds data_dir ("" = tfds' default, ~/tensorflow_datasets)
    return c


def parse_classes(spec: Any) -> tuple[int, ...] | None:
    """``"1-30"`` / ``"1,5,7-9"`` -> sorted 1-based class ids; ``""`` / ``"all"`` -> None (all classes).

    Raises ValueError in one line for bad syntax, reversed ranges or ids outside 1-200.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    if not isinstance(spec, str):
        raise ValueError(f"classes must be a string such as '1-30' or '1,5,7-9', got {spec!r}")
    ids: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"classes must be 1-based class ids and ranges such as '1-30' or '1,5,7-9', "
                             f"got {spec!r}") from None
        if lo > hi:
            raise ValueError(f"classes: range {part!r} is reversed")
        if lo < 1 or hi > NUM_CLASSES_ALL:
            raise ValueError(f"classes: ids must be in 1-{NUM_CLASSES_ALL}, got {part!r}")
        ids.update(range(lo, hi + 1))
    return tuple(sorted(ids))


def format_classes(ids: Sequence[int]) -> str:
    """Compact form of class ids: ``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    ids = sorted(set(int(i) for i in ids))
    parts, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def resolve_resize(image_size: int, resize: int) -> int:
    """``resize=-1`` -> ``round(image_size * 8 / 7)`` (256 for 224, 512 for 448)."""
    return int(round(int(image_size) * 8 / 7)) if int(resize) == -1 else int(resize)


def _problems(p: dict[str, Any]) -> list[str]:
    out = []
    for key in ("source", "cache_dir", "tfds_data_dir", "resize_mode"):
        if not isinstance(p[key], str):
            out.append(f"{key} must be a string, got {p[key]!r}")
    try:
        parse_classes(p["classes"])
    except ValueError as e:
        out.append(str(e))
    size = int(p["image_size"])
    if size != p["image_size"] or size < 8:
        out.append(f"image_size must be an integer >= 8 (the paper: 224 or 448), got {p['image_size']}")
    elif p["resize"] != -1 and (int(p["resize"]) != p["resize"] or p["resize"] < size):
        out.append(f"resize must be -1 (= image_size * 8 / 7) or an integer >= image_size={size}, "
                   f"got {p['resize']}")
    if p["resize_mode"] not in RESIZE_MODES:
        out.append(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {p['resize_mode']!r}")
    if int(p["num_workers"]) != p["num_workers"] or p["num_workers"] < -1:
        out.append(f"num_workers must be -1 (= the cores), 0 (in-process) or a positive integer, "
                   f"got {p['num_workers']}")
    if int(p["test_size"]) != p["test_size"] or not (p["test_size"] == -1 or p["test_size"] >= 1):
        out.append(f"test_size must be -1 (all) or >= 1, got {p['test_size']}")
    if p["source"] == "tfds" and not p["use_cache"]:
        out.append("source='tfds' reads the images through the resize cache: use_cache must be True")
    return out


# ----------------------------------------------------------------------------
# Annotations.
# ----------------------------------------------------------------------------


@dataclass
class CubRecords:
    """The annotation of a CUB folder, one row per image in image-id order.

    ``image_id`` int64 (N,), ``path`` (N,) str (relative to ``images/``),
    ``class_id`` int64 (N,) (1-based), ``is_train`` bool (N,), ``box_xywh``
    float64 (N, 4) (pixels), ``class_names`` {class id: name}, ``root`` the folder.
    """

    image_id: np.ndarray
    path: np.ndarray
    class_id: np.ndarray
    is_train: np.ndarray
    box_xywh: np.ndarray
    class_names: dict[int, str]
    root: Path

    def __len__(self) -> int:
        return len(self.image_id)

    def subset(self, keep: np.ndarray) -> CubRecords:
        return CubRecords(self.image_id[keep], self.path[keep], self.class_id[keep], self.is_train[keep],
                          self.box_xywh[keep], self.class_names, self.root)


def locate_folder(source: str | os.PathLike) -> Path:
    """The ``CUB_200_2011`` folder: ``source`` itself, or ``source/CUB_200_2011``."""
    if not source:
        raise CubSourceError(f"config.data.source is empty: set it to the CUB_200_2011 folder or to 'tfds'. "
                             f"{HOW_TO_GET}")
    root = Path(source).expanduser()
    if not root.is_dir():
        raise CubSourceError(f"CUB source {root} is not a folder. {HOW_TO_GET}")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    return root


def _read_table(path: Path, columns: int, kinds: Sequence[type]) -> dict[int, tuple]:
    if not path.is_file():
        raise CubSourceError(f"CUB annotation file {path} is missing. {HOW_TO_GET}")
    out: dict[int, tuple] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, columns - 1) if columns else line.split()
            try:
                if len(parts) != columns:
                    raise ValueError(f"{len(parts)} fields, expected {columns}")
                key = int(parts[0])
                values = tuple(kind(v) for kind, v in zip(kinds, parts[1:]))
            except ValueError as e:
                raise CubFormatError(f"CUB annotation file {path}, line {n}: {line[:80]!r} is not in the official "
                                     f"format ({e}). {HOW_TO_GET}") from None
            if key in out:
                raise CubFormatError(f"CUB annotation file {path}, line {n}: id {key} appears twice")
            out[key] = values
    return out


def read_annotations(source: str | os.PathLike) -> CubRecords:
    """Reads the five official annotation files of a CUB folder (`locate_folder`); images are not opened."""
    root = locate_folder(source)
    for name in ANNOTATION_FILES:
        if not (root / name).is_file():
            raise CubSourceError(f"CUB annotation file {root / name} is missing. {HOW_TO_GET}")
    images = _read_table(root / "images.txt", 2, (str,))
    labels = _read_table(root / "image_class_labels.txt", 2, (int,))
    split = _read_table(root / "train_test_split.txt", 2, (int,))
    boxes = _read_table(root / "bounding_boxes.txt", 5, (float, float, float, float))
    classes = _read_table(root / "classes.txt", 2, (str,))
    ids = sorted(images)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        if set(table) != set(images):
            extra = sorted(set(table) ^ set(images))
            raise CubFormatError(f"CUB annotation file {root / name} and images.txt list different image ids "
                                 f"(e.g. {extra[0]}); the folder mixes versions. {HOW_TO_GET}")
    class_id = np.array([labels[i][0] for i in ids], np.int64)
    bad = [c for c in set(class_id.tolist()) if c not in classes]
    if bad:
        raise CubFormatError(f"CUB annotation file {root / 'image_class_labels.txt'} uses class {bad[0]}, which "
                             f"{root / 'classes.txt'} does not list")
    flags = np.array([split[i][0] for i in ids], np.int64)
    if not np.isin(flags, (0, 1)).all():
        raise CubFormatError(f"CUB annotation file {root / 'train_test_split.txt'}: flags must be 0 (test) or 1 "
                             f"(train)")
    return CubRecords(image_id=np.array(ids, np.int64), path=np.array([images[i][0] for i in ids]),
                      class_id=class_id, is_train=flags.astype(bool),
                      box_xywh=np.array([boxes[i] for i in ids], np.float64).reshape(-1, 4),
                      class_names={k: v[0] for k, v in sorted(classes.items())}, root=root)


def select_classes(records: CubRecords, classes: Any, *, check_files: bool = True) -> CubRecords:
    """The records of the kept classes (`parse_classes`); with ``check_files``, every kept image must exist.

    Raises `CubSourceError` naming the first missing image; when ``classes`` is
    unset it suggests the classes whose images are all present.
    """
    ids = parse_classes(classes)
    if ids is not None:
        unknown = [c for c in ids if c not in records.class_names]
        if unknown:
            raise ValueError(f"config.data.classes={classes!r}: class {unknown[0]} is not in "
                             f"{records.root / 'classes.txt'} (which lists {len(records.class_names)})")
        keep = np.isin(records.class_id, ids)
    else:
        keep = np.ones(len(records), bool)
    kept = records.subset(keep)
    if check_files:
        present = _present_files(records.root / "images")
        missing = np.array([p not in present for p in kept.path], bool)
        if missing.any():
            first = records.root / "images" / kept.path[np.argmax(missing)]
            count = f"{int(missing.sum())} of the {len(kept)} images"
            if ids is None:
                complete = sorted(set(records.class_id.tolist()) -
                                  set(records.class_id[~np.array([p in present for p in records.path])].tolist()))
                hint = (f"--config.data.classes={format_classes(complete)} (the classes whose images are all here)"
                        if complete else "--config.data.classes=1-30 (the classes whose images are present)")
                raise CubSourceError(f"CUB image {first} is missing ({count} that images.txt lists are absent); for "
                                     f"a partial folder keep only the classes it holds, e.g. {hint}. {HOW_TO_GET}")
            raise CubSourceError(f"CUB image {first} is missing ({count} of the classes {classes} are absent). "
                                 f"{HOW_TO_GET}")
    if not len(kept):
        raise CubSourceError(f"CUB folder {records.root}: no image of the classes {classes!r}")
    return kept


def _present_files(images: Path) -> set[str]:
    """Relative paths (``"001.x/y.jpg"``) of the files under ``images/`` (one level of class folders)."""
    out: set[str] = set()
    if not images.is_dir():
        return out
    with os.scandir(images) as it:
        for d in it:
            if d.is_dir():
                with os.scandir(d.path) as files:
                    out.update(f"{d.name}/{f.name}" for f in files if f.is_file())
    return out


# ----------------------------------------------------------------------------
# Decoding, resizing, cropping (module-level: the workers run them).
# ----------------------------------------------------------------------------


def _resized_shape(w: int, h: int, resize: int, mode: str) -> tuple[int, int]:
    """(width, height) after resizing a ``w x h`` image."""
    if mode == "square":
        return resize, resize
    if w <= h:
        return resize, max(resize, int(round(h * resize / w)))
    return max(resize, int(round(w * resize / h))), resize


def decode_resize(data: str | os.PathLike | bytes | np.ndarray, resize: int, mode: str = "square"
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """A JPEG (path, bytes or an already decoded uint8 array) as RGB resized uint8 ``(h, w, 3)``, and the
    original ``(width, height)``. Greyscale, CMYK and palette images become RGB.

    Raises `CubSourceError` for a missing file and `CubFormatError` naming the file when it is truncated
    or not an image.
    """
    import io

    from PIL import Image

    name = str(data) if isinstance(data, (str, os.PathLike)) else f"(a {type(data).__name__})"
    try:
        if isinstance(data, np.ndarray):
            im = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
        else:
            im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        with im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            size = im.size
            out = im.resize(_resized_shape(size[0], size[1], resize, mode), Image.Resampling.BILINEAR)
            return np.asarray(out, np.uint8), size
    except FileNotFoundError:
        raise CubSourceError(f"CUB image {name} is missing. {HOW_TO_GET}") from None
    except IMAGE_ERRORS as e:
        raise CubFormatError(f"CUB image {name} is truncated or unreadable ({describe_image_error(e)}): replace "
                             f"it with the original file. {HOW_TO_GET}") from None


def crop_example(image: np.ndarray, orig_size: Sequence[int], box_xywh: Sequence[float], size: int,
                 entropy: list[int] | None, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` crop of a resized uint8 image (a view of it) and the box in its normalised coordinates.

    ``entropy`` None: the centre crop, no flip (test); else ``default_rng(entropy)``
    draws the row offset, the column offset and (with ``flip``) a flip, in that order.
    """
    h, w = image.shape[:2]
    if entropy is None:
        oy, ox, mirror = (h - size) // 2, (w - size) // 2, False
    else:
        rng = np.random.default_rng(entropy)
        oy = int(rng.integers(0, h - size + 1))
        ox = int(rng.integers(0, w - size + 1))
        mirror = bool(rng.random() < 0.5) if flip else False
    out = image[oy:oy + size, ox:ox + size]
    if mirror:
        out = out[:, ::-1]
    ow, oh = float(orig_size[0]), float(orig_size[1])
    bx, by, bw, bh = (float(v) for v in box_xywh)
    x0, x1 = np.clip([bx, bx + bw], 0.0, ow) * (w / ow) - ox
    y0, y1 = np.clip([by, by + bh], 0.0, oh) * (h / oh) - oy
    box = np.clip(np.array([x0, y0, x1, y1]) * (2.0 / size) - 1.0, -1.0, 1.0)
    if mirror:
        box = np.array([-box[2], box[1], -box[0], box[3]])
    return out, box.astype(np.float32)


_OPEN_CACHES: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
_OPEN_LOCK = threading.Lock()


def _open_cache_arrays(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with _OPEN_LOCK:
        if path not in _OPEN_CACHES:
            p = Path(path)
            with np.load(p / "arrays.npz") as f:
                arrays = {k: f[k] for k in f.files}
            pixels = np.memmap(p / "pixels.bin", np.uint8, mode="r") if (p / "pixels.bin").stat().st_size else (
                np.zeros(0, np.uint8))
            _OPEN_CACHES[path] = (pixels, arrays)
        return _OPEN_CACHES[path]


def _cached_image(path: str, row: int) -> tuple[np.ndarray, np.ndarray]:
    pixels, arrays = _open_cache_arrays(path)
    h, w = (int(v) for v in arrays["shape"][row])
    start = int(arrays["offset"][row])
    return np.asarray(pixels[start:start + h * w * 3]).reshape(h, w, 3), arrays["orig_size"][row]


def _fill(spec: tuple, items: Sequence[tuple], image: np.ndarray, box: np.ndarray) -> None:
    """Writes the examples ``items`` into ``image`` (n, S, S, 3) (uint8, or float32 in [0, 1]) and ``box``
    float32 (n, 4).

    ``spec = (kind, cache path, size, resize, mode, flip)``; an item is
    ``(ref, box_xywh, entropy or None)`` with ``ref`` a cache row (kind
    ``"cache"``) or a JPEG path (kind ``"jpeg"``).
    """
    kind, cache, size, resize, mode, flip = spec
    for k, (ref, box_xywh, entropy) in enumerate(items):
        if kind == "cache":
            resized, orig = _cached_image(cache, int(ref))
        else:
            resized, orig = decode_resize(ref, resize, mode)
        crop, box[k] = crop_example(resized, orig, box_xywh, size, entropy, flip)
        if image.dtype == np.uint8:
            image[k] = crop
        else:  # the same operation as the float conversion of uint8 chunks in `CubDataset._build`
            np.multiply(crop, np.float32(1 / 255), out=image[k])


def _make_examples(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Worker: ``(spec, items)`` -> (uint8 crops (n, S, S, 3), boxes (n, 4)) (see `_fill`)."""
    spec, items = job
    size = spec[2]
    image = np.empty((len(items), size, size, 3), np.uint8)
    box = np.empty((len(items), 4), np.float32)
    _fill(spec, items, image, box)
    return image, box


def _resize_job(job: tuple) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Worker (cache build): ``(jpeg path, resize, mode)`` -> (bytes, (h, w), original (w, h))."""
    path, resize, mode = job
    image, orig = decode_resize(path, resize, mode)
    return image.tobytes(), image.shape[:2], orig


# ----------------------------------------------------------------------------
# The resize cache.
# ----------------------------------------------------------------------------





def _worker_count(num_workers: int) -> int:
    return min(os.cpu_count() or 1, 16) if int(num_workers) < 0 else int(num_workers)


def _spawn_executor(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=ignore_interrupts)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stn_jax"


def cache_options(resize: int, mode: str, classes: Any) -> dict[str, Any]:
    ids = parse_classes(classes)
    return {"resize": int(resize), "resize_mode": mode, "classes": "all" if ids is None else format_classes(ids),
            "recipe_version": RECIPE_VERSION, "cache_version": CACHE_VERSION}


def folder_fingerprint(records: CubRecords) -> dict[str, Any]:
    """What identifies a folder's kept content cheaply: the per-image annotation files' SHA-256 and every kept
    image's name and byte size."""
    h = hashlib.sha256()
    for rel in records.path:
        h.update(f"{rel}:{(records.root / 'images' / rel).stat().st_size};".encode())
    return {"kind": "folder", "annotations": {n: sha256_file(records.root / n) for n in PER_IMAGE_FILES},
            "images": len(records), "images_sha256": h.hexdigest()}


def cache_path(cache_dir: str | os.PathLike, options: dict[str, Any], source: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(options, source=source), sort_keys=True).encode()).hexdigest()[:16]
    classes = options["classes"].replace(",", "_")
    if len(classes) > 24:
        classes = "some"
    return Path(cache_dir).expanduser() / f"cub_{options['resize']}px_{options['resize_mode']}_{classes}_{digest}"


def _write_cache(path: Path, entries, total: int, arrays, meta: dict[str, Any]) -> Path:
    """Writes ``entries`` (an iterator of (bytes, (h, w), (ow, oh)) in row order, at most ``total``) and the
    per-image ``arrays`` (a dict, or a callable returning one after the pass) into a temporary folder beside
    ``path``, then renames it to ``path`` (`building_folder`)."""
    start = time.time()
    with building_folder(path) as tmp, progress(total=total, desc=f"CUB resize cache {path.name}") as bar:
        offset = np.zeros(total, np.int64)
        shape = np.zeros((total, 2), np.int32)
        orig = np.zeros((total, 2), np.int32)
        h = hashlib.sha256()
        position = count = 0
        with open(tmp / "pixels.bin", "wb") as f:
            for i, (data, hw, wh) in enumerate(entries):
                offset[i], shape[i], orig[i] = position, hw, wh
                f.write(data)
                h.update(data)
                position += len(data)
                count = i + 1
                bar.update()
        arrays = dict(arrays() if callable(arrays) else arrays, offset=offset[:count], shape=shape[:count],
                      orig_size=orig[:count])
        np.savez(tmp / "arrays.npz", **arrays)
        meta = dict(meta, cache_version=CACHE_VERSION, images=count, seconds=round(time.time() - start, 1),
                    files={"pixels.bin": {"sha256": h.hexdigest(), "bytes": position},
                           "arrays.npz": {"sha256": sha256_file(tmp / "arrays.npz"),
                                          "bytes": (tmp / "arrays.npz").stat().st_size}})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("CUB resize cache: %d images, %.2f GB in %.1f s (%s)", count, position / 1e9, time.time() - start, path)
    return path


def build_folder_cache(records: CubRecords, path: Path, resize: int, mode: str, options: dict[str, Any],
                       source: dict[str, Any], num_workers: int = 0) -> Path:
    """Resizes every image of ``records`` (in order) into the cache folder ``path``."""
    jobs = [(str(records.root / "images" / rel), int(resize), mode) for rel in records.path]
    workers = _worker_count(num_workers)
    arrays = {"class_id": records.class_id, "is_train": records.is_train, "box_xywh": records.box_xywh,
              "image_id": records.image_id, "name": records.path.astype(str)}
    meta = {"task": TASK, "options": options, "source": dict(source, path=str(records.root))}
    if workers <= 1 or len(jobs) < 64:
        return _write_cache(path, map(_resize_job, jobs), len(jobs), arrays, meta)
    with _spawn_executor(workers) as pool:
        try:
            return _write_cache(path, pool.map(_resize_job, jobs, chunksize=16), len(jobs), arrays, meta)
        except BaseException:  # a bad image or Ctrl-C: drop the queued images instead of decoding them all first
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def load_cache(path: str | os.PathLike, *, verify: bool | None = None) -> dict[str, Any]:
    """Checks a cache folder (sizes; SHA-256 of ``arrays.npz``, and of ``pixels.bin`` when ``verify`` or, with
    None, when it is at most ``VERIFY_LIMIT_BYTES``) and returns its ``meta.json``."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("cache_version") != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('cache_version')}, expected {CACHE_VERSION}")
        files = meta["files"]
        for name, info in files.items():
            actual = (path / name).stat().st_size
            if actual != info["bytes"]:
                raise ValueError(f"{name} has {actual} bytes, meta.json records {info['bytes']}")
        check = ["arrays.npz"]
        if verify or (verify is None and files["pixels.bin"]["bytes"] <= VERIFY_LIMIT_BYTES):
            check.append("pixels.bin")
        for name in check:
            digest = sha256_file(path / name)
            if digest != files[name]["sha256"]:
                raise ValueError(f"{name} has SHA-256 {digest}, meta.json records {files[name]['sha256']}")
        with np.load(path / "arrays.npz") as f:
            missing = [k for k in CACHE_ARRAYS if k not in f.files]
        if missing:
            raise ValueError(f"arrays.npz lacks {missing[0]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CubFormatError(f"CUB resize cache {path} is unreadable or corrupt ({type(e).__name__}: {e}); delete "
                             f"the folder to rebuild it") from None
    return meta


# ----------------------------------------------------------------------------
# tensorflow-datasets.
# ----------------------------------------------------------------------------


def _tfds_offline_error(data_dir: str) -> CubSourceError:
    return CubSourceError(
        f"tensorflow-datasets cannot get {TFDS_NAME}: it is not prepared in {data_dir} and {TFDS_DOWNLOAD_HOST} "
        f"cannot be reached (no network), so a download would only retry for minutes. Offline, read the official "
        f"folder instead: --config.data.source=/path/to/CUB_200_2011 (e.g. "
        f"../shared/data/cub_200_2011_sample/CUB_200_2011 with --config.data.classes=1-30 in this project); the "
        f"data set is at {OFFICIAL_URL}")


def tfds_builder(data_dir: str | None = None, *, check_network: bool = True):
    """The prepared tfds ``caltech_birds2011`` builder (downloading and preparing it if needed).

    Raises `CubSourceError` at once when it is not prepared and the download host cannot be reached.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CubSourceError(f"config.data.source='tfds' needs tensorflow-datasets ({e}); install it, or use "
                             f"the folder source. {HOW_TO_GET}") from e
    from stn_jax.paper.data.mnist import network_available

    builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
    if not builder.is_prepared():
        resolved = str(Path(builder.data_dir).parent.parent)
        if check_network and not network_available(TFDS_DOWNLOAD_HOST):
            raise _tfds_offline_error(resolved)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def build_tfds_cache(builder, path: Path, resize: int, mode: str, classes: Any, options: dict[str, Any],
                     source: dict[str, Any]) -> Path:
    """Resizes the kept images of the tfds splits (train, then test, in tfds order) into ``path``."""
    import tensorflow_datasets as tfds

    ids = parse_classes(classes)
    rows: dict[str, list] = {k: [] for k in ("class_id", "is_train", "box_xywh", "image_id", "name")}
    total = sum(builder.info.splits[s].num_examples for s in ("train", "test"))

    def entries():
        for split in ("train", "test"):
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
                class_id = int(ex["label"]) + 1
                if ids is not None and class_id not in ids:
                    continue
                image, (w, h) = decode_resize(np.asarray(ex["image"]), resize, mode)
                ymin, xmin, ymax, xmax = (float(v) for v in ex["bbox"])
                rows["class_id"].append(class_id)
                rows["is_train"].append(split == "train")
                rows["box_xywh"].append((xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h))
                rows["image_id"].append(len(rows["image_id"]) + 1)  # tfds has no official id: its order
                rows["name"].append(ex["image/filename"].decode())
                yield image.tobytes(), image.shape[:2], (w, h)

    def arrays():
        return {"class_id": np.array(rows["class_id"], np.int64), "is_train": np.array(rows["is_train"], bool),
                "box_xywh": np.array(rows["box_xywh"], np.float64).reshape(-1, 4),
                "image_id": np.array(rows["image_id"], np.int64), "name": np.array(rows["name"], str)}

    return _write_cache(path, entries(), total, arrays, {"task": TASK, "options": options, "source": source})


# ----------------------------------------------------------------------------
# The data set.
# ----------------------------------------------------------------------------


def _entropy(*values: int) -> list[int]:
    return [int(v) % (1 << 64) for v in values]


def _shutdown(executors: list) -> None:
    for ex in executors:
        try:
            ex.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover - best effort at exit
            pass


class CubDataset:
    """CUB-200-2011 (task ``cub``); see the module docstring for the design.

    Attributes: ``image_shape`` (S, S, 3), ``num_classes`` (K kept classes),
    ``class_ids`` (their 1-based official ids), ``class_names``,
    ``element_spec`` (``image`` float32 (S, S, 3), ``label`` int32 (),
    ``box`` float32 (4,)), ``local_batch_size``, ``train_size``, ``test_size``,
    ``resize``, ``cache_path`` (None without cache).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        import jax
        import jax.numpy as jnp

        p = self.params = resolve_options(config_data)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        self.task = TASK
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.image_size = int(p["image_size"])
        self.resize = resolve_resize(self.image_size, p["resize"])
        self.resize_mode = p["resize_mode"]
        self.flip = bool(p["flip"])
        self.workers = _worker_count(p["num_workers"])
        self.cache_dir = cache_folder(p["cache_dir"], cache_dir, _default_cache_dir())
        self.cache_path: Path | None = None
        self._load_source()
        self.image_shape = (self.image_size, self.image_size, 3)
        self.element_spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                             "label": jax.ShapeDtypeStruct((), jnp.int32),
                             "box": jax.ShapeDtypeStruct((4,), jnp.float32)}
        self._perms: dict[int, np.ndarray] = {}
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._executors: list = []
        self._lock = threading.Lock()
        self._pool: concurrent.futures.Executor | None = None      # JPEG decoding processes
        self._threads: concurrent.futures.Executor | None = None   # cache-reading threads
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None  # prefetch
        self._finalizer = weakref.finalize(self, _shutdown, self._executors)

    # -- source -------------------------------------------------------------

    def _load_source(self) -> None:
        p = self.params
        options = cache_options(self.resize, self.resize_mode, p["classes"])
        if p["source"] == "tfds":
            builder = tfds_builder(p["tfds_data_dir"] or None)
            source = {"kind": "tfds", "name": TFDS_NAME, "version": str(builder.info.version)}
            path = cache_path(self.cache_dir, options, source)
            if not (path / "meta.json").is_file():
                build_tfds_cache(builder, path, self.resize, self.resize_mode, p["classes"], options, source)
            self._use_cache(path)
            names = builder.info.features["label"].names
            self.class_names = {i + 1: n for i, n in enumerate(names)}
            return
        records = read_annotations(p["source"])
        kept = select_classes(records, p["classes"])
        self.class_names = records.class_names
        if p["use_cache"]:
            source = folder_fingerprint(kept)
            path = cache_path(self.cache_dir, options, source)
            if not (path / "meta.json").is_file():
                log.info("building the CUB resize cache (%d images, %d px %s) in %s", len(kept), self.resize,
                         self.resize_mode, path)
                build_folder_cache(kept, path, self.resize, self.resize_mode, options, source, p["num_workers"])
            self._use_cache(path)
        else:
            self._set_rows(kept.class_id, kept.is_train, kept.box_xywh, kept.image_id, kept.path,
                           refs=np.array([str(kept.root / "images" / r) for r in kept.path], object))

    def _use_cache(self, path: Path) -> None:
        load_cache(path)
        self.cache_path = path
        _, arrays = _open_cache_arrays(str(path))
        self._set_rows(arrays["class_id"], arrays["is_train"], arrays["box_xywh"], arrays["image_id"],
                       arrays["name"], refs=np.arange(len(arrays["class_id"])))

    def _set_rows(self, class_id, is_train, box_xywh, image_id, name, refs) -> None:
        class_id = np.asarray(class_id, np.int64)
        self.class_ids = tuple(sorted(set(class_id.tolist())))
        lookup = {c: k for k, c in enumerate(self.class_ids)}
        self.num_classes = len(self.class_ids)
        self._label = np.array([lookup[c] for c in class_id.tolist()], np.int32)
        self._box = np.asarray(box_xywh, np.float64)
        self._refs = refs
        self.image_ids = np.asarray(image_id, np.int64)
        self.names = np.asarray(name)
        is_train = np.asarray(is_train, bool)
        self._train_rows = np.flatnonzero(is_train)
        self._test_rows = np.flatnonzero(~is_train)
        if not len(self._train_rows) or not len(self._test_rows):
            raise CubSourceError(f"CUB: the kept classes have {len(self._train_rows)} training and "
                                 f"{len(self._test_rows)} test images; both splits must be non-empty")
        self.kept_class_names = tuple(self.class_names.get(c, str(c)) for c in self.class_ids)

    # -- sizes --------------------------------------------------------------

    @property
    def train_size(self) -> int:
        return len(self._train_rows)

    @property
    def test_size(self) -> int:
        n = len(self._test_rows)
        size = int(self.params["test_size"])
        return n if size == -1 else min(size, n)

    # -- examples -----------------------------------------------------------

    def _spec(self) -> tuple:
        kind = "cache" if self.cache_path is not None else "jpeg"
        return (kind, str(self.cache_path) if self.cache_path else "", self.image_size, self.resize,
                self.resize_mode, self.flip)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng(_entropy(PERM_STREAM, self.seed, epoch)).permutation(
                self.train_size)
        return self._perms[epoch]

    def train_indices(self, step: int) -> np.ndarray:
        """The rows (into the kept images) of this process's shard of step ``step``."""
        n, b = self.train_size, self.global_batch_size
        first = self.process_index * self.local_batch_size
        out = []
        for j in range(first, first + self.local_batch_size):
            epoch, pos = divmod(step * b + j, n)
            out.append(self._train_rows[self._perm(epoch)[pos]])
        return np.asarray(out, np.int64)

    def _items(self, rows: np.ndarray, entropies: list | None) -> list[tuple]:
        return [(self._refs[r], tuple(self._box[r]), None if entropies is None else entropies[k])
                for k, r in enumerate(rows)]

    def _processes(self) -> concurrent.futures.Executor:
        with self._lock:  # the prefetch thread and the caller may both ask first
            if self._pool is None:
                self._pool = _spawn_executor(self.workers)
                self._executors.append(self._pool)
            return self._pool

    def _readers(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="cub-read")
                self._executors.append(self._threads)
            return self._threads

    def _build(self, rows: np.ndarray, entropies: list | None) -> dict[str, np.ndarray]:
        """The examples ``rows`` (with ``entropies``: training crops; None: centre crops) as a batch dict.

        Cache reads run in ``workers`` threads (NumPy copies release the GIL) and write straight into
        the float32 output; JPEGs are decoded in ``workers`` spawned processes, which return uint8 chunks.
        """
        items = self._items(rows, entropies)
        spec = self._spec()
        n, s = len(items), self.image_size
        image = np.empty((n, s, s, 3), np.float32)
        box = np.empty((n, 4), np.float32)
        if n:
            per = max(1, math.ceil(n / max(self.workers, 1)))
            chunks = [slice(i, min(i + per, n)) for i in range(0, n, per)]
            if self.workers == 0:
                _fill(spec, items, image, box)
            elif spec[0] == "cache":
                futures = [self._readers().submit(_fill, spec, items[c], image[c], box[c]) for c in chunks]
                for f in futures:
                    f.result()
            else:
                futures = [self._processes().submit(_make_examples, (spec, items[c])) for c in chunks]
                for c, f in zip(chunks, futures):
                    image8, box[c] = f.result()
                    np.multiply(image8, np.float32(1 / 255), out=image[c])
        return {"image": image, "label": self._label[rows], "box": box}

    def _train_args(self, step: int) -> tuple[np.ndarray, list]:
        rows = self.train_indices(step)
        first = self.process_index * self.local_batch_size
        return rows, [_entropy(TRAIN_STREAM, self.seed, step, j) for j in range(first, first + len(rows))]

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global batch of ``step`` (pure function of seed, step, process);
        ``with_params`` adds ``index`` (the official image ids). With ``prefetch``, step + 1 is then
        started in a background thread."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            out = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            out = self._build(*self._train_args(step))
        if self.params["prefetch"]:
            if self._thread is None:
                self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cub-prefetch")
                self._executors.append(self._thread)
            self._pending = (step + 1, self._thread.submit(self._build, *self._train_args(step + 1)))
        if with_params:
            out["index"] = self.image_ids[self.train_indices(step)]
        return out

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test images ``indices`` (positions in the kept test split, image-id order): centre crops."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        return self._build(self._test_rows[indices], None)

    def test_set(self) -> dict[str, np.ndarray]:
        return self.test_examples(np.arange(self.test_size))

    def train_examples(self, indices) -> dict[str, np.ndarray]:
        """Training images ``indices`` (positions in the kept training split) as test examples are made:
        centre crops, no flip (for features of the training set, e.g. `stn_jax.paper.probe`)."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.train_size):
            raise IndexError(f"training indices must be in [0, {self.train_size})")
        return self._build(self._train_rows[indices], None)

    def train_labels(self) -> np.ndarray:
        """The labels ``(train_size,)`` of the training split, in its order."""
        return self._label[self._train_rows]

    def close(self) -> None:
        """Stops the worker processes and the prefetch thread (a later batch starts new ones)."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        _shutdown(self._executors)
        self._executors.clear()
        self._pool = self._threads = self._thread = None

    def __enter__(self) -> CubDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CubDataset(classes={self.num_classes}, image_shape={self.image_shape}, resize={self.resize} "
                f"{self.resize_mode}, train={self.train_size}, test={self.test_size}, "
                f"cache={self.cache_path}, process={self.process_index}/{self.process_count})")


def make_dataset(options, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 cache_dir: str | os.PathLike | None = None) -> CubDataset:
    return CubDataset(options, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, cache_dir=cache_dir)


# ----------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------


def benchmark(source: str, *, image_size: int = 224, use_cache: bool = True, num_workers: int = 0,
              batch_size: int = 16, steps: int = 20, classes: str = "1-30", cache_dir: str | None = None,
              prefetch: bool = False, step_seconds: float = 0.0) -> float:
    """Training-pipeline images/s after one warm-up batch (the cache is built before timing).

    ``step_seconds`` > 0 stands in for a training step (a sleep after each batch); the result is then
    ``images / time spent waiting for data``, which shows what ``prefetch`` hides.
    """
    config = {"task": TASK, "source": source, "classes": classes, "image_size": image_size,
              "use_cache": use_cache, "num_workers": num_workers, "prefetch": prefetch}
    if cache_dir:
        config["cache_dir"] = cache_dir
    with CubDataset(config, seed=0, global_batch_size=batch_size) as ds:
        ds.train_batch(0)
        waited = 0.0
        for step in range(1, steps + 1):
            start = time.perf_counter()
            ds.train_batch(step)
            waited += time.perf_counter() - start
            if step_seconds:
                time.sleep(step_seconds)
        return steps * batch_size / waited


# ----------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------


def _register() -> None:
    from stn_jax.paper.data.tasks import TASKS as REGISTRY, DataTask, register

    if TASK in REGISTRY:
        return
    options = {k: v for k, v in default_config().to_dict().items() if k != "task"}
    register(DataTask(TASK, TITLE, options, make_dataset, _problems, family="cub"))


_register()
