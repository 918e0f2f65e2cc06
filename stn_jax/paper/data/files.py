"""File helpers shared by the data caches: where a cache lives, checksums, atomic writes, cache folders built
out of sight, worker set-up and progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


class CacheBuildInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a cache build; the partial folder was removed. The message names the cache."""


def cache_folder(option: str | os.PathLike | None, argument: str | os.PathLike | None,
                 default: Path | None = None) -> Path | None:
    """The folder a data set caches into: ``config.data.cache_dir`` (``option``) when set, else the
    ``cache_dir`` argument of the data set (the trainer passes ``<workdir>/data``), else ``default``."""
    chosen = option or argument
    return Path(chosen).expanduser() if chosen else default


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


# What PIL raises for a truncated, damaged or non-image file (an `UnidentifiedImageError` is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


def describe_image_error(e: BaseException) -> str:
    """PIL's reason, for a message that names the file itself (PIL's "cannot identify image file" names a
    stream object when the bytes came from an archive)."""
    from PIL import UnidentifiedImageError

    return "not an image file" if isinstance(e, UnidentifiedImageError) else str(e)


def ignore_interrupts() -> None:
    """Initializer of worker processes: SIGINT is left to the parent, which stops them (a Ctrl-C in a
    terminal reaches every process of the group; workers that took it would each print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def building_folder(path: Path) -> Iterator[Path]:
    """A new private folder beside ``path`` to build a cache folder in (a ``meta.json`` written last marks it
    complete); renamed to ``path`` when the block ends.

    If the block fails, the folder is removed, so no partial cache is left; a Ctrl-C becomes
    `CacheBuildInterrupted`, one line naming ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, CacheBuildInterrupted):
            raise CacheBuildInterrupted(f"stopped by Ctrl-C while building the cache {path}; the partial cache "
                                        f"was removed: run the same command to build it again") from None
        raise


def _publish(tmp: Path, path: Path) -> None:
    """Renames the completed cache folder ``tmp`` to ``path``. If another process published ``path`` first
    (its ``meta.json`` is there), keeps that one and removes ``tmp``; a ``path`` without ``meta.json`` is an
    incomplete folder (e.g. its ``meta.json`` was deleted): it is replaced."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private
    try:
        os.rename(tmp, path)
        return
    except OSError:
        if not path.is_dir():
            raise
    if (path / "meta.json").is_file():
        log.info("another process built %s meanwhile; using it", path)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    log.warning("replacing %s: it lacks meta.json, so it is an incomplete cache", path)
    shutil.rmtree(path)
    os.rename(tmp, path)
