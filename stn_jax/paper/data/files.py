"""File helpers shared by the data caches: checksums, atomic writes and progress bars."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_write(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(file)`` into a temporary file beside ``target``, then renames it: readers never see a part."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "") -> tqdm:
    """A progress bar over images (``update()`` it, or iterate it), refreshed at most every 2 s."""
    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=2.0, smoothing=0.05)


def publish_folder(tmp: Path, path: Path) -> None:
    """Renames a completed cache folder ``tmp`` to ``path``; if another process published ``path`` first
    (its ``meta.json`` is there), keeps that one and removes ``tmp``."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").is_file():
            raise
        log.info("another process built %s meanwhile; using it", path)
        shutil.rmtree(tmp, ignore_errors=True)
