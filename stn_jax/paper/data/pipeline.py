"""The MNIST-family data sets: deterministic, sharded, on-the-fly distorted batches and fixed test sets.

``make_dataset(config.data, seed=..., global_batch_size=...)`` returns an
`MnistDataset`. Its design:

* **Sources.** The MNIST split is read once per process (`stn_jax.data.mnist`),
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
  bit-identical to the global batch; the speed is the same here). It runs on
  the CPU by default (``generator_device``), so accelerators stay free and
  every machine produces the same bits; the next training batch is
  dispatched asynchronously while the current one is used (``prefetch``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stn_jax._native import use_cpu_sampler
from stn_jax.data import distortions as D
from stn_jax.data.mnist import load_mnist

log = logging.getLogger(__name__)

TASKS = ("r", "rts", "p", "e", "tc", "addition", "mnist3d", "coloc")
TRAIN_STREAM = 0x5452  # "TR": fold-in tags that separate the data's random streams from the trainer's
TEST_STREAM = 0x5445  # "TE"
# Bump when a change to the generators changes the data (invalidates cached test sets).
GENERATOR_VERSION = 1
# Options that do not change the generated data (the source's content enters the test-set fingerprint
# through its digest; generator_device is assumed not to change the bits, which holds for the default "cpu").
_NO_CONTENT = ("source", "tfds_data_dir", "tfds_manual_dir", "cache_dir", "generator_device", "prefetch")


def default_config(task: str) -> ml_collections.ConfigDict:
    """The data section for ``task``: every parameter, with the digest's values (tags in comments).

    Tags (../shared/reference/paper.md): [P] the paper, [S] second-hand
    report of the appendix ("to verify"), [R] independent generators agree,
    [U] our assumption (the paper does not say).
    """
    if task not in TASKS:
        raise ValueError(f"unknown data task {task!r}; choose one of {', '.join(TASKS)}")
    c = ml_collections.ConfigDict()
    c.task = task
    c.source = "tfds"          # "tfds" or a folder with the four MNIST IDX files (offline: ../shared/data/mnist)
    c.tfds_data_dir = ""       # "" = tfds' default (~/tensorflow_datasets)
    c.tfds_manual_dir = ""     # folder with the four original .gz files: tfds prepares from them, offline
    c.cache_dir = ""           # fixed test sets are cached here; "" = the trainer's <workdir>/data
    c.test_seed = 2015         # [U] fixed, independent of the training seed: the same test set for every model
    c.test_size = 10_000       # one distorted copy per MNIST test digit [U], at most the split; -1 = the whole split
    c.generator_device = "cpu"  # "cpu" (same bits on every machine) or "default" (the default JAX device)
    c.prefetch = True          # dispatch the next training batch while the current one is used

    if task == "r":
        c.canvas_size = 28     # [U] not stated (28 or 42); 28 = the MNIST frame
        c.max_angle = 90.0     # [S, quoted verbatim in a GitHub issue] rotation U[-90, 90] degrees
    elif task in ("rts", "addition"):
        c.canvas_size = 42     # [S][R] 42x42
        c.max_angle = 45.0     # [S][R] rotation U[-45, 45] degrees
        c.min_scale = 0.7      # [S][R] scale U[0.7, 1.2]
        c.max_scale = 1.2
        c.keep_inside = True   # [U] position uniform among those keeping the digit's (transformed) ink box inside
    elif task == "p":
        c.canvas_size = 28     # [U] not stated
        c.min_scale = 0.75     # [S: 'to verify'; independent MATLAB generator] scale U[0.75, 1.0]
        c.max_scale = 1.0
        c.corner_sigma = 5.0   # [S: 'to verify'] each of the 4 corners moved by N(0, 5 px)
    elif task == "e":
        c.canvas_size = 28     # [U] not stated
        c.min_scale = 0.75     # [U: our recollection] scale U[0.75, 1.0]
        c.max_scale = 1.0
        c.tps_grid_size = 4    # [U] 16 control points [S] on a regular 4x4 grid [U]
        c.tps_sigma = 1.5      # [S] control points moved by N(0, 1.5 px)
    elif task == "tc":
        c.canvas_size = 60     # [S][R] 60x60
        c.num_clutter = 6      # [S][R] six patches
        c.clutter_size = 6     # [S][R] 6x6, cut from random training digits
    elif task == "mnist3d":
        c.volume_size = 60     # [P] 60x60x60 voxels
        c.extrude_depth = 12   # [U] depth of the extruded digit, in voxels
        c.rotate_3d = False    # [U] one secondary summary says the digit is also rotated in 3-D; off by default
        c.max_angle_3d = 45.0  # [U] Euler angles U[-a, a] when rotate_3d
        c.test_size = 1_000    # [U] 1,000 volumes (864 MB as float32); 10,000 would need 8.6 GB
    elif task == "coloc":
        c.canvas_size = 84     # [P] 84x84
        c.num_clutter = 0      # [P] 0 for the "T" data; 16 for "TC"
        c.clutter_size = 6     # [P] 6x6 crops of training digits
        c.digit_class = -1     # [P] each run uses one class (0-9); -1 = all classes
    return c


def _all_task_keys() -> set[str]:
    return {k for t in TASKS for k in default_config(t).keys()}


def _resolve(config_data) -> dict[str, Any]:
    """Defaults of the task overlaid with ``config_data``; a key of another task is an error."""
    given = config_data.to_dict() if hasattr(config_data, "to_dict") else dict(config_data)
    task = given.get("task")
    if task not in TASKS:
        raise ValueError(f"config.data.task must be one of {', '.join(TASKS)}, got {task!r}")
    params = default_config(task).to_dict()
    foreign = _all_task_keys() - set(params)
    for key, value in given.items():
        if key in params:
            params[key] = value
        elif key in foreign:
            raise ValueError(f"config.data.{key} does not apply to task {task!r}; its options are "
                             f"{', '.join(sorted(params))}")
        else:
            log.debug("config.data.%s is not a data-pipeline option; ignored", key)
    _validate(params)
    return params


def _validate(p: dict[str, Any]) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(f"config.data (task {p['task']!r}): {message}")

    if "canvas_size" in p:
        low = D.DIGIT if p["task"] in ("tc", "coloc") else 1
        need(int(p["canvas_size"]) >= low, f"canvas_size must be >= {low}, got {p['canvas_size']}")
    if "min_scale" in p:
        need(0 < p["min_scale"] <= p["max_scale"], f"need 0 < min_scale <= max_scale, got "
                                                   f"{p['min_scale']}, {p['max_scale']}")
    if "clutter_size" in p:
        need(1 <= p["clutter_size"] <= min(D.DIGIT, p["canvas_size"]),
             f"clutter_size must be in [1, {min(D.DIGIT, p['canvas_size'])}], got {p['clutter_size']}")
        need(p["num_clutter"] >= 0, f"num_clutter must be >= 0, got {p['num_clutter']}")
    if p["task"] == "mnist3d":
        need(p["volume_size"] >= D.DIGIT, f"volume_size must be >= {D.DIGIT}, got {p['volume_size']}")
        need(1 <= p["extrude_depth"] <= p["volume_size"],
             f"extrude_depth must be in [1, volume_size], got {p['extrude_depth']}")
    if p["task"] == "coloc":
        need(-1 <= p["digit_class"] <= 9, f"digit_class must be -1 (all) or 0-9, got {p['digit_class']}")
    need(p["test_size"] == -1 or p["test_size"] >= 1, f"test_size must be -1 or >= 1, got {p['test_size']}")
    need(p["generator_device"] in ("cpu", "default"),
         f"generator_device must be 'cpu' or 'default', got {p['generator_device']!r}")


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


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------
# One example per task.
# ----------------------------------------------------------------------------


def num_words(p: dict[str, Any]) -> int:
    """Random uint32 words per example: one for the source digit's index, the rest for the distortion."""
    return 1 + D.words_needed(p["task"], num_clutter=p.get("num_clutter", 0),
                              tps_grid_size=p.get("tps_grid_size", 4))


