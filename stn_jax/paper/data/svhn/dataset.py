"""`SvhnDataset`, the real house numbers (task ``svhn``), and `_Base`, what it shares with `SvhnSynthDataset`.

* **Training batches** are pure functions of ``(seed, step, example index)``:
  example ``j`` of the global batch of ``step`` draws everything from
  ``np.random.default_rng((TRAIN_STREAM, seed, step, j))``: a uniform index
  into the training pool (with replacement), then its augmentation. Process
  ``p`` of ``P`` computes rows ``[p B / P, (p + 1) B / P)``, so the shards
  concatenate to the single-process batch, bit for bit (every example is
  computed on its own, whatever the batch size), and a resumed run sees the
  same batches.
* **Augmentation** [U: Goodfellow et al. 2013 train on random 54x54 crops of
  the 64x64 image; the paper does not say what it did, and its 64 px network
  input hints that 64 px goes in]: ``random_crop = W`` takes a W x W window at
  a uniformly random integer offset of the S x S crop and resizes it (bilinear)
  back to S x S; test and validation examples take the centred window, resized
  the same way, so train and test see the same scale. ``-1`` (default) means
  ``round(54 / 64 * S)``: 54 at 64 px, 108 at 128 px; ``0`` (or S) turns it off.
* **Splits.** Training draws from the union of ``train_splits`` (default
  ``train,extra`` [U]: the paper's "about 200k images" suggests train + extra,
  235,755 images, as in Goodfellow et al. 2013). ``validation_size`` (5,000
  [S: hyper-parameters were tuned on a 5k validation set]) images are held out
  from that union by a fixed random draw (independent of the seed) [U] and
  never used for training. The test set is the ``test`` split in file order
  (13,068 images), no random window. The splits' crops come from the cache
  (`stn_jax.paper.data.svhn.cache`).
* **Images** are float32 RGB in [0, 1] ``(B, S, S, 3)``, ``label`` int32
  ``(B, 5)``, ``length`` int32 ``(B,)``. No mean subtraction here (Goodfellow
  et al. 2013 subtract each image's mean: a model can do it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from stn_jax.paper.data.common import default_cache_dir, stream_entropy
from stn_jax.paper.data.files import cache_folder
from stn_jax.paper.data.svhn.annotations import MAX_DIGITS, NUM_CLASSES
from stn_jax.paper.data.svhn.cache import SvhnArrays, split_cache
from stn_jax.paper.data.svhn.crops import resolve_framing
from stn_jax.paper.data.svhn.options import _split_list, resolve_window
from stn_jax.paper.data.svhn.sources import locate_split
from stn_jax.paper.data.tasks import resolve_options

log = logging.getLogger(__name__)

TRAIN_STREAM = 0x5452   # "TR": separate random streams
TEST_STREAM = 0x5445    # "TE"
VALID_STREAM = 0x5641   # "VA"
HOLDOUT_SEED = 0x484F   # "HO": the fixed draw of the validation hold-out


# ----------------------------------------------------------------------------
# Window augmentation.
# ----------------------------------------------------------------------------


def _resize_matrix(window: int, size: int) -> np.ndarray:
    """(size, window) bilinear interpolation weights (pixel centres aligned, edges clamped)."""
    m = np.zeros((size, window), np.float32)
    pos = (np.arange(size) + 0.5) * window / size - 0.5
    pos = np.clip(pos, 0, window - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, window - 1)
    frac = (pos - lo).astype(np.float32)
    m[np.arange(size), lo] += 1 - frac
    m[np.arange(size), hi] += frac
    return m


def window_resize(image: np.ndarray, offset: tuple[int, int], window: int, matrix: np.ndarray | None) -> np.ndarray:
    """The ``window x window`` part of uint8 ``image`` (S, S, 3) at ``offset = (row, col)``, resized back to
    S x S, as float32 in [0, 1] (one example at a time: the same bits whatever the batch)."""
    x = np.asarray(image, np.float32) / np.float32(255)
    if matrix is None:
        return x
    oy, ox = offset
    x = x[oy:oy + window, ox:ox + window]
    x = np.tensordot(matrix, x, axes=(1, 0))             # (S, W, 3)
    x = np.tensordot(matrix, x, axes=(1, 1)).transpose(1, 0, 2)  # (S, S, 3)
    return np.clip(x, 0.0, 1.0)


# ----------------------------------------------------------------------------
# Data sets.
# ----------------------------------------------------------------------------


class _Base:
    """What `SvhnDataset` and `SvhnSynthDataset` share: the resolved options, shapes and shard
    (`_init_common`), the process's rows of a batch, and the test and validation sets in order."""

    task: str
    params: dict[str, Any]

    def _init_common(self, config_data, seed, global_batch_size, process_index, process_count, cache_dir):
        import jax
        import jax.numpy as jnp

        self.params = resolve_options(config_data)
        self.task = self.params["task"]
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.cache_dir = cache_folder(self.params["cache_dir"], cache_dir)
        s = int(self.params["image_size"])
        self.image_size = s
        self.framing = resolve_framing(s, self.params["framing"])
        self.image_shape = (s, s, 3)
        self.num_classes = NUM_CLASSES
        self.num_digits = MAX_DIGITS
        self.element_spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                             "label": jax.ShapeDtypeStruct((MAX_DIGITS,), jnp.int32),
                             "length": jax.ShapeDtypeStruct((), jnp.int32)}
        self.batch_spec = {k: jax.ShapeDtypeStruct((self.local_batch_size,) + v.shape, v.dtype)
                           for k, v in self.element_spec.items()}

    def _rows(self) -> range:
        first = self.process_index * self.local_batch_size
        return range(first, first + self.local_batch_size)

    @staticmethod
    def _check_step(step: int) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step

    @staticmethod
    def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        out["label"] = out["label"].astype(np.int32)
        out["length"] = out["length"].astype(np.int32)
        return out

    def test_set(self) -> dict[str, np.ndarray]:
        """The whole test set (``image`` float32 (N, S, S, 3), ``label`` int32 (N, 5), ``length`` int32 (N,))."""
        return self.test_examples(np.arange(self.test_size))

    def test_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The test set in order, in batches of ``batch_size`` (the last one may be smaller)."""
        for first in range(0, self.test_size, batch_size):
            yield self.test_examples(np.arange(first, min(first + batch_size, self.test_size)))

    def validation_set(self) -> dict[str, np.ndarray]:
        return self.validation_examples(np.arange(self.validation_size))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, image_shape={self.image_shape}, "
                f"framing={self.framing!r}, local_batch_size={self.local_batch_size}, "
                f"process={self.process_index}/{self.process_count})")


class SvhnDataset(_Base):
    """Real SVHN multi-digit numbers (task ``svhn``); see the module docstring and `stn_jax.paper.data.svhn` for
    the design.

    Attributes: ``image_shape`` (S, S, 3), ``num_classes`` 11, ``num_digits`` 5,
    ``local_batch_size``, ``element_spec`` (per example: ``image`` float32
    (S, S, 3), ``label`` int32 (5,), ``length`` int32 ()), ``train_size``,
    ``validation_size``, ``test_size`` (the caches are built on first use of
    these or of the batches).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self._init_common(config_data, seed, global_batch_size, process_index, process_count, cache_dir)
        if self.task != "svhn":
            raise ValueError(f"SvhnDataset is for task 'svhn', got {self.task!r} (use make_dataset)")
        p = self.params
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
            log.info("SVHN crops are cached under %s (set config.data.cache_dir to change)", self.cache_dir)
        self.train_splits = _split_list(p["train_splits"])
        # Fail early, naming what is missing (the test split is looked for when first used).
        self._sources = {s: locate_split(p["source"], s) for s in self.train_splits}
        if p["test_split"] in self.train_splits:
            log.warning("SVHN test_split %r is also a training split: test numbers are training numbers "
                        "(fine for smoke tests only)", p["test_split"])
        self.window = resolve_window(self.image_size, int(p["random_crop"]))
        self._matrix = None if self.window == self.image_size else _resize_matrix(self.window, self.image_size)
        self._train_arrays: list[SvhnArrays] | None = None
        self._test_arrays: SvhnArrays | None = None

    # -- caches ------------------------------------------------------------

    def split_arrays(self, split: str) -> SvhnArrays:
        """The cached crops of ``split`` (built on first use)."""
        p = self.params
        assert self.cache_dir is not None
        return split_cache(p["source"], split, self.cache_dir, self.image_size, self.framing,
                           allow_missing_images=bool(p["allow_missing_images"]), num_workers=int(p["num_workers"]))

    def _pool(self):
        if self._train_arrays is None:
            arrays = [self.split_arrays(s) for s in self.train_splits]
            offsets = np.cumsum([0] + [len(a) for a in arrays])
            total = int(offsets[-1])
            v = int(self.params["validation_size"])
            if v >= total:
                raise ValueError(f"config.data.validation_size={v} leaves no training images: the training "
                                 f"splits {', '.join(self.train_splits)} hold {total}; set it lower (0 = none)")
            order = np.random.default_rng(stream_entropy(HOLDOUT_SEED, total)).permutation(total)
            self._validation_index = np.sort(order[:v]).astype(np.int64)
            self._train_index = np.sort(order[v:]).astype(np.int64)
            self._offsets = offsets
            self._train_arrays = arrays
        return self._train_arrays

    def _get(self, pooled: int) -> tuple[SvhnArrays, int]:
        arrays = self._pool()
        k = int(np.searchsorted(self._offsets, pooled, side="right")) - 1
        return arrays[k], int(pooled - self._offsets[k])

    @property
    def train_size(self) -> int:
        self._pool()
        return len(self._train_index)

    @property
    def validation_size(self) -> int:
        self._pool()
        return len(self._validation_index)

    def _test(self) -> SvhnArrays:
        if self._test_arrays is None:
            self._test_arrays = self.split_arrays(self.params["test_split"])
        return self._test_arrays

    @property
    def test_size(self) -> int:
        n = len(self._test())
        size = int(self.params["test_size"])
        return n if size == -1 else min(size, n)

    # -- examples ----------------------------------------------------------

    def _example(self, arrays: SvhnArrays, i: int, offset: tuple[int, int]) -> dict[str, Any]:
        return {"image": window_resize(arrays.image[i], offset, self.window, self._matrix),
                "label": arrays.label[i], "length": arrays.length[i]}

    def _centre(self) -> tuple[int, int]:
        c = (self.image_size - self.window) // 2
        return c, c

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global training batch of ``step``: ``image`` float32 (b, S, S, 3) in
        [0, 1], ``label`` int32 (b, 5), ``length`` int32 (b,). A pure function of ``(seed, step,
        process_index, process_count)``. ``with_params`` adds ``index`` (into the pooled training splits)
        and ``offset`` (the window's row, column)."""
        step = self._check_step(step)
        self._pool()
        n = len(self._train_index)
        span = self.image_size - self.window + 1
        examples, index, offsets = [], [], []
        for j in self._rows():
            rng = np.random.default_rng(stream_entropy(TRAIN_STREAM, self.seed, step, j))
            pooled = int(self._train_index[rng.integers(n)])
            offset = (int(rng.integers(span)), int(rng.integers(span)))
            arrays, i = self._get(pooled)
            examples.append(self._example(arrays, i, offset))
            index.append(pooled)
            offsets.append(offset)
        out = self._stack(examples)
        if with_params:
            out["index"] = np.asarray(index, np.int64)
            out["offset"] = np.asarray(offsets, np.int32)
        return out

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test images ``indices`` (in [0, test_size)), centred window, no augmentation."""
        arrays = self._test()
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        if not indices.size:
            return self._empty()
        return self._stack([self._example(arrays, int(i), self._centre()) for i in indices])

    def validation_examples(self, indices) -> dict[str, np.ndarray]:
        """Held-out training images ``indices`` (in [0, validation_size)), centred window."""
        self._pool()
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.validation_size):
            raise IndexError(f"validation indices must be in [0, {self.validation_size})")
        if not indices.size:
            return self._empty()
        return self._stack([self._example(*self._get(int(self._validation_index[i])), self._centre())
                            for i in indices])

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}
