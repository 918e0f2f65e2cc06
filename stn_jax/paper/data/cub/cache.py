"""The CUB resize cache: every kept image decoded and resized once into one folder, built, checked and read.

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
* **Workers.** `_resize_job`, the function the worker processes run, is a
  top-level function of this module (spawned processes import it by name);
  `_spawn_executor` starts them. A cache is read through `_cached_image`
  (each process maps a cache folder once).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from stn_jax.paper.data.common import worker_count
from stn_jax.paper.data.cub.annotations import PER_IMAGE_FILES, CubFormatError, CubRecords
from stn_jax.paper.data.cub.images import decode_resize
from stn_jax.paper.data.cub.options import TASK, format_classes, parse_classes
from stn_jax.paper.data.files import building_folder, ignore_interrupts, progress, sha256_file

log = logging.getLogger(__name__)

RECIPE_VERSION = 1      # bump when the decode/resize recipe changes (invalidates caches)
CACHE_VERSION = 1       # bump when the cache layout changes
VERIFY_LIMIT_BYTES = 1 << 30
CACHE_ARRAYS = ("offset", "shape", "orig_size", "class_id", "is_train", "box_xywh", "image_id", "name")


def _resize_job(job: tuple) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Worker (cache build): ``(jpeg path, resize, mode)`` -> (bytes, (h, w), original (w, h))."""
    path, resize, mode = job
    image, orig = decode_resize(path, resize, mode)
    return image.tobytes(), image.shape[:2], orig


def _spawn_executor(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=ignore_interrupts)


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
    workers = worker_count(num_workers)
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
