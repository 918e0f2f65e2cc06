"""SVHN format-1 annotations: the digitStruct readers, `SvhnRecord`, the label encoding and the errors.

* **Annotation files.** A split holds ``N.png`` files and their annotation,
  ``digitStruct.mat`` (MATLAB v7.3 = HDF5, read with h5py; the struct array
  ``digitStruct`` with ``name`` and ``bbox``, whose fields ``label``, ``left``,
  ``top``, ``width``, ``height`` are one scalar dataset for a one-digit number
  and arrays of object references for longer ones) or the common community
  conversion ``digitStruct.json``
  (``[{"filename": "1.png", "boxes": [{"left", "top", "width", "height", "label"}]}]``).
  In both, label 10 means the digit 0. `read_digit_struct_mat` and
  `read_digit_struct_json` (and `stn_jax.paper.data.svhn.sources.read_annotations`,
  which finds the file) return one `SvhnRecord` per image (file name, digit
  string, boxes in float pixels).
* **Errors.** Missing folders, archives, annotation files or images raise
  `SvhnSourceError` (a `FileNotFoundError`) naming the path and where the
  archives are (``HOW_TO_GET``); an unreadable annotation file raises
  `SvhnFormatError` naming it.
* **Labels.** ``label`` int32 ``(5,)``: the digits left to right (0-9; the
  annotation's 10 becomes 0), then 10 = "no digit" in the unused positions
  (the paper's five 11-way classifiers, paper Sect. 4.2); ``length`` int32
  (1-5) (`encode_label`, `decode_label`). Numbers with more than 5 digits (and
  entries with no box) are skipped when the cache is built and counted in the
  log, as in Goodfellow et al. 2013.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_jax.paper.data.files import progress as progress_bar

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


class SvhnSourceError(FileNotFoundError):
    """An SVHN folder, archive, annotation file or image is missing; the message names it and the archives."""


class SvhnFormatError(ValueError):
    """An annotation file (digitStruct.mat / .json) or cache is corrupt or not in the expected layout."""


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
            entries = progress_bar(entries, total=len(names), desc=f"reading {Path(name).name}")
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
