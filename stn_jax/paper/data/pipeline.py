"""The MNIST-family data sets: deterministic, sharded, on-the-fly distorted batches and fixed test sets.

``make_dataset(config.data, seed=..., global_batch_size=...)`` returns an
`MnistDataset`. Its design:

* **Sources.** The MNIST split is read once per process (`stn_jax.paper.data.mnist`),
  put into a *canonical order* (sorted by pixel bytes, then label: a content
  order that does not depend on where the data came from, so the tfds and IDX
  sources give identical data sets) and kept in memory as uint8 on the
  generator device, with every digit's ink box.
* **Training batches** are pure functions of ``(seed, step, example index)``:
  example ``i`` of the global batch of step ``s`` reads its randomness from row
  ``i`` of ``jax.random.bits(fold_in(fold_in(key(seed), TRAIN_STREAM), s), (B, M))``
  (``M`` words per example: the source digit, drawn with replacement, then
  every distortion parameter; with JAX's partitionable threefry, the default,
  a row does not depend on ``B`` either). Process ``p`` of ``P`` computes examples
  ``[p * B / P, (p + 1) * B / P)`` of the global batch ``B``: the union of the
  processes' shards is exactly the single-process global batch, and a run
  resumed at step ``s`` sees exactly the batches of an uninterrupted run.
  No iterator state, no dependence on iteration order.
* **Test sets** are one distorted copy of each test-split digit (digit ``i``
  with row ``i`` of ``bits(fold_in(key(test_seed), TEST_STREAM), (test_size, M))``), from a fixed
  ``config.data.test_seed`` independent of the training seed. They are
  generated once, cached as ``.npz`` under ``cache_dir`` next to a ``.json``
  with the SHA-256 of the arrays; the digest is logged, and verified when the
  file is read again.
* **Speed.** A batch is made by one `jax.jit`-compiled function (shared by all
  data sets with the same options) that maps the per-example distortion over
  the batch with `jax.lax.map` (not `jax.vmap`: then every example is computed
  by the same compiled code whatever the batch size, which makes shards
  bit-identical to the global batch; the speed is the same here; a shard of
  one example is computed as the first of two, `_as_first_of_two`). It runs on
  the CPU by default (``generator_device``), so accelerators stay free and
  every machine with the same jaxlib and CPU instruction set (with or without
  fused multiply-add) produces the same bits; the next training batch is
  dispatched asynchronously while the current one is used (``prefetch``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import use_cpu_sampler
from stn_jax.paper.data import distortions as D
from stn_jax.paper.data.files import array_digest, atomic_write, cache_folder
from stn_jax.paper.data.mnist import load_mnist
from stn_jax.paper.data.mnist_tasks import MNIST_TASKS, NO_CONTENT, MnistTask

log = logging.getLogger(__name__)

TRAIN_STREAM = 0x5452  # "TR": fold-in tags that separate the data's random streams from the trainer's
TEST_STREAM = 0x5445  # "TE"
# Bump when a change to the generators changes the data (invalidates cached test sets).
GENERATOR_VERSION = 1


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation whose every prefix is as class-balanced as the labels allow.

    Each class's indices are shuffled (``numpy.random.default_rng(seed)``), then
    taken round-robin over the classes: a prefix of ``k`` holds ``k / classes``
    of each class (until a class runs out).
    """
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max(len(ix) for ix in per_class)
    table = np.full((rounds, len(per_class)), -1, np.int64)
    for c, ix in enumerate(per_class):
        table[:len(ix), c] = ix
    order = table.ravel()
    return order[order >= 0]


