"""`CubDataset`, the data set of task ``cub``: training batches, test examples, worker threads and processes.

* **Training batches** are pure functions of ``(seed, step, process)``:
  example ``j`` of the global batch of step ``s`` is position ``g = s B + j``
  of an endless sequence of epochs; epoch ``e = g // N`` is the permutation
  ``default_rng((PERM_STREAM, seed, e)).permutation(N)`` of the ``N``
  training images [U: epochs without replacement, as the Caffe data layers
  read a shuffled list; every image once per epoch matters for 5,994 images],
  and its crop offset and flip come from ``default_rng((TRAIN_STREAM, seed,
  s, j))``. Process ``p`` of ``P`` computes rows ``[p B / P, (p + 1) B / P)``,
  so shards concatenate to the global batch bit for bit, and a resumed run
  needs no iterator state.

* **Workers and prefetch.** ``num_workers`` (``-1`` = the machine's cores,
  at most 16; ``0`` = all in the calling thread) does two jobs. JPEG
  decoding (building the cache, or every step with ``use_cache=False``) runs
  in that many spawned processes (`concurrent.futures.ProcessPoolExecutor`,
  spawn-safe), one chunk of the batch each; they return uint8 crops. Reading
  from the cache runs in that many *threads* (NumPy copies release the GIL)
  that write straight into the float32 batch: measured, worker processes
  made cache reads 2-3x slower (pickling the crops costs more than cropping
  them). With ``prefetch`` the next step's batch is started in a background
  thread as soon as a batch is returned, so it is made while the training
  step runs. `CubDataset.close` (or ``with CubDataset(...)``) stops the
  workers; garbage collection and interpreter exit do too. `_fill` makes
  examples, `_make_examples` is what the worker processes run: top-level
  functions of this module (spawned processes import them by name).

* **Measured** training-pipeline images/s (`CubDataset.train_batch` timed
  over 20 steps after one warm-up batch, the cache built before timing;
  batch 16, the 1,701-image sample, no prefetch, no training step; a 2-core
  CPU shared with other jobs, load average 10-16, so the numbers are low and
  noisy and extra workers had no free core to run on):

  ==================  ==========  ==========  ==========  ==========
  source              224, 0 wkr  224, 2 wkr  448, 0 wkr  448, 2 wkr
  ==================  ==========  ==========  ==========  ==========
  resize cache        960-1,560   790-2,110   115-231     196
  JPEG every step     94-108      69-104      51-58       41-45
  ==================  ==========  ==========  ==========  ==========

  (2 wkr: 2 threads for cache reads, 2 processes for JPEGs.) With
  ``prefetch`` and a 0.5 s stand-in training step, the loop waited for data
  at the equivalent of 4,656 (cache, 224), 576 (JPEG, 224), 728 (cache, 448)
  and 185 (JPEG, 448) images/s: a step longer than making a batch hides
  it. At 448 px the float32 batch alone is 38 MB (the conversion is about a
  third of the time). Building the sample's cache took 17 s at 256 px with 2
  worker processes (1,701 JPEGs, 334 MB).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stn_jax.paper.data.common import default_cache_dir, stream_entropy, worker_count
from stn_jax.paper.data.cub.annotations import CubSourceError, read_annotations, select_classes
from stn_jax.paper.data.cub.cache import (
    _cached_image,
    _open_cache_arrays,
    _spawn_executor,
    build_folder_cache,
    cache_options,
    cache_path,
    folder_fingerprint,
    load_cache,
)
from stn_jax.paper.data.cub.images import crop_example, decode_resize
from stn_jax.paper.data.cub.options import TASK, resolve_resize
from stn_jax.paper.data.cub.tfds_source import TFDS_NAME, build_tfds_cache, tfds_builder
from stn_jax.paper.data.files import cache_folder
from stn_jax.paper.data.tasks import resolve_options

log = logging.getLogger(__name__)

TRAIN_STREAM = 0x5452   # "TR"
PERM_STREAM = 0x5045    # "PE": the epoch permutations


def _fill(spec: tuple, items: Sequence[tuple], image: np.ndarray, box: np.ndarray) -> None:
    """Writes the examples ``items`` into ``image`` (n, S, S, 3) (uint8, or float32 in [0, 1]) and ``box``
    float32 (n, 4).

    ``spec = (kind, cache path, size, resize, mode, flip)``; an item is
    ``(ref, box_xywh, entropy or None)`` with ``ref`` a cache row (kind
    ``"cache"``) or a JPEG path (kind ``"jpeg"``).
    """
    kind, cache, size, resize, mode, flip = spec
    for k, (ref, box_xywh, entropy) in enumerate(items):
        if kind == "cache":
            resized, orig = _cached_image(cache, int(ref))
        else:
            resized, orig = decode_resize(ref, resize, mode)
        crop, box[k] = crop_example(resized, orig, box_xywh, size, entropy, flip)
        if image.dtype == np.uint8:
            image[k] = crop
        else:  # the same operation as the float conversion of uint8 chunks in `CubDataset._build`
            np.multiply(crop, np.float32(1 / 255), out=image[k])


def _make_examples(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Worker: ``(spec, items)`` -> (uint8 crops (n, S, S, 3), boxes (n, 4)) (see `_fill`)."""
    spec, items = job
    size = spec[2]
    image = np.empty((len(items), size, size, 3), np.uint8)
    box = np.empty((len(items), 4), np.float32)
    _fill(spec, items, image, box)
    return image, box


