"""Test sets held in ``.npz`` files of images and labels (``--config.data.test_npz``, `experiments.evaluate`).

`load_npz_test_set` reads and checks a user's file; `ArrayTestSet` serves it through the part of the data-set
interface that evaluation reads (``test_size``, ``test_examples``; `stn_jax.paper.data.tasks`).
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from stn_jax.paper.objectives import check_labels


@dataclasses.dataclass
class ArrayTestSet:
    """A test set held in memory (e.g. a user's ``.npz``), with the data-set interface that
    `stn_jax.paper.evaluation.evaluate` reads."""

    arrays: dict[str, np.ndarray]

    @property
    def test_size(self) -> int:
        return len(self.arrays["label"])

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


def load_npz_test_set(path: str | Path, image_shape: tuple[int, ...] | None = None,
                      num_classes: int | None = None, label_shape: tuple[int, ...] = ()) -> ArrayTestSet:
    """Reads ``images`` ((N, H, W) or (N, H, W, C); uint8 in [0, 255] or float in [0, 1]) and ``labels``
    ((N, *label_shape): ``(N,)`` for a classifier, ``(N, 5)`` for SVHN's five digit positions).

    Checks, each failing in one line: the file is a readable ``.npz`` without
    pickled objects; both arrays are present and non-empty; the pixels are
    finite and in range; the labels are integers of shape ``(N, *label_shape)`` in
    ``[0, num_classes)``; the images have ``image_shape``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config.data.test_npz: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise ValueError(f"{path} must hold arrays 'images' and 'labels'; missing {sorted(missing)}, "
                                 f"found {f.files}")
            images, labels = f["images"], f["labels"]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise ValueError(f"{path} holds pickled objects; save plain numeric arrays (np.savez)") from None
        raise
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim not in (4, 5) or len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"{path}: expected images (N, H, W[, C]) with N > 0 and N labels, got "
                         f"{images.shape} and {labels.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise ValueError(f"{path}: images hold {int((~np.isfinite(images)).sum())} non-finite values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{path}: float images must lie in [0, 1], got [{images.min()}, {images.max()}]")
    else:
        raise ValueError(f"{path}: images must be uint8 or float, got {images.dtype}")
    if num_classes is not None:
        check_labels(labels, num_classes, str(path), label_shape)
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise ValueError(f"{path}: images have shape {images.shape[1:]}, the model expects {tuple(image_shape)}")
    return ArrayTestSet({"image": images, "label": labels.astype(np.int32)})
