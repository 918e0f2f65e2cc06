"""Co-localisation without labels (paper Appendix A.2): the fixed image set, the triplet objective, IoU, the encoder.

Everything here is registered on import (`stn_jax.paper.models.coloc` imports
this module, and `stn_jax.paper.models` imports that one), so configs name:

* data task ``coloc_set`` (`ColocSet`): a FIXED set of ``test_size`` co-localisation
  images (the ``coloc`` task's images: one digit class, 84x84, T or TC) that
  training batches are drawn from and that evaluation scores (transductive, as in
  the paper: "each run ... generates 100 distorted images"). Batches carry the
  ``box``/``ink_box`` of the digit and ``rand``, three uniform [0, 1) numbers per image
  (a function of (seed, step)) that place a random patch in it (`patch_theta`).
* objective ``triplet`` (`Triplet`): the paper's hinge loss
  ``sum_n sum_{m != n} max(0, |e(I_n^T) - e(I_m^T)|^2 - |e(I_n^T) - e(I_n^rand)|^2 + alpha)``
  over the pairs of a batch; metrics ``localised`` (IoU > 0.5) and ``mean_iou``.
* `iou`, `theta_to_box`: boxes ``(x0, y0, x1, y1)`` in normalised [-1, 1] image
  coordinates (outer pixel edges, ``align_corners=False``).
* The encoder ``e``: the distorted-MNIST CNN (`stn_jax.paper.models.mnist` ``cnn``)
  taken from a training run of ours (`load_encoder`), or trained first and cached
  (`ensure_encoder`). docs/coloc.md describes the method and every assumption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stn_jax.paper.data.tasks import TASKS, DataTask, register as register_task
from stn_jax.paper.objectives import Objective, register as register_objective, theta_stats

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# Boxes.
# ----------------------------------------------------------------------------


def theta_to_box(theta: jax.Array) -> jax.Array:
    """Attention parameters ``(..., 3)`` = ``(s, t_x, t_y)`` -> the crop's box ``(..., 4)`` = ``(x0, y0, x1, y1)``.

    With ``align_corners=False`` the output grid's outer edges (+-1) map to ``t +- s``,
    so the crop covers exactly ``[t_x - s, t_x + s] x [t_y - s, t_y + s]`` of the input
    (normalised coordinates). A negative ``s`` (a mirrored crop) gives the same box.
    """
    s, tx, ty = theta[..., 0], theta[..., 1], theta[..., 2]
    s = jnp.abs(s)
    return jnp.stack([tx - s, ty - s, tx + s, ty + s], -1)


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of boxes ``(..., 4)`` = ``(x0, y0, x1, y1)`` (0 for disjoint or empty boxes)."""
    ix = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    iy = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = ix * iy
    area = lambda c: jnp.clip(c[..., 2] - c[..., 0], 0.0) * jnp.clip(c[..., 3] - c[..., 1], 0.0)
    union = area(a) + area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------
# The objective.
# ----------------------------------------------------------------------------


def patch_theta(u: jax.Array, scale: jax.Array) -> jax.Array:
    """Attention parameters ``(B, 3)`` of square patches of half-side ``scale`` ``(B,)`` inside the image.

    ``u`` ``(B, 3)`` uniform in [0, 1): the centre is ``t = (2 u[:, 1:] - 1) (1 - s)`` per axis
    (uniform over the positions that keep the patch inside; centred when ``s >= 1``).
    """
    s = jnp.abs(scale)
    room = jnp.clip(1.0 - s, 0.0)[:, None]
    return jnp.concatenate([s[:, None], (2.0 * u[:, 1:] - 1.0) * room], 1)


