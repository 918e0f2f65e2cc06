"""The SVHN crop cache: each split cropped once into a folder of ``.npy`` files, built, loaded and verified.

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
* **Workers.** `_crop_job`, the function the worker processes run, is a
  top-level function of this module (spawned processes import it by name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stn_jax.paper.data.common import worker_count
from stn_jax.paper.data.files import building_folder, ignore_interrupts, progress, sha256_file
from stn_jax.paper.data.svhn.annotations import (
    HOW_TO_GET,
    MAX_DIGITS,
    SvhnFormatError,
    SvhnSourceError,
    encode_label,
    read_digit_struct_json,
    read_digit_struct_mat,
)
from stn_jax.paper.data.svhn.crops import LOOSE_FACTOR, TIGHT_ENLARGE, check_boxes, crop, resolve_framing
from stn_jax.paper.data.svhn.sources import (
    SplitSource,
    _archive_annotation_and_images,
    load_image,
    locate_split,
)

log = logging.getLogger(__name__)

CROP_VERSION = 1        # bump when the crop recipe changes (invalidates caches)
CACHE_VERSION = 1       # bump when the cache layout changes
VERIFY_LIMIT_BYTES = 1 << 30


def _crop_job(job: tuple) -> np.ndarray:
    """Worker: ``(png path or bytes, its name for errors, its SvhnRecord, size, framing)`` -> crop (the
    boxes checked against the image first, `check_boxes`)."""
    source, name, record, size, framing = job
    image = load_image(source, name)
    check_boxes(record, image.shape, name)
    return crop(image, record.boxes, size, framing)


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


def _crops(jobs: Iterator[tuple], total: int, num_workers: int, desc: str) -> Iterator[np.ndarray]:
    """Crops of ``jobs`` in order: in-process, or in ``num_workers`` spawned processes, blocks of 1024
    (so a stream of PNG bytes from an archive is never all in memory)."""
    bar = progress(total=total, desc=desc)
    workers = worker_count(num_workers)
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