def _shutdown(executors: list) -> None:
    for ex in executors:
        try:
            ex.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover - best effort at exit
            pass


class CubDataset:
    """CUB-200-2011 (task ``cub``); see the module docstring and `stn_jax.paper.data.cub` for the design.

    Attributes: ``image_shape`` (S, S, 3), ``num_classes`` (K kept classes),
    ``class_ids`` (their 1-based official ids), ``class_names``,
    ``element_spec`` (``image`` float32 (S, S, 3), ``label`` int32 (),
    ``box`` float32 (4,)), ``local_batch_size``, ``train_size``, ``test_size``,
    ``resize``, ``cache_path`` (None without cache).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        import jax
        import jax.numpy as jnp

        p = self.params = resolve_options(config_data)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"process_count {process_count}")
        self.task = TASK
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.image_size = int(p["image_size"])
        self.resize = resolve_resize(self.image_size, p["resize"])
        self.resize_mode = p["resize_mode"]
        self.flip = bool(p["flip"])
        self.workers = worker_count(p["num_workers"])
        self.cache_dir = cache_folder(p["cache_dir"], cache_dir, default_cache_dir())
        self.cache_path: Path | None = None
        self._load_source()
        self.image_shape = (self.image_size, self.image_size, 3)
        self.element_spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                             "label": jax.ShapeDtypeStruct((), jnp.int32),
                             "box": jax.ShapeDtypeStruct((4,), jnp.float32)}
        self._perms: dict[int, np.ndarray] = {}
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._executors: list = []
        self._lock = threading.Lock()
        self._pool: concurrent.futures.Executor | None = None      # JPEG decoding processes
        self._threads: concurrent.futures.Executor | None = None   # cache-reading threads
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None  # prefetch
        self._finalizer = weakref.finalize(self, _shutdown, self._executors)

    # -- source -------------------------------------------------------------

    def _load_source(self) -> None:
        p = self.params
        options = cache_options(self.resize, self.resize_mode, p["classes"])
        if p["source"] == "tfds":
            builder = tfds_builder(p["tfds_data_dir"] or None)
            source = {"kind": "tfds", "name": TFDS_NAME, "version": str(builder.info.version)}
            path = cache_path(self.cache_dir, options, source)
            if not (path / "meta.json").is_file():
                build_tfds_cache(builder, path, self.resize, self.resize_mode, p["classes"], options, source)
            self._use_cache(path)
            names = builder.info.features["label"].names
            self.class_names = {i + 1: n for i, n in enumerate(names)}
            return
        records = read_annotations(p["source"])
        kept = select_classes(records, p["classes"])
        self.class_names = records.class_names
        if p["use_cache"]:
            source = folder_fingerprint(kept)
            path = cache_path(self.cache_dir, options, source)
            if not (path / "meta.json").is_file():
                log.info("building the CUB resize cache (%d images, %d px %s) in %s", len(kept), self.resize,
                         self.resize_mode, path)
                build_folder_cache(kept, path, self.resize, self.resize_mode, options, source, p["num_workers"])
            self._use_cache(path)
        else:
            self._set_rows(kept.class_id, kept.is_train, kept.box_xywh, kept.image_id, kept.path,
                           refs=np.array([str(kept.root / "images" / r) for r in kept.path], object))

    def _use_cache(self, path: Path) -> None:
        load_cache(path)
        self.cache_path = path
        _, arrays = _open_cache_arrays(str(path))
        self._set_rows(arrays["class_id"], arrays["is_train"], arrays["box_xywh"], arrays["image_id"],
                       arrays["name"], refs=np.arange(len(arrays["class_id"])))

    def _set_rows(self, class_id, is_train, box_xywh, image_id, name, refs) -> None:
        class_id = np.asarray(class_id, np.int64)
        self.class_ids = tuple(sorted(set(class_id.tolist())))
        lookup = {c: k for k, c in enumerate(self.class_ids)}
        self.num_classes = len(self.class_ids)
        self._label = np.array([lookup[c] for c in class_id.tolist()], np.int32)
        self._box = np.asarray(box_xywh, np.float64)
        self._refs = refs
        self.image_ids = np.asarray(image_id, np.int64)
        self.names = np.asarray(name)
        is_train = np.asarray(is_train, bool)
        self._train_rows = np.flatnonzero(is_train)
        self._test_rows = np.flatnonzero(~is_train)
        if not len(self._train_rows) or not len(self._test_rows):
            raise CubSourceError(f"CUB: the kept classes have {len(self._train_rows)} training and "
                                 f"{len(self._test_rows)} test images; both splits must be non-empty")
        self.kept_class_names = tuple(self.class_names.get(c, str(c)) for c in self.class_ids)

    # -- sizes --------------------------------------------------------------

    @property
    def train_size(self) -> int:
        return len(self._train_rows)

    @property
    def test_size(self) -> int:
        n = len(self._test_rows)
        size = int(self.params["test_size"])
        return n if size == -1 else min(size, n)

    # -- examples -----------------------------------------------------------

    def _spec(self) -> tuple:
        kind = "cache" if self.cache_path is not None else "jpeg"
        return (kind, str(self.cache_path) if self.cache_path else "", self.image_size, self.resize,
                self.resize_mode, self.flip)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng(stream_entropy(PERM_STREAM, self.seed, epoch)).permutation(
                self.train_size)
        return self._perms[epoch]

    def train_indices(self, step: int) -> np.ndarray:
        """The rows (into the kept images) of this process's shard of step ``step``."""
        n, b = self.train_size, self.global_batch_size
        first = self.process_index * self.local_batch_size
        out = []
        for j in range(first, first + self.local_batch_size):
            epoch, pos = divmod(step * b + j, n)
            out.append(self._train_rows[self._perm(epoch)[pos]])
        return np.asarray(out, np.int64)

    def _items(self, rows: np.ndarray, entropies: list | None) -> list[tuple]:
        return [(self._refs[r], tuple(self._box[r]), None if entropies is None else entropies[k])
                for k, r in enumerate(rows)]

    def _processes(self) -> concurrent.futures.Executor:
        with self._lock:  # the prefetch thread and the caller may both ask first
            if self._pool is None:
                self._pool = _spawn_executor(self.workers)
                self._executors.append(self._pool)
            return self._pool

    def _readers(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="cub-read")
                self._executors.append(self._threads)
            return self._threads

    def _build(self, rows: np.ndarray, entropies: list | None) -> dict[str, np.ndarray]:
        """The examples ``rows`` (with ``entropies``: training crops; None: centre crops) as a batch dict.

        Cache reads run in ``workers`` threads (NumPy copies release the GIL) and write straight into
        the float32 output; JPEGs are decoded in ``workers`` spawned processes, which return uint8 chunks.
        """
        items = self._items(rows, entropies)
        spec = self._spec()
        n, s = len(items), self.image_size
        image = np.empty((n, s, s, 3), np.float32)
        box = np.empty((n, 4), np.float32)
        if n:
            per = max(1, math.ceil(n / max(self.workers, 1)))
            chunks = [slice(i, min(i + per, n)) for i in range(0, n, per)]
            if self.workers == 0:
                _fill(spec, items, image, box)
            elif spec[0] == "cache":
                futures = [self._readers().submit(_fill, spec, items[c], image[c], box[c]) for c in chunks]
                for f in futures:
                    f.result()
            else:
                futures = [self._processes().submit(_make_examples, (spec, items[c])) for c in chunks]
                for c, f in zip(chunks, futures):
                    image8, box[c] = f.result()
                    np.multiply(image8, np.float32(1 / 255), out=image[c])
        return {"image": image, "label": self._label[rows], "box": box}

    def _train_args(self, step: int) -> tuple[np.ndarray, list]:
        rows = self.train_indices(step)
        first = self.process_index * self.local_batch_size
        return rows, [stream_entropy(TRAIN_STREAM, self.seed, step, j) for j in range(first, first + len(rows))]

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global batch of ``step`` (pure function of seed, step, process);
        ``with_params`` adds ``index`` (the official image ids). With ``prefetch``, step + 1 is then
        started in a background thread."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            out = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            out = self._build(*self._train_args(step))
        if self.params["prefetch"]:
            if self._thread is None:
                self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cub-prefetch")
                self._executors.append(self._thread)
            self._pending = (step + 1, self._thread.submit(self._build, *self._train_args(step + 1)))
        if with_params:
            out["index"] = self.image_ids[self.train_indices(step)]
        return out

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test images ``indices`` (positions in the kept test split, image-id order): centre crops."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        return self._build(self._test_rows[indices], None)

    def test_set(self) -> dict[str, np.ndarray]:
        return self.test_examples(np.arange(self.test_size))

    def train_examples(self, indices) -> dict[str, np.ndarray]:
        """Training images ``indices`` (positions in the kept training split) as test examples are made:
        centre crops, no flip (for features of the training set, e.g. `stn_jax.paper.probe`)."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.train_size):
            raise IndexError(f"training indices must be in [0, {self.train_size})")
        return self._build(self._train_rows[indices], None)

    def train_labels(self) -> np.ndarray:
        """The labels ``(train_size,)`` of the training split, in its order."""
        return self._label[self._train_rows]

    def close(self) -> None:
        """Stops the worker processes and the prefetch thread (a later batch starts new ones)."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        _shutdown(self._executors)
        self._executors.clear()
        self._pool = self._threads = self._thread = None

    def __enter__(self) -> CubDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CubDataset(classes={self.num_classes}, image_shape={self.image_shape}, resize={self.resize} "
                f"{self.resize_mode}, train={self.train_size}, test={self.test_size}, "
                f"cache={self.cache_path}, process={self.process_index}/{self.process_count})")


def make_dataset(options, *, seed: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 cache_dir: str | os.PathLike | None = None) -> CubDataset:
    return CubDataset(options, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, cache_dir=cache_dir)
