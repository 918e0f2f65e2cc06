"""The options of task ``cub``: `default_config` (every option with its default and provenance tag), their
validation, and the rules of two of them: ``classes`` (`parse_classes`, `format_classes`: ``"1-30"``,
``"1,5,7-9"``, ``""`` / ``"all"``) and ``resize`` (`resolve_resize`: ``-1`` = ``round(image_size * 8 / 7)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

TASK = "cub"
TITLE = "CUB-200-2011"
NUM_CLASSES_ALL = 200
RESIZE_MODES = ("square", "shorter")


def default_config() -> ml_collections.ConfigDict:
    """The data section of task ``cub``, every option with its default (tags: `stn_jax.paper.data.cub`)."""
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
