"""Where an SVHN split lives, a folder or an official archive, and reading its annotations and images.

* **Sources.** ``config.data.source`` is a folder holding, per split
  (``train``, ``test``, ``extra``), either a sub-folder ``<split>/`` or the
  official archive ``<split>.tar.gz`` (``.tgz``, ``.tar``) as downloaded from
  http://ufldl.stanford.edu/housenumbers/; a split folder itself (whose name is
  the split) works too (`locate_split` returns a `SplitSource`). A split holds
  ``N.png`` files and their annotation (`stn_jax.paper.data.svhn.annotations`);
  `read_annotations` returns one `SvhnRecord` per image. Archives are read as
  streams (no extraction to disk).
* **Errors.** Missing folders, archives, annotation files or images raise
  `SvhnSourceError` naming the path and where the archives are; a corrupt
  archive, and an image that is truncated or no image (`load_image`), raise
  `SvhnFormatError` naming it.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stn_jax.paper.data.files import IMAGE_ERRORS, describe_image_error
from stn_jax.paper.data.svhn.annotations import (
    ANNOTATIONS,
    ARCHIVE_SUFFIXES,
    HOW_TO_GET,
    SvhnFormatError,
    SvhnRecord,
    SvhnSourceError,
    _parse_annotation,
    read_digit_struct_json,
    read_digit_struct_mat,
)


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