def canonical_order(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The permutation that sorts examples by their pixel bytes, then label (a source-independent order)."""
    rows = np.concatenate([images.reshape(len(images), -1), labels.astype(np.uint8)[:, None]], 1)
    keys = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    return np.argsort(keys, kind="stable")


@functools.lru_cache(maxsize=8)
def _load_split(source: str, split: str, data_dir: str, manual_dir: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(source, split, data_dir or None, manual_dir=manual_dir or None)
    order = canonical_order(images, labels)
    images, labels = np.ascontiguousarray(images[order]), labels[order].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=32)
def _generator(task_name: str, frozen_params: tuple) -> Callable:
    """The jitted batch generator for these options, shared by every data set with the same options
    (so the XLA compilation happens once per process and batch shape).

    ``gen(src, words, first, random_index) -> dict``: examples ``first + arange(len(words))``;
    row ``j`` of ``words`` is example ``first + j``'s randomness. ``random_index``
    (traced bool): draw the source digit from the first word (training) or use
    digit ``first + j`` (test set). The drawn parameters are always returned
    (under ``params``; they are small) so that one compiled function serves all uses.
    A single example is computed as the first of two (see `_as_first_of_two`).
    """
    p = dict(frozen_params)
    task = MNIST_TASKS[task_name]

    def example(r, index, src):
        image, label, extras, params = task.example(r, index, src, p)
        params["index"] = index
        return {"image": image.astype(jnp.float32), "label": label.astype(jnp.int32), **extras, "params": params}

    def generate(src, words, first, random_index):
        n = src["images"].shape[0]

        def one(w, i):
            r = D.Draws(w)
            drawn = r.randint(0, n)
            index = jnp.where(random_index, drawn, jnp.minimum(i, n - 1))
            return example(r, index, src)

        ids = first + jnp.arange(words.shape[0], dtype=jnp.int32)
        # One example per loop iteration (not vmap): the compiled arithmetic of an example is then the
        # same whatever the batch size, so a process's shard is bit-identical to its rows of the global
        # batch, and a test-set chunk to the same examples generated in any other chunking.
        # The XLA lowering of the sampler is faster than the native CPU kernel for this forward-only work.
        with use_cpu_sampler("xla"):
            return jax.lax.map(lambda args: one(*args), (words, ids))

    return _as_first_of_two(jax.jit(generate))


def _as_first_of_two(generate: Callable) -> Callable:
    """``generate`` run on two copies of a single row of ``words``, keeping the first example.

    A batch of one gives an example different last bits: XLA's algebraic
    simplifier rewrites the operations on an axis of size 1, which changes
    the fusion and with it which multiply-adds the CPU computes as fused
    multiply-adds (up to 1e-5 in a pixel). Batches of two and more compile
    the example alike, so a shard or test-set chunk of one runs the batch-of-two function.
    """

    def run(src: dict[str, jax.Array], words: jax.Array, first: jax.Array,
            random_index: jax.Array) -> dict[str, Any]:
        if words.shape[0] != 1:
            return generate(src, words, first, random_index)
        out = generate(src, jnp.concatenate([words, words]), first, random_index)
        return jax.tree.map(lambda x: x[:1], out)

    return run


def _content_params(p: dict[str, Any]) -> tuple:
    """The options that determine what is generated, hashable."""
    return tuple(sorted((k, v) for k, v in p.items() if k not in NO_CONTENT + ("test_seed", "test_size")))


# ----------------------------------------------------------------------------
# The data set.
# ----------------------------------------------------------------------------


class MnistDataset:
    """Distorted-MNIST data for one task; see the module docstring for the design.

    Attributes:
      task: the task name (`TASKS`).
      params: the resolved data configuration (a dict).
      image_shape: per-example image shape, e.g. ``(42, 42, 1)``; ``(60, 60, 60, 1)`` for 3-D.
      num_classes: 10 (19 for ``addition``: sums 0..18).
      element_spec: per-example `jax.ShapeDtypeStruct` of each output key (no batch axis).
      batch_spec: the same for this process's training batch (``local_batch_size`` leading).
      local_batch_size: ``global_batch_size // process_count``.
    """

    def __init__(self, params: dict[str, Any], task: MnistTask, *, seed: int, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self.params = dict(params)
        self.task = self.params["task"]
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.cache_dir = cache_folder(self.params["cache_dir"], cache_dir)
        p = self.params
        self._spec = task
        self.image_shape = tuple(task.image_shape(p))
        self.num_classes = task.num_classes
        spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                "label": jax.ShapeDtypeStruct((), jnp.int32)}
        spec.update({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in task.extras.items()})
        self.element_spec = spec
        self.batch_spec = {k: jax.ShapeDtypeStruct((self.local_batch_size,) + v.shape, v.dtype)
                           for k, v in spec.items()}
        self._device = jax.local_devices(backend="cpu")[0] if p["generator_device"] == "cpu" else jax.local_devices()[0]
        self._sources: dict[str, dict[str, jax.Array]] = {}
        self._num_words = 1 + task.words(p)  # one for the source digit's index
        self._generate = _generator(self.task, _content_params(p))
        self._pending: tuple[int, dict] | None = None
        self._test: dict[str, np.ndarray] | None = None
        self.test_checksum: str | None = None
        with jax.default_device(self._device):
            self._train_key = jax.random.fold_in(jax.random.key(self.seed), TRAIN_STREAM)
            self._test_key = jax.random.fold_in(jax.random.key(int(p["test_seed"])), TEST_STREAM)

    # -- sources -----------------------------------------------------------

    def source_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``(images uint8 (N, 28, 28), labels int32 (N,))`` this task draws from.

        Canonical order; with ``digit_class`` only that class. For the test split
        with a ``test_size`` smaller than the split, the order is a seeded,
        class-balanced one (`balanced_order`), so that the test set's first
        ``test_size`` digits have every class in equal measure.
        """
        p = self.params
        images, labels = _load_split(str(p["source"]), split, str(p["tfds_data_dir"] or ""),
                                     str(p["tfds_manual_dir"] or ""))
        if self._spec.digit_class and p["digit_class"] >= 0:
            keep = labels == p["digit_class"]
            images, labels = images[keep], labels[keep]
        if split == "test" and 0 < p["test_size"] < len(labels):
            order = balanced_order(labels, int(p["test_seed"]))
            images, labels = images[order], labels[order]
        return images, labels

    def _src(self, split: str) -> dict[str, jax.Array]:
        if split not in self._sources:
            images, labels = self.source_arrays(split)
            arrays = {"images": images, "labels": labels, "ink": D.ink_boxes(images)}
            self._sources[split] = jax.device_put(arrays, self._device)
        return self._sources[split]

    # -- generation --------------------------------------------------------

    def _dispatch_train(self, step: int) -> dict[str, jax.Array]:
        """Dispatches (asynchronously) this process's shard of step ``step``.

        The global batch's random words are ``bits(fold_in(train_key, step), (B, M))``
        (computed in full by every process: a few kB) and this process takes its rows.
        """
        src = self._src("train")
        first = self.process_index * self.local_batch_size
        with jax.default_device(self._device):
            words = jax.random.bits(jax.random.fold_in(self._train_key, jnp.uint32(step)),
                                    (self.global_batch_size, self._num_words), jnp.uint32)
            words = words[first:first + self.local_batch_size]
            return self._generate(src, words, jnp.int32(first), jnp.bool_(True))

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global training batch of ``step``, as NumPy arrays.

        A pure function of ``(seed, step, process_index, process_count)``; the
        shards of all processes concatenate to the single-process batch.
        ``with_params`` adds ``params``, the drawn distortion parameters.
        """
        step = int(step)
        if step < 0 or step >= 2 ** 32:
            raise ValueError(f"step must be in [0, 2**32), got {step}")
        if self._pending is not None and self._pending[0] == step:
            out = self._pending[1]
        else:
            out = self._dispatch_train(step)
        self._pending = (step + 1, self._dispatch_train(step + 1)) if self.params["prefetch"] else None
        if not with_params:
            out = {k: v for k, v in out.items() if k != "params"}
        return jax.tree.map(np.asarray, out)

    def _test_size(self) -> int:
        n = self._src("test")["images"].shape[0]
        size = self.params["test_size"]
        return n if size == -1 else min(int(size), n)  # e.g. the 974 eights when coloc's digit_class is 8

    def generate_test_set(self, with_params: bool = False) -> dict[str, np.ndarray]:
        """Generates the fixed test set (no cache): example ``i`` distorts test digit ``i`` with row ``i`` of
        ``bits(fold_in(key(test_seed), TEST_STREAM), (test_size, M))``.

        Generated in chunks of ``local_batch_size`` examples (the training
        batch's compiled function is reused); the result does not depend on
        the chunk size.
        """
        src = self._src("test")
        size = self._test_size()
        chunk = self.local_batch_size
        parts = []
        with jax.default_device(self._device):
            words = jax.random.bits(self._test_key, (size, self._num_words), jnp.uint32)
            words = jnp.concatenate([words, jnp.zeros((-size % chunk, self._num_words), jnp.uint32)])
            for first in range(0, size, chunk):
                out = self._generate(src, words[first:first + chunk], jnp.int32(first), jnp.bool_(False))
                if not with_params:
                    out.pop("params")
                parts.append(jax.tree.map(np.asarray, out))
        return jax.tree.map(lambda *xs: np.concatenate(xs)[:size], *parts)

    def test_fingerprint(self) -> str:
        """Short hash of everything that determines the test set (options, seed, size, source digits, version)."""
        images, labels = self.source_arrays("test")
        content = {k: v for k, v in self.params.items() if k not in NO_CONTENT}
        # The digest is of the digits in test-set order, so it also covers a class-balanced subset's order.
        content.update(version=GENERATOR_VERSION, source=array_digest({"images": images, "labels": labels}))
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def test_cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"mnist_{self.task}_test_{self.test_fingerprint()}.npz"

    def test_set(self) -> dict[str, np.ndarray]:
        """The whole fixed test set as NumPy arrays (``image``, ``label``, [``box``, ``ink_box``]).

        Generated once from ``config.data.test_seed`` and cached under
        ``cache_dir`` (``.npz`` plus a ``.json`` holding its SHA-256, verified
        on every load; a mismatch raises). The digest is logged and kept in
        ``self.test_checksum``.
        """
        if self._test is not None:
            return self._test
        path = self.test_cache_path()
        if path is not None and path.exists():
            arrays = self._read_cache(path)
        else:
            arrays = self.generate_test_set()
            self.test_checksum = array_digest(arrays)
            if path is not None:
                self._write_cache(path, arrays)
        log.info("test set %s: %d examples, sha256 %s%s", self.task, len(arrays["label"]), self.test_checksum,
                 f" ({path})" if path else " (not cached)")
        self._test = arrays
        return arrays

    def _meta_path(self, path: Path) -> Path:
        return path.with_suffix(".json")

    def _read_cache(self, path: Path) -> dict[str, np.ndarray]:
        meta_path = self._meta_path(path)
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError(f"cached test set {path} (or {meta_path}) is unreadable ({e}); delete both "
                               f"files to regenerate it") from e
        digest = array_digest(arrays)
        if digest != meta.get("sha256"):
            raise RuntimeError(f"cached test set {path} has SHA-256 {digest} but {meta_path} records "
                               f"{meta.get('sha256')}: the file was changed or is corrupt; delete both files "
                               f"to regenerate it")
        self.test_checksum = digest
        return arrays

    def _write_cache(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"sha256": self.test_checksum, "task": self.task, "examples": int(len(arrays["label"])),
                "generator_version": GENERATOR_VERSION,
                "params": {k: v for k, v in self.params.items() if k not in NO_CONTENT}}
        # Write to temporary files, then rename: concurrent processes never see a partial file.
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        atomic_write(self._meta_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))

    @property
    def test_size(self) -> int:
        """Examples in the fixed test set."""
        return self._test_size()

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The test examples at ``indices`` (``image``, ``label``, and the task's extras)."""
        return {k: v[np.asarray(indices)] for k, v in self.test_set().items()}

    def __repr__(self) -> str:
        return (f"MnistDataset(task={self.task!r}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"local_batch_size={self.local_batch_size}, process={self.process_index}/{self.process_count})")
