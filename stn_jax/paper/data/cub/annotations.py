"""The official CUB-200-2011 folder: its annotation files (`read_annotations` -> `CubRecords`), the kept
classes (`select_classes`) and the errors `CubSourceError`, `CubFormatError`.

* **Folder source** (``config.data.source``): a folder with the official
  ``CUB_200_2011/`` layout (the folder itself or one holding
  ``CUB_200_2011/``, `locate_folder`): ``images.txt`` (``<id> <path>``),
  ``image_class_labels.txt`` (``<id> <class 1-200>``),
  ``train_test_split.txt`` (``<id> <1 = train, 0 = test>``),
  ``bounding_boxes.txt`` (``<id> <x> <y> <width> <height>``, pixels),
  ``classes.txt`` (``<class> <name>``) and ``images/``. A missing annotation
  file raises `CubSourceError` (a `FileNotFoundError`) naming it and
  ``OFFICIAL_URL``; inconsistent files raise `CubFormatError`.

* **Classes.** ``classes`` keeps some classes: ``"1-30"``, ``"1,5,7-9"``
  (1-based official class ids); ``""`` or ``"all"`` keeps all 200. Labels are
  remapped to ``0..K-1`` in class-id order (``class_ids``, ``class_names``
  say which). A folder lacking images of kept classes is an error naming the
  first missing file; with ``classes`` unset it also suggests the complete
  classes (e.g. ``--config.data.classes=1-30`` for the project's sample).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_jax.paper.data.cub.options import format_classes, parse_classes

OFFICIAL_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
HOW_TO_GET = (f"CUB-200-2011 (CUB_200_2011.tgz) is at {OFFICIAL_URL}: unpack it and pass the CUB_200_2011 folder "
              "as --config.data.source=/path/to/CUB_200_2011 (or use --config.data.source=tfds online).")
PER_IMAGE_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
ANNOTATION_FILES = PER_IMAGE_FILES + ("classes.txt",)


class CubSourceError(FileNotFoundError):
    """A CUB folder, annotation file or image is missing (or tfds cannot get it); the message names it."""


class CubFormatError(ValueError):
    """An annotation file or cache is corrupt or inconsistent."""


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
