"""CUB from tensorflow-datasets (``config.data.source="tfds"``): the builder and its resize cache.

* **tfds source.** ``"tfds"``: tensorflow-datasets ``caltech_birds2011``
  (``tfds.builder(..., data_dir=tfds_data_dir)``, prepared by
  ``download_and_prepare`` if needed; the official split; its normalised
  box). Offline and unprepared it fails at once (no tfds retries) with a
  message naming the folder option. Its images go through the same resize
  cache (`stn_jax.paper.data.cub.cache`; ``use_cache`` must be True).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stn_jax.paper.data.cub.annotations import HOW_TO_GET, OFFICIAL_URL, CubSourceError
from stn_jax.paper.data.cub.cache import _write_cache
from stn_jax.paper.data.cub.images import decode_resize
from stn_jax.paper.data.cub.options import TASK, parse_classes

TFDS_NAME = "caltech_birds2011"
TFDS_DOWNLOAD_HOST = "data.caltech.edu"


def _tfds_offline_error(data_dir: str) -> CubSourceError:
    return CubSourceError(
        f"tensorflow-datasets cannot get {TFDS_NAME}: it is not prepared in {data_dir} and {TFDS_DOWNLOAD_HOST} "
        f"cannot be reached (no network), so a download would only retry for minutes. Offline, read the official "
        f"folder instead: --config.data.source=/path/to/CUB_200_2011 (e.g. "
        f"../shared/data/cub_200_2011_sample/CUB_200_2011 with --config.data.classes=1-30 in this project); the "
        f"data set is at {OFFICIAL_URL}")


def tfds_builder(data_dir: str | None = None, *, check_network: bool = True):
    """The prepared tfds ``caltech_birds2011`` builder (downloading and preparing it if needed).

    Raises `CubSourceError` at once when it is not prepared and the download host cannot be reached.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CubSourceError(f"config.data.source='tfds' needs tensorflow-datasets ({e}); install it, or use "
                             f"the folder source. {HOW_TO_GET}") from e
    from stn_jax.paper.data.mnist import network_available

    builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
    if not builder.is_prepared():
        resolved = str(Path(builder.data_dir).parent.parent)
        if check_network and not network_available(TFDS_DOWNLOAD_HOST):
            raise _tfds_offline_error(resolved)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def build_tfds_cache(builder, path: Path, resize: int, mode: str, classes: Any, options: dict[str, Any],
                     source: dict[str, Any]) -> Path:
    """Resizes the kept images of the tfds splits (train, then test, in tfds order) into ``path``."""
    import tensorflow_datasets as tfds

    ids = parse_classes(classes)
    rows: dict[str, list] = {k: [] for k in ("class_id", "is_train", "box_xywh", "image_id", "name")}
    total = sum(builder.info.splits[s].num_examples for s in ("train", "test"))

    def entries():
        for split in ("train", "test"):
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
                class_id = int(ex["label"]) + 1
                if ids is not None and class_id not in ids:
                    continue
                image, (w, h) = decode_resize(np.asarray(ex["image"]), resize, mode)
                ymin, xmin, ymax, xmax = (float(v) for v in ex["bbox"])
                rows["class_id"].append(class_id)
                rows["is_train"].append(split == "train")
                rows["box_xywh"].append((xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h))
                rows["image_id"].append(len(rows["image_id"]) + 1)  # tfds has no official id: its order
                rows["name"].append(ex["image/filename"].decode())
                yield image.tobytes(), image.shape[:2], (w, h)

    def arrays():
        return {"class_id": np.array(rows["class_id"], np.int64), "is_train": np.array(rows["is_train"], bool),
                "box_xywh": np.array(rows["box_xywh"], np.float64).reshape(-1, 4),
                "image_id": np.array(rows["image_id"], np.int64), "name": np.array(rows["name"], str)}

    return _write_cache(path, entries(), total, arrays, {"task": TASK, "options": options, "source": source})