def _example_fn(p: dict[str, Any]) -> Callable:
    """``fn(draws, index, src) -> dict`` making the example of source digit ``index``.

    ``src`` holds ``images`` uint8 (N, 28, 28), ``labels`` int32 (N,) and ``ink``
    float32 (N, 4). Outputs: ``image``, ``label`` (and ``box``, ``ink_box`` for
    co-localisation) plus ``params`` (the drawn distortion parameters).
    """
    task = p["task"]

    def digit(src, i):
        return src["images"][i].astype(jnp.float32) / 255.0

    def fn(r, index, src):
        label = src["labels"][index]
        extra = {}
        if task == "r":
            image, params = D.rotated(r, digit(src, index), canvas_size=p["canvas_size"], max_angle=p["max_angle"])
        elif task == "rts":
            image, params = D.rts(r, digit(src, index), src["ink"][index], **_rts_options(p))
        elif task == "p":
            image, params = D.projective(r, digit(src, index), canvas_size=p["canvas_size"],
                                         min_scale=p["min_scale"], max_scale=p["max_scale"],
                                         corner_sigma=p["corner_sigma"])
        elif task == "e":
            image, params = D.elastic(r, digit(src, index), canvas_size=p["canvas_size"],
                                      min_scale=p["min_scale"], max_scale=p["max_scale"],
                                      tps_grid_size=p["tps_grid_size"], tps_sigma=p["tps_sigma"])
        elif task == "tc":
            image, params = D.translated_cluttered(r, digit(src, index), src["images"],
                                                   canvas_size=p["canvas_size"], num_clutter=p["num_clutter"],
                                                   clutter_size=p["clutter_size"])
        elif task == "addition":
            other = r.randint(0, src["images"].shape[0])
            pair = jnp.stack([index, other])
            digits = jnp.stack([digit(src, index), digit(src, other)])
            inks = jnp.stack([src["ink"][index], src["ink"][other]])
            image, params = D.addition(r, digits, inks, **_rts_options(p))
            params["labels"] = src["labels"][pair]
            label = params["labels"].sum()
        elif task == "mnist3d":
            image, params = D.volume(r, digit(src, index), src["ink"][index], volume_size=p["volume_size"],
                                     extrude_depth=p["extrude_depth"], rotate_3d=bool(p["rotate_3d"]),
                                     max_angle_3d=p["max_angle_3d"])
        elif task == "coloc":
            image, params = D.colocalisation(r, digit(src, index), src["ink"][index], src["images"],
                                             canvas_size=p["canvas_size"], num_clutter=p["num_clutter"],
                                             clutter_size=p["clutter_size"])
            extra = {"box": params.pop("box"), "ink_box": params.pop("ink_box")}
        else:  # pragma: no cover - _resolve rejects unknown tasks
            raise ValueError(task)
        params["index"] = index
        return {"image": image.astype(jnp.float32), "label": label.astype(jnp.int32), **extra, "params": params}

    return fn