def triplet_terms(desc_t: jax.Array, desc_rand: jax.Array, alpha: float, num_pairs: int = 0,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-image hinge sums and pair counts of the triplet loss.

    ``desc_t`` ``(B, D)`` the crops' descriptors e(I_n^T), ``desc_rand`` ``(B, D)`` the
    random patches' e(I_n^rand). Pairs: ``num_pairs = 0``: every ``m != n`` of the batch;
    ``k > 0``: ``m = n + 1, ..., n + k`` (mod B; the batch is a random draw, so these are
    random pairs). ``weights`` ``(B,)`` (e.g. the eval mask) weight image n's pairs by
    ``w_n w_m``. Returns ``(hinge (B,), pairs (B,))``: image n's summed hinge and its
    (weighted) number of pairs.
    """
    b = desc_t.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    d_rand = jnp.sum((desc_t - desc_rand) ** 2, -1)                       # (B,)
    if num_pairs <= 0 or num_pairs >= b - 1:
        sq = jnp.sum(desc_t ** 2, -1)
        d_pair = sq[:, None] + sq[None, :] - 2.0 * desc_t @ desc_t.T         # (B, B)
        d_pair = jnp.maximum(d_pair, 0.0)
        pair_w = w[:, None] * w[None, :] * (1.0 - jnp.eye(b, dtype=jnp.float32))
    else:
        shifts = range(1, num_pairs + 1)
        d_pair = jnp.stack([jnp.sum((desc_t - jnp.roll(desc_t, -k, 0)) ** 2, -1) for k in shifts], 1)
        pair_w = jnp.stack([w * jnp.roll(w, -k) for k in shifts], 1)       # (B, K)
    hinge = jnp.maximum(0.0, d_pair - d_rand[:, None] + alpha) * pair_w
    return hinge.sum(1), pair_w.sum(1)


@register_objective
class Triplet(Objective):
    """Co-localisation's triplet hinge loss (paper A.2); no labels are read.

    The model (``coloc_st``, `stn_jax.paper.models.coloc`) maps images to the
    descriptors of their crops, ``model(x, return_aux=True)`` also gives the
    attention parameters; ``model.describe_patches(x, theta)`` encodes other
    patches of the same images. ``batch["rand"]`` ``(B, 3)`` are the random
    patches' uniforms (drawn by the data set from (seed, step)); `patch_theta` places them.

    Loss = the mean over the batch's pairs (n, m) of the hinge (the paper's double
    sum divided by the number of pairs: a constant factor, i.e. the learning rate).
    Options: ``alpha`` (margin, paper 1.0); ``patch_scale``: the random patch's size,
    ``"crop"`` (the same size as image n's predicted crop, at a random place inside the
    image) or ``"range"`` (``s ~ U[patch_min_scale, patch_max_scale]``) [U]; ``num_pairs`` (0: every m != n of the
    batch; k: k rolled partners per image), ``iou_threshold`` (paper 0.5),
    ``box`` (``"box"``: the digit's 28x28 frame, the paper's box; or ``"ink_box"``),
    ``normalize`` (divide every descriptor by its L2 norm first [U]: the paper does not say;
    without it the loss's minimum is an empty crop, docs/coloc.md).
    Eval metrics: ``localised`` (fraction with IoU > threshold), ``mean_iou``, ``loss``,
    ``scale`` (mean predicted s), ``centre_error_px`` (mean distance in pixels between the
    crop's centre and the box's: how well the object is found whatever the box size) and
    ``centred`` (a diagnostic that is told the true box's size: the fraction whose box of that
    size at the predicted centre has IoU > threshold).
    """

    name = "triplet"
    headline = "localised"
    scores_labels = False  # it reads boxes and random patches
    defaults = {"alpha": 1.0, "patch_scale": "crop", "patch_min_scale": 0.25, "patch_max_scale": 0.5,
                "normalize": True, "num_pairs": 0, "iou_threshold": 0.5, "box": "box"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options["box"] not in ("box", "ink_box"):
            raise ValueError(f"objective triplet: box must be 'box' or 'ink_box', got {self.options['box']!r}")
        if self.options["patch_scale"] not in ("crop", "range"):
            raise ValueError(f"objective triplet: patch_scale must be 'crop' or 'range', got "
                             f"{self.options['patch_scale']!r}")
        if not 0 < self.options["patch_min_scale"] <= self.options["patch_max_scale"]:
            raise ValueError("objective triplet: need 0 < patch_min_scale <= patch_max_scale")

    def _terms(self, model, batch, weights=None):
        desc_t, aux = model(batch["image"], return_aux=True)
        theta = aux["theta"][0]
        u = batch["rand"]
        if self.options["patch_scale"] == "crop":
            scale = jax.lax.stop_gradient(theta[:, 0])
        else:
            lo, hi = float(self.options["patch_min_scale"]), float(self.options["patch_max_scale"])
            scale = lo + (hi - lo) * u[:, 0]
        desc_rand = jax.lax.stop_gradient(model.describe_patches(batch["image"], patch_theta(u, scale)))
        if self.options["normalize"]:
            unit = lambda d: d / jnp.sqrt(jnp.sum(d ** 2, -1, keepdims=True) + 1e-12)
            desc_t, desc_rand = unit(desc_t), unit(desc_rand)
        hinge, pairs = triplet_terms(desc_t, desc_rand, float(self.options["alpha"]), int(self.options["num_pairs"]),
                                     weights)
        overlap = iou(theta_to_box(theta), batch[self.options["box"]])
        return hinge, pairs, overlap, theta, aux

    def loss(self, model, batch):
        hinge, pairs, overlap, theta, aux = self._terms(model, batch)
        loss = hinge.sum() / jnp.maximum(pairs.sum(), 1.0)
        localised = (overlap > self.options["iou_threshold"]).mean()
        return loss, dict(localised=localised, mean_iou=overlap.mean(), identity_penalty=aux["identity_penalty"],
                          **theta_stats(aux["theta"]))

    def eval_sums(self, model, batch):
        mask = batch["mask"].astype(jnp.float32)
        hinge, pairs, overlap, theta, _ = self._terms(model, batch, mask)
        good = (overlap > self.options["iou_threshold"]).astype(jnp.float32)
        box = batch[self.options["box"]]
        centre = jnp.stack([box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]], -1) / 2
        size = batch["image"].shape[-2]  # pixels per 2 normalised units (square images)
        off = jnp.sqrt(jnp.sum((theta[:, 1:] - centre) ** 2, -1)) * size / 2
        # Diagnostic, told the true box's size: a box of that size at the predicted centre.
        half = jnp.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], -1) / 2
        at_centre = jnp.concatenate([theta[:, 1:] - half, theta[:, 1:] + half], -1)
        centred = (iou(at_centre, box) > self.options["iou_threshold"]).astype(jnp.float32)
        return dict(hinge=hinge.sum(), pairs=pairs.sum(), localised=(good * mask).sum(),
                    iou=(overlap * mask).sum(), scale=(jnp.abs(theta[:, 0]) * mask).sum(),
                    centre_error=(off * mask).sum(), centred=(centred * mask).sum(), count=mask.sum())

    def summarize(self, sums):
        count = max(sums["count"], 1.0)
        return {"localised": sums["localised"] / count, "mean_iou": sums["iou"] / count,
                "loss": sums["hinge"] / max(sums["pairs"], 1.0), "scale": sums["scale"] / count,
                "centre_error_px": sums["centre_error"] / count, "centred": sums["centred"] / count}

    def result_line(self, result: Mapping[str, float]) -> str:
        """What `experiments.train` / `experiments.evaluate` print for this objective."""
        return f"localised={result['localised']!r} mean_iou={result['mean_iou']!r}"


# ----------------------------------------------------------------------------
# The data: a fixed set of co-localisation images.
# ----------------------------------------------------------------------------

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
        from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
        from stn_jax.paper.data.pipeline import MnistDataset

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


def _register_set_task() -> None:
    coloc = TASKS.get("coloc")
    defaults = dict(coloc.defaults)
    defaults["digit_class"] = 8  # [P] one class per run (Fig. 4 shows the 8s)
    defaults["test_size"] = 100  # [P] 100 images per run (fewer if the class has fewer test digits; -1 = all)
    register_task(DataTask("coloc_set", "Co-localisation (fixed set)", defaults,
                           lambda params, **kw: ColocSet(params, **kw), _set_problems, "coloc_set"))


if "coloc_set" not in TASKS:
    _register_set_task()


# ----------------------------------------------------------------------------
# The encoder: a distorted-MNIST CNN of ours.
# ----------------------------------------------------------------------------

ENCODER_DEFAULTS = {
    "task": "r",         # [U] R (rotated MNIST, 28x28), paper Sect. 4.1's CNN; the paper does not say which data
    "model": "cnn",
    "steps": 600,        # [U] a short run: minutes on 2 CPU cores
    "batch_size": 64,    # [U]
    "learning_rate": 0.01,
    "seed": 0,
    "test_size": 2000,
    "width": None,       # None: the cnn model's width from its 400k parameter budget (89 filters on 28x28)
    "max_angle": None,   # None: the task's (R: 90 degrees); 0 = upright digits (plain MNIST in a 28x28 frame)
}


def encoder_config(source: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The training config of the automatic encoder (a ``configs/distorted_mnist.py:r,cnn``-like run)."""
    e = {**ENCODER_DEFAULTS, **overrides}
    steps = int(e["steps"])
    return ml_collections.ConfigDict({
        "seed": int(e["seed"]), "batch_size": int(e["batch_size"]), "total_steps": steps,
        "log_every": max(steps // 10, 1), "eval_every": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
        "eval_batch_size": 500,
        "optimizer": {"learning_rate": float(e["learning_rate"]), "decay_boundaries": (), "decay_factor": 0.1,
                      "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "loc_lr_multiplier": 1.0},
        "objective": {"name": "classification"},
        "model": {"name": e["model"], "transform": "",
                  "options": {} if e["width"] is None else {"width": int(e["width"])}},
        "data": {"task": e["task"], "source": source, "test_size": int(e["test_size"]),
                 **({} if e["max_angle"] is None else {"max_angle": float(e["max_angle"])})},
    })


def default_cache_dir() -> Path:
    return Path(os.environ.get("STN_JAX_CACHE") or "~/.cache/stn_jax").expanduser()


def encoder_workdir(config: ml_collections.ConfigDict, cache_dir: str | os.PathLike | None) -> Path:
    """``<cache_dir>/coloc_encoder_<fingerprint>``: the fingerprint hashes the encoder's config (source included)."""
    content = json.loads(config.to_json())
    content["data"]["source"] = str(Path(content["data"]["source"]).expanduser().absolute()) \
        if content["data"]["source"] != "tfds" else "tfds"
    fp = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()).expanduser().absolute() / f"coloc_encoder_{fp}"


def _finished(workdir: Path, steps: int) -> bool:
    ckpt = workdir / "checkpoints"
    return ckpt.is_dir() and any(p.name == str(steps) for p in ckpt.iterdir())


def ensure_encoder(source: str, cache_dir: str | os.PathLike | None = None, **overrides: Any) -> Path:
    """The workdir of the automatic encoder: trained now (and cached) unless a finished one is cached."""
    config = encoder_config(source, **overrides)
    workdir = encoder_workdir(config, cache_dir)
    if _finished(workdir, config.total_steps):
        log.info("co-localisation encoder: using the cached run %s", workdir)
        return workdir
    from stn_jax.paper.train import train_and_evaluate

    log.info("co-localisation encoder: none given (model.options.encoder), training %s on %s for %d steps "
             "into the cache %s", config.model.name, config.data.task, config.total_steps, workdir)
    result = train_and_evaluate(config, workdir)
    log.info("co-localisation encoder: done, test error %.4f (%s)", result["error"], workdir)
    return workdir


def load_encoder(workdir: str | os.PathLike) -> dict[str, Any]:
    """The CNN weights of a distorted-MNIST run (newest checkpoint) as NumPy arrays.

    Returns ``{"conv1": (kernel, bias), "conv2": ..., "out": ..., "input_shape": (H, W, C),
    "workdir": str, "step": int, "model": str}``. The run's last layer must be the
    `CNNClassifier` (models ``cnn`` or ``st_cnn``; its input is what the encoder takes).
    """
    import orbax.checkpoint as ocp

    from stn_jax.paper.config import resolve
    from stn_jax.paper.models.classifiers import CNNClassifier
    from stn_jax.paper.train_state import build

    workdir = Path(workdir).expanduser().absolute()
    config_path = workdir / "config.json"
    if not config_path.is_file() or not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"model.options.encoder: {workdir} is not a training run's workdir (it needs "
                                f"config.json and checkpoints/); train one with configs/distorted_mnist.py:r,cnn, "
                                f"or leave encoder empty to train one automatically")
    config = resolve(ml_collections.ConfigDict(json.loads(config_path.read_text())))
    from stn_jax.paper.data.mnist_tasks import MNIST_TASKS

    task = MNIST_TASKS.get(config.data.task)
    if task is None:
        raise ValueError(f"model.options.encoder: {workdir} trained on {config.data.task!r}, not an MNIST task")
    options = dict(TASKS.get(config.data.task).defaults, **config.data.to_dict())
    setup = build(config, task.image_shape(options), task.num_classes)
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"model.options.encoder: no checkpoint in {workdir / 'checkpoints'}")
    state = manager.restore(step, args=ocp.args.StandardRestore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.state)))
    model = setup.merge(state.params, state.model_state, train=False)
    head = model.layers[-1]
    if not isinstance(head, CNNClassifier):
        raise ValueError(f"model.options.encoder: {workdir} holds model {config.model.name!r}; the encoder must be "
                         f"the CNN (cnn or st_cnn)")
    get = lambda layer: (np.asarray(layer.kernel.get_value()), np.asarray(layer.bias.get_value()))
    return {"conv1": get(head.conv1), "conv2": get(head.conv2), "out": get(head.out),
            "input_shape": tuple(head.input_shape), "workdir": str(workdir), "step": int(step),
            "model": config.model.name, "task": config.data.task}
