"""CUB-200-2011 fine-grained birds (paper Sect. 4.3, Table 3): reader, resize cache, data set.

Task ``cub`` ("CUB-200-2011", family ``cub``); `CubDataset` has the common
data-set interface (`stn_jax.paper.data.tasks`). Importing this package
registers the task.

Provenance tags [P], [S], [R], [U]: `stn_jax.paper` (here [R] is the authors'
public Caffe examples); the recipe is the paper's Sect. 4.3 and Appendix A.6.

The modules, each with its part of the design in its docstring, and every
public name of them re-exported here:

* `stn_jax.paper.data.cub.options`: the options with their defaults
  (`default_config`), their validation, `parse_classes`, `resolve_resize`;
* `stn_jax.paper.data.cub.annotations`: the official ``CUB_200_2011/`` folder
  (`read_annotations` -> `CubRecords`), the kept classes (`select_classes`)
  and the errors `CubSourceError`, `CubFormatError`;
* `stn_jax.paper.data.cub.tfds_source`: the ``"tfds"`` source
  (tensorflow-datasets ``caltech_birds2011``);
* `stn_jax.paper.data.cub.images`: decoding and resizing a JPEG
  (`decode_resize`), an example's crop, flip and box (`crop_example`);
* `stn_jax.paper.data.cub.cache`: the resize cache (`build_folder_cache`,
  `load_cache`, `cache_path`);
* `stn_jax.paper.data.cub.dataset`: `CubDataset` (training batches as pure
  functions of seed, step and process; worker threads and processes;
  prefetch) and `make_dataset`.
"""

from __future__ import annotations

from stn_jax.paper.data.cub.annotations import (
    ANNOTATION_FILES,
    HOW_TO_GET,
    OFFICIAL_URL,
    PER_IMAGE_FILES,
    CubFormatError,
    CubRecords,
    CubSourceError,
    locate_folder,
    read_annotations,
    select_classes,
)
from stn_jax.paper.data.cub.cache import (
    CACHE_ARRAYS,
    CACHE_VERSION,
    RECIPE_VERSION,
    VERIFY_LIMIT_BYTES,
    build_folder_cache,
    cache_options,
    cache_path,
    folder_fingerprint,
    load_cache,
)
from stn_jax.paper.data.cub.dataset import PERM_STREAM, TRAIN_STREAM, CubDataset, make_dataset
from stn_jax.paper.data.cub.images import crop_example, decode_resize
from stn_jax.paper.data.cub.options import (
    NUM_CLASSES_ALL,
    RESIZE_MODES,
    TASK,
    TITLE,
    _problems,
    default_config,
    format_classes,
    parse_classes,
    resolve_resize,
)
from stn_jax.paper.data.cub.tfds_source import TFDS_DOWNLOAD_HOST, TFDS_NAME, build_tfds_cache, tfds_builder

__all__ = [
    "ANNOTATION_FILES", "CACHE_ARRAYS", "CACHE_VERSION", "HOW_TO_GET", "NUM_CLASSES_ALL", "OFFICIAL_URL",
    "PERM_STREAM", "PER_IMAGE_FILES", "RECIPE_VERSION", "RESIZE_MODES", "TASK", "TFDS_DOWNLOAD_HOST", "TFDS_NAME",
    "TITLE", "TRAIN_STREAM", "VERIFY_LIMIT_BYTES", "CubDataset", "CubFormatError", "CubRecords", "CubSourceError",
    "build_folder_cache", "build_tfds_cache", "cache_options", "cache_path", "crop_example", "decode_resize",
    "default_config", "folder_fingerprint", "format_classes", "load_cache", "locate_folder", "make_dataset",
    "parse_classes", "read_annotations", "resolve_resize", "select_classes", "tfds_builder",
]


def _register() -> None:
    from stn_jax.paper.data.tasks import TASKS as REGISTRY, DataTask, register

    if TASK in REGISTRY:
        return
    options = {k: v for k, v in default_config().to_dict().items() if k != "task"}
    register(DataTask(TASK, TITLE, options, make_dataset, _problems, family="cub"))


_register()
