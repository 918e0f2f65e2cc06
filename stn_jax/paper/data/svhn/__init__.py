"""Street View House Numbers, multi-digit (paper Sect. 4.2, Table 2): readers, crops, cache, data sets.

Two tasks, one interface (`SvhnDataset`, `SvhnSynthDataset`; `make_dataset`
picks by ``config.data.task``):

* ``svhn``: the real format-1 data ("full numbers") of Netzer et al. 2011;
* ``svhn_synth``: an offline stand-in, house-number-like images composed from
  MNIST digits (no SVHN files needed).

Importing this package registers both tasks (`stn_jax.paper.data.tasks`). Its
modules, each with its part of the design in its docstring, and every public
name of them re-exported here:

* `stn_jax.paper.data.svhn.annotations`: the ``digitStruct.mat`` / ``.json``
  readers, `SvhnRecord`, the label encoding (``label`` int32 ``(5,)``, 10 =
  "no digit"; ``length``) and the errors `SvhnSourceError`, `SvhnFormatError`;
* `stn_jax.paper.data.svhn.sources`: where a split lives (a folder or an
  official archive, `locate_split`), `read_annotations`, `load_image`;
* `stn_jax.paper.data.svhn.crops`: framing the digits (tight 64 px, loose
  128 px), `crop`, `check_boxes`, `draw_crops`;
* `stn_jax.paper.data.svhn.cache`: the crop cache of a split (built in worker
  processes, memory-mapped, SHA-256 checked): `split_cache`, `build_cache`,
  `load_cache`, `verify_cache`;
* `stn_jax.paper.data.svhn.options`: the options with their defaults
  (`default_config`) and their validation;
* `stn_jax.paper.data.svhn.dataset`: `SvhnDataset` (training batches as pure
  functions of seed, step and example; the window augmentation; the
  validation hold-out; the test split);
* `stn_jax.paper.data.svhn.synthetic`: `synth_number` and `SvhnSynthDataset`.

Provenance tags [P], [S], [U]: defined in `stn_jax.paper`.
"""

from __future__ import annotations

import os

from stn_jax.paper.data.svhn.annotations import (
    ANNOTATIONS,
    ARCHIVE_SUFFIXES,
    HOW_TO_GET,
    MAX_DIGITS,
    NO_DIGIT,
    NUM_CLASSES,
    OFFICIAL_URL,
    SPLITS,
    SvhnFormatError,
    SvhnRecord,
    SvhnSourceError,
    decode_label,
    encode_label,
    read_digit_struct_json,
    read_digit_struct_mat,
)
from stn_jax.paper.data.svhn.cache import (
    ARRAYS,
    CACHE_VERSION,
    CROP_VERSION,
    VERIFY_LIMIT_BYTES,
    SvhnArrays,
    build_cache,
    cache_options,
    cache_path,
    load_cache,
    source_listing,
    split_cache,
    verify_cache,
)
from stn_jax.paper.data.svhn.crops import (
    LOOSE_FACTOR,
    TIGHT_ENLARGE,
    check_boxes,
    crop,
    crop_64,
    crop_128,
    crop_and_resize,
    crop_box,
    draw_crops,
    resolve_framing,
    union_box,
)
from stn_jax.paper.data.svhn.dataset import (
    HOLDOUT_SEED,
    TEST_STREAM,
    TRAIN_STREAM,
    VALID_STREAM,
    SvhnDataset,
    window_resize,
)
from stn_jax.paper.data.svhn.options import GOODFELLOW_WINDOW, TASKS, _problems, default_config, resolve_window
from stn_jax.paper.data.svhn.sources import SplitSource, load_image, locate_split, read_annotations
from stn_jax.paper.data.svhn.synthetic import (
    SYNTH_DIGIT_SCALE,
    SYNTH_DY,
    SYNTH_GAP,
    SYNTH_LENGTH_PROBS,
    SYNTH_SHEAR,
    SYNTH_SQUEEZE,
    SYNTH_VERSION,
    SvhnSynthDataset,
    ink_box,
    synth_number,
)

__all__ = [
    "ANNOTATIONS", "ARCHIVE_SUFFIXES", "ARRAYS", "CACHE_VERSION", "CROP_VERSION", "GOODFELLOW_WINDOW", "HOLDOUT_SEED",
    "HOW_TO_GET", "LOOSE_FACTOR", "MAX_DIGITS", "NO_DIGIT", "NUM_CLASSES", "OFFICIAL_URL", "SPLITS",
    "SYNTH_DIGIT_SCALE", "SYNTH_DY", "SYNTH_GAP", "SYNTH_LENGTH_PROBS", "SYNTH_SHEAR", "SYNTH_SQUEEZE",
    "SYNTH_VERSION", "TASKS", "TEST_STREAM", "TIGHT_ENLARGE", "TRAIN_STREAM", "VALID_STREAM", "VERIFY_LIMIT_BYTES",
    "SplitSource", "SvhnArrays", "SvhnDataset", "SvhnFormatError", "SvhnRecord", "SvhnSourceError",
    "SvhnSynthDataset", "build_cache", "cache_options", "cache_path", "check_boxes", "crop", "crop_64", "crop_128",
    "crop_and_resize", "crop_box", "decode_label", "default_config", "draw_crops", "encode_label", "ink_box",
    "load_cache", "load_image", "locate_split", "make_dataset", "read_annotations", "read_digit_struct_json",
    "read_digit_struct_mat", "resolve_framing", "resolve_window", "source_listing", "split_cache", "synth_number",
    "union_box", "verify_cache", "window_resize",
]


def make_dataset(config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None) -> SvhnDataset | SvhnSynthDataset:
    """`SvhnDataset` (task ``svhn``) or `SvhnSynthDataset` (task ``svhn_synth``) for ``config_data``."""
    given = config_data.to_dict() if hasattr(config_data, "to_dict") else dict(config_data)
    cls = SvhnSynthDataset if given.get("task") == "svhn_synth" else SvhnDataset
    return cls(config_data, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
               process_count=process_count, cache_dir=cache_dir)


def _register() -> None:
    from stn_jax.paper.data.tasks import DataTask, register

    for name, title in (("svhn", "SVHN"), ("svhn_synth", "Synthetic house numbers")):
        options = {k: v for k, v in default_config(name).to_dict().items() if k != "task"}
        register(DataTask(name, title, options, make_dataset, _problems, family="svhn"))


_register()
