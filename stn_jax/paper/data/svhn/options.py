"""The options of the tasks ``svhn`` and ``svhn_synth``: `default_config` (every option with its default and
provenance tag) and their validation; `resolve_window`, the augmentation window a ``random_crop`` means."""

from __future__ import annotations

from typing import Any

import ml_collections

from stn_jax.paper.data.svhn.annotations import MAX_DIGITS, SPLITS

TASKS = ("svhn", "svhn_synth")
GOODFELLOW_WINDOW = 54 / 64  # Goodfellow et al. 2013: random 54x54 crops of the 64x64 image


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


def resolve_window(image_size: int, random_crop: int) -> int:
    """The augmentation window's side: ``-1`` = round(54/64 S), ``0`` = S (off)."""
    if random_crop == -1:
        return int(round(GOODFELLOW_WINDOW * image_size))
    if random_crop == 0:
        return image_size
    return int(random_crop)


def _problems(params: dict[str, Any]) -> list[str]:
    try:
        _validate(params)
    except ValueError as e:
        return [str(e).split("): ", 1)[-1]]
    return []