@functools.lru_cache(maxsize=32)
def _generator(frozen_params: tuple) -> Callable:
    """The jitted batch generator for these options, shared by every data set with the same options
    (so the XLA compilation happens once per process and batch shape).

    ``gen(src, words, first, random_index) -> dict``: examples ``first + arange(len(words))``;
    row ``j`` of ``words`` is example ``first + j``'s randomness. ``random_index``
    (traced bool): draw the source digit from the first word (training) or use
    digit ``first + j`` (test set). The drawn parameters are always returned
    (under ``params``; they are small) so that one compiled function serves all uses.
    """
    example = _example_fn(dict(frozen_params))

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

    return jax.jit(generate)


def _content_params(p: dict[str, Any]) -> tuple:
    """The options that determine what is generated, hashable."""
    return tuple(sorted((k, v) for k, v in p.items() if k not in _NO_CONTENT + ("test_seed", "test_size")))


def _rts_options(p):
    return dict(canvas_size=p["canvas_size"], max_angle=p["max_angle"], min_scale=p["min_scale"],
                max_scale=p["max_scale"], keep_inside=bool(p["keep_inside"]))


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

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self.params = _resolve(config_data)
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
        cache = cache_dir or self.params["cache_dir"] or None
        self.cache_dir = Path(cache).expanduser() if cache else None
        p = self.params
        if self.task == "mnist3d":
            n = p["volume_size"]
            self.image_shape = (n, n, n, 1)
        else:
            n = p["canvas_size"]
            self.image_shape = (n, n, 2 if self.task == "addition" else 1)
        self.num_classes = 19 if self.task == "addition" else 10
        spec = {"image": jax.ShapeDtypeStruct(self.image_shape, jnp.float32),
                "label": jax.ShapeDtypeStruct((), jnp.int32)}
        if self.task == "coloc":
            spec["box"] = jax.ShapeDtypeStruct((4,), jnp.float32)
            spec["ink_box"] = jax.ShapeDtypeStruct((4,), jnp.float32)
        self.element_spec = spec
        self.batch_spec = {k: jax.ShapeDtypeStruct((self.local_batch_size,) + v.shape, v.dtype)
                           for k, v in spec.items()}
        self._device = jax.local_devices(backend="cpu")[0] if p["generator_device"] == "cpu" else jax.local_devices()[0]
        self._sources: dict[str, dict[str, jax.Array]] = {}
        self._num_words = num_words(p)
        self._generate = _generator(_content_params(p))
        self._pending: tuple[int, dict] | None = None
        self._test: dict[str, np.ndarray] | None = None
        self.test_checksum: str | None = None
        with jax.default_device(self._device):
            self._train_key = jax.random.fold_in(jax.random.key(self.seed), TRAIN_STREAM)
            self._test_key = jax.random.fold_in(jax.random.key(int(p["test_seed"])), TEST_STREAM)

    # -- sources -----------------------------------------------------------

    def source_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The canonical-order ``(images uint8 (N, 28, 28), labels int32 (N,))`` this task draws from."""
        p = self.params
        images, labels = _load_split(str(p["source"]), split, str(p["tfds_data_dir"] or ""),
                                     str(p["tfds_manual_dir"] or ""))
        if self.task == "coloc" and p["digit_class"] >= 0:
            keep = labels == p["digit_class"]
            images, labels = images[keep], labels[keep]
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
        content = {k: v for k, v in self.params.items() if k not in _NO_CONTENT}
        content.update(version=GENERATOR_VERSION, source=_digest({"images": images, "labels": labels}))
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
            self.test_checksum = _digest(arrays)
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
        digest = _digest(arrays)
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
                "params": {k: v for k, v in self.params.items() if k not in _NO_CONTENT}}
        # Write to temporary files, then rename: concurrent processes never see a partial file.
        for target, write in ((path, lambda f: np.savez_compressed(f, **arrays)),
                              (self._meta_path(path), lambda f: f.write(json.dumps(meta, indent=1).encode()))):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=target.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def test_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The test set in order, in batches of ``batch_size`` (the last one may be smaller)."""
        test = self.test_set()
        for first in range(0, len(test["label"]), batch_size):
            yield {k: v[first:first + batch_size] for k, v in test.items()}

    def __repr__(self) -> str:
        return (f"MnistDataset(task={self.task!r}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"local_batch_size={self.local_batch_size}, process={self.process_index}/{self.process_count})")


def make_dataset(config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None) -> MnistDataset:
    """The data set ``config_data`` (``config.data``) describes; see `MnistDataset`.

    Args:
      config_data: a ConfigDict or dict with at least ``task``; missing options
        take `default_config(task)`'s values; options of another task are an error.
      seed: training seed (the test set does not depend on it).
      global_batch_size: examples per step over all processes.
      process_index, process_count: this process's shard of every batch.
      cache_dir: where the test set is cached (overrides ``config_data.cache_dir``; None and "" = no cache).
    """
    return MnistDataset(config_data, seed=seed, global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count, cache_dir=cache_dir)
