"""Co-localisation's data (paper Appendix A.2): the data task ``coloc_set``, a fixed set of images of one class.

``coloc_set`` (`ColocSet`): a FIXED set of ``test_size`` co-localisation images (the
``coloc`` task's images, `stn_jax.paper.data.mnist_tasks`: one digit class, 84x84, T or
TC) that training batches are drawn from and that evaluation scores (transductive, as in
the paper: "each run ... generates 100 distorted images"). Batches carry the
``box``/``ink_box`` of the digit (``(x0, y0, x1, y1)``, normalised [-1, 1] coordinates) and
``rand`` ``(3,)``: three uniform [0, 1) numbers per image (a function of (seed, step)) that
place a random patch in it (`stn_jax.paper.coloc.patch_theta`). Registered on import
(`stn_jax.paper.data` imports this module after the ``coloc`` task's).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
from stn_jax.paper.data.pipeline import MnistDataset
from stn_jax.paper.data.tasks import TASKS, DataTask, register

RAND_STREAM = 0x524E  # "RN": separates the random patches' stream from the batch indices'
TRAIN_TAG, TEST_TAG = 0x4354, 0x4345


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words])))


def _uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)


class ColocSet:
    """``test_size`` fixed co-localisation images: the training pool and the test set (`stn_jax.paper.data` interface).

    The images are the ``coloc`` task's fixed test set (`MnistDataset.test_set`:
    test-split digits of ``digit_class``, from ``test_seed``, cached under
    ``cache_dir``), ``test_size`` of them. Training batch of step ``s``: ``batch_size``
    of them without replacement (with replacement when the batch is larger than the
    set), in a random order, plus ``rand``; both from ``(seed, step)``, so a
    resumed run sees what an uninterrupted one would. The test set: all of them, in
    order, with ``rand`` fixed by ``test_seed``.
    """

    def __init__(self, params: dict[str, Any], *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir=None):
        self.params = dict(params)
        inner = dict(self.params, task="coloc")
        self.inner = MnistDataset(inner, MNIST_TASKS["coloc"], seed=seed, global_batch_size=global_batch_size,
                                  process_index=process_index, process_count=process_count, cache_dir=cache_dir)
        self.task = "coloc"  # the images are the coloc task's (experiments.show_data draws their boxes)
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.inner.local_batch_size
        self.image_shape, self.num_classes = self.inner.image_shape, self.inner.num_classes
        self.element_spec = dict(self.inner.element_spec, rand=jax.ShapeDtypeStruct((3,), jnp.float32))
        self.batch_spec = {k: jax.ShapeDtypeStruct((self.local_batch_size,) + v.shape, v.dtype)
                           for k, v in self.element_spec.items()}
        self._set: dict[str, np.ndarray] | None = None

    def image_set(self) -> dict[str, np.ndarray]:
        """The fixed images with their ``rand`` for evaluation."""
        if self._set is None:
            arrays = dict(self.inner.test_set())
            arrays["rand"] = _uniforms(_rng(self.params["test_seed"], RAND_STREAM, TEST_TAG), len(arrays["label"]))
            self._set = arrays
        return self._set

    @property
    def test_size(self) -> int:
        return self.inner.test_size

    @property
    def test_checksum(self) -> str | None:
        return self.inner.test_checksum

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(indices)] for k, v in self.image_set().items()}

    def test_set(self) -> dict[str, np.ndarray]:
        return self.image_set()

    def generate_test_set(self, with_params: bool = False) -> dict[str, np.ndarray]:
        """The fixed images (``with_params``: with their generation parameters; `experiments.show_data`)."""
        out = dict(self.inner.generate_test_set(with_params=with_params))
        out["rand"] = self.image_set()["rand"][:len(out["label"])]
        return out

    def train_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch of ``step``: indices into the set ``(B,)`` and ``rand`` ``(B, 3)``."""
        n, b = self.test_size, self.global_batch_size
        rng = _rng(self.seed, RAND_STREAM, TRAIN_TAG, step)
        idx = rng.permutation(n)[:b] if b <= n else rng.integers(0, n, b)
        return idx, _uniforms(rng, b)

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        step = int(step)
        if step < 0 or step >= 2 ** 32:
            raise ValueError(f"step must be in [0, 2**32), got {step}")
        idx, rand = self.train_indices(step)
        rows = slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
        out = {k: v for k, v in self.test_examples(idx[rows]).items()}
        out["rand"] = rand[rows]
        if with_params:
            out["params"] = {"index": idx[rows]}
        return out

    def __repr__(self) -> str:
        return (f"ColocSet(test_size={self.test_size}, digit_class={self.params['digit_class']}, "
                f"num_clutter={self.params['num_clutter']}, local_batch_size={self.local_batch_size})")


def _set_problems(p) -> list[str]:
    coloc = TASKS.get("coloc")
    problems = coloc.validate(dict(p, task="coloc"))
    if not problems and p["test_size"] != -1 and p["test_size"] < 2:
        problems.append(f"test_size (the number of images) must be at least 2: the loss compares pairs; got "
                        f"{p['test_size']}")
    return problems


# The ``coloc`` task's options, with one class and 100 images by default.
_DEFAULTS = dict(TASKS.get("coloc").defaults,
                 digit_class=8,  # [P] one class per run (Fig. 4 shows the 8s)
                 test_size=100)  # [P] 100 images per run (fewer if the class has fewer test digits; -1 = all)

register(DataTask("coloc_set", "Co-localisation (fixed set)", _DEFAULTS, lambda params, **kw: ColocSet(params, **kw),
                  _set_problems, "coloc_set"))
