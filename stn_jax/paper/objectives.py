"""Objectives: what the one training loop optimises and how it scores a model.

A run is "model + data + objective" (``config.objective.name``). An
`Objective` gives the loop:

* ``loss(model, batch) -> (loss, metrics)``: the training loss of a batch (the
  model in training mode) and scalar metrics to log;
* ``eval_sums(model, batch) -> dict``: per-batch sums for evaluation, each
  example weighted by ``batch["mask"]`` (padding examples have mask 0); it
  must include ``"count"``;
* ``summarize(sums) -> dict``: the evaluation metrics from the summed
  ``eval_sums``; the key `headline` is the number a run reports
  (``experiments.evaluate`` prints ``test_<headline>=... test_loss=...``);
* ``pictures``: whether the loop draws the transformers' inputs and outputs;
* ``scores_labels``: whether ``eval_sums`` reads only ``image`` and ``label`` (so
  that a file of your own images and labels, ``config.data.test_npz``, can be scored);
* ``result_line(result)``: the line the command-line tools print.

Classification (softmax cross-entropy, error rate) is the paper's objective
for MNIST and CUB, ``sequence`` for SVHN, ``triplet`` (no labels: boxes found
by co-localisation, Appendix A.2) for the ``coloc_set`` data. Adding one is a
subclass and a `register` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from stn_jax.paper.coloc import iou, patch_theta, theta_to_box, triplet_terms, unit_norm
from stn_jax.paper.registry import Registry

Batch = Mapping[str, jax.Array]


class Objective:
    """Base class; see the module docstring. ``options`` are the config's ``objective`` keys besides ``name``."""

    name: str = ""
    headline: str = "error"
    pictures: bool = True
    scores_labels: bool = True
    defaults: Mapping[str, Any] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for objective {self.name!r}; valid options: "
                             f"{sorted(self.defaults) or 'none'}")
        self.options = {**self.defaults, **options}

    def loss(self, model, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def eval_sums(self, model, batch: Batch) -> dict[str, jax.Array]:
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def result_line(self, result: Mapping[str, float]) -> str:
        """The one line `experiments.train` and `experiments.evaluate` print, e.g. ``test_error=... test_loss=...``."""
        return f"test_{self.headline}={result[self.headline]!r} test_loss={result['loss']!r}"


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES.register(cls.name, cls)
    return cls


def create_objective(config_objective: Any) -> Objective:
    """The objective ``config.objective`` names (a ConfigDict or mapping with ``name`` and its options)."""
    given = config_objective.to_dict() if hasattr(config_objective, "to_dict") else dict(config_objective)
    cls = OBJECTIVES.get(given.pop("name", None))
    return cls(**given)


def theta_stats(thetas) -> dict[str, jax.Array]:
    """Mean and std over the batch of every transform parameter, per transformer (for the logs)."""
    stats = {}
    for k, theta in enumerate(thetas):
        theta = theta.reshape(theta.shape[0], -1)
        for i in range(theta.shape[1]):
            stats[f"theta/{k}/{i}/mean"] = theta[:, i].mean()
            stats[f"theta/{k}/{i}/std"] = theta[:, i].std()
    return stats


@register
class Classification(Objective):
    """Softmax cross-entropy on ``batch["label"]`` (int, ``(B,)``); the metric is the error rate.

    Option ``identity_penalty``: weight of the transformers' distance from the
    identity added to the loss (0: the paper's plain loss).
    """

    name = "classification"
    defaults = {"identity_penalty": 0.0}

    def loss(self, model, batch):
        logits, aux = model(batch["image"], return_aux=True)
        labels = batch["label"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss = ce + self.options["identity_penalty"] * aux["identity_penalty"]
        error = (logits.argmax(-1) != labels).mean()
        return loss, dict(cross_entropy=ce, error=error, identity_penalty=aux["identity_penalty"],
                          **theta_stats(aux["theta"]))

    def eval_sums(self, model, batch):
        logits = model(batch["image"])
        labels, mask = batch["label"], batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        wrong = logits.argmax(-1) != labels
        return dict(loss=(ce * mask).sum(), errors=(wrong * mask).sum(), count=mask.sum())

    def summarize(self, sums):
        count = max(sums["count"], 1.0)
        return {"error": sums["errors"] / count, "loss": sums["loss"] / count}


def check_labels(labels: Any, num_classes: int, what: str, shape: tuple[int, ...] = ()) -> None:
    """Raises one line unless ``labels`` are integers in ``[0, num_classes)`` of shape ``(N, *shape)``."""
    labels = jnp.asarray(labels) if not hasattr(labels, "dtype") else labels
    if labels.ndim != 1 + len(shape) or tuple(labels.shape[1:]) != tuple(shape):
        layout = f"(N, {', '.join(map(str, shape))})" if shape else "(N,)"
        raise ValueError(f"{what}: labels must have shape {layout}, got {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{what}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}) for this model, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


@register
class DigitSequence(Objective):
    """Multi-digit sequences (paper Sect. 4.2, SVHN): five independent softmax classifiers, one per position.

    The model returns logits ``(B, P, C)`` (P = 5 positions, C = 11: digits 0-9 and 10 = "no digit");
    ``batch["label"]`` is int ``(B, P)`` with the "no digit" class in unused positions [P]. The loss is
    the sum over positions of the softmax cross-entropy, averaged over examples (every head is trained
    on every position, "no digit" included; Goodfellow et al.'s separate length head is not used [P]).
    Metrics: ``error`` (sequence error: a number counts as right only if all P positions are right, the
    paper's Table 2 metric) and ``position_error`` (the mean error of the P classifiers).

    Option ``identity_penalty``: as for `Classification` (0: the paper's plain loss).
    """

    name = "sequence"
    defaults = {"identity_penalty": 0.0}

    @staticmethod
    def _terms(logits, labels):
        """Per example: summed cross-entropy ``(B,)``, sequence wrong ``(B,)``, positions wrong ``(B,)`` (mean)."""
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).sum(-1)
        wrong = logits.argmax(-1) != labels
        return ce, wrong.any(-1), wrong.mean(-1)

    def loss(self, model, batch):
        logits, aux = model(batch["image"], return_aux=True)
        ce, seq_wrong, pos_wrong = self._terms(logits, batch["label"])
        ce = ce.mean()
        loss = ce + self.options["identity_penalty"] * aux["identity_penalty"]
        return loss, dict(cross_entropy=ce, error=seq_wrong.mean(), position_error=pos_wrong.mean(),
                          identity_penalty=aux["identity_penalty"], **theta_stats(aux["theta"]))

    def eval_sums(self, model, batch):
        logits = model(batch["image"])
        mask = batch["mask"]
        ce, seq_wrong, pos_wrong = self._terms(logits, batch["label"])
        return dict(loss=(ce * mask).sum(), errors=(seq_wrong * mask).sum(),
                    position_errors=(pos_wrong * mask).sum(), count=mask.sum())

    def summarize(self, sums):
        count = max(sums["count"], 1.0)
        return {"error": sums["errors"] / count, "loss": sums["loss"] / count,
                "position_error": sums["position_errors"] / count}


@register
class Triplet(Objective):
    """Co-localisation's triplet hinge loss (paper A.2); no labels are read.

    The model (``coloc_st``, `stn_jax.paper.models.coloc`) maps images to the
    descriptors of their crops, ``model(x, return_aux=True)`` also gives the
    attention parameters; ``model.describe_patches(x, theta)`` encodes other
    patches of the same images. ``batch["rand"]`` ``(B, 3)`` are the random
    patches' uniforms (drawn by the data set, ``coloc_set``, from (seed, step));
    `stn_jax.paper.coloc.patch_theta` places them, `stn_jax.paper.coloc.triplet_terms` sums the hinge.

    Loss = the mean over the batch's pairs (n, m) of the hinge (the paper's double
    sum divided by the number of pairs: a constant factor, i.e. the learning rate).
    Options: ``alpha`` (margin, paper 1.0); ``patch_scale``: the random patch's size [U],
    ``"crop"`` (the same size as image n's predicted crop, at a random place inside the
    image), ``"range"`` (``s ~ U[patch_min_scale, patch_max_scale]``) or ``"fixed"``
    (``s = patch_fixed_scale``, default 1/3: a 28x28 digit's size in 84x84 images); ``num_pairs`` (0: every
    m != n of the batch; k: k rolled partners per image), ``iou_threshold`` (paper 0.5),
    ``box`` (``"box"``: the digit's 28x28 frame, the paper's box; or ``"ink_box"``),
    ``normalize`` (divide every descriptor by its L2 norm first [U]: the paper does not say;
    without it the loss's minimum is an empty crop, docs/coloc.md), ``normalize_parts``
    (divide each of the descriptor's parts, the model's ``descriptor_sizes``, e.g. the encoder's two
    hidden layers and its logits, by its own L2 norm first, so that each part has length 1 [U]; with
    ``normalize`` as well the concatenation is then scaled to length 1).
    Eval metrics: ``localised`` (fraction with IoU > threshold), ``mean_iou``, ``loss``,
    ``scale`` (mean predicted s), ``centre_error_px`` (mean distance in pixels between the
    crop's centre and the box's: how well the object is found whatever the box size) and
    ``centred`` (a diagnostic that is told the true box's size: the fraction whose box of that
    size at the predicted centre has IoU > threshold). ``eval_sums(model, batch, theta)`` scores
    given crops ``theta`` instead of the model's (`experiments.coloc_losses`: hand-placed crops).
    """

    name = "triplet"
    headline = "localised"
    scores_labels = False  # it reads boxes and random patches
    defaults = {"alpha": 1.0, "patch_scale": "crop", "patch_min_scale": 0.25, "patch_max_scale": 0.5,
                "patch_fixed_scale": 1 / 3, "normalize": True, "normalize_parts": False, "num_pairs": 0,
                "iou_threshold": 0.5, "box": "box"}
    PATCH_SCALES = ("crop", "range", "fixed")

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options["box"] not in ("box", "ink_box"):
            raise ValueError(f"objective triplet: box must be 'box' or 'ink_box', got {self.options['box']!r}")
        if self.options["patch_scale"] not in self.PATCH_SCALES:
            raise ValueError(f"objective triplet: patch_scale must be one of {', '.join(self.PATCH_SCALES)}, got "
                             f"{self.options['patch_scale']!r}")
        if not 0 < self.options["patch_min_scale"] <= self.options["patch_max_scale"]:
            raise ValueError("objective triplet: need 0 < patch_min_scale <= patch_max_scale")
        if not self.options["patch_fixed_scale"] > 0:
            raise ValueError(f"objective triplet: patch_fixed_scale must be positive, got "
                             f"{self.options['patch_fixed_scale']!r}")

    def patch_scales(self, theta: jax.Array, u: jax.Array) -> jax.Array:
        """The random patches' half-sides ``(B,)`` for crops ``theta`` ``(B, 3)`` and uniforms ``u`` ``(B, 3)``
        (``patch_scale``: the crop's own ``s``, ``U[patch_min_scale, patch_max_scale]`` from ``u[:, 0]``, or
        ``patch_fixed_scale``); `stn_jax.paper.coloc.patch_theta` places them with ``u[:, 1:]``."""
        mode = self.options["patch_scale"]
        if mode == "crop":
            return jax.lax.stop_gradient(theta[:, 0])
        if mode == "fixed":
            return jnp.full(theta.shape[:1], float(self.options["patch_fixed_scale"]), theta.dtype)
        lo, hi = float(self.options["patch_min_scale"]), float(self.options["patch_max_scale"])
        return lo + (hi - lo) * u[:, 0]

    def normalized(self, model, desc: jax.Array) -> jax.Array:
        """``desc`` ``(B, D)`` as the loss compares it: per part (``normalize_parts``: the parts of
        ``model.descriptor_sizes``) and then as a whole (``normalize``) scaled to unit L2 norm."""
        if self.options["normalize_parts"]:
            sizes = getattr(model, "descriptor_sizes", None)
            if sizes is None:
                raise ValueError("objective triplet: normalize_parts needs a model with descriptor_sizes "
                                 "(the coloc_st model)")
            desc = unit_norm(desc, sizes)
        return unit_norm(desc) if self.options["normalize"] else desc

    def hinge_terms(self, model, batch: Batch, desc_t: jax.Array, theta: jax.Array,
                    weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Per-image hinge sums and pair counts (`stn_jax.paper.coloc.triplet_terms`) of crops at ``theta``
        ``(B, 3)`` whose descriptors are ``desc_t`` ``(B, D)``: against random patches of the same images
        (``batch["rand"]``, `patch_scales`), descriptors normalised as the options say (`normalized`)."""
        u = batch["rand"]
        patches = patch_theta(u, self.patch_scales(theta, u))
        desc_rand = jax.lax.stop_gradient(model.describe_patches(batch["image"], patches))
        return triplet_terms(self.normalized(model, desc_t), self.normalized(model, desc_rand),
                             float(self.options["alpha"]), int(self.options["num_pairs"]), weights)

    def _terms(self, model, batch, weights=None, theta=None):
        """The model's crops, or the crops ``theta`` ``(B, 3)`` when given (then ``aux`` is None)."""
        if theta is None:
            desc_t, aux = model(batch["image"], return_aux=True)
            theta = aux["theta"][0]
        else:
            desc_t, aux = model.describe_patches(batch["image"], theta), None
        hinge, pairs = self.hinge_terms(model, batch, desc_t, theta, weights)
        overlap = iou(theta_to_box(theta), batch[self.options["box"]])
        return hinge, pairs, overlap, theta, aux

    def loss(self, model, batch):
        hinge, pairs, overlap, theta, aux = self._terms(model, batch)
        loss = hinge.sum() / jnp.maximum(pairs.sum(), 1.0)
        localised = (overlap > self.options["iou_threshold"]).mean()
        return loss, dict(localised=localised, mean_iou=overlap.mean(), identity_penalty=aux["identity_penalty"],
                          **theta_stats(aux["theta"]))

    def eval_sums(self, model, batch, theta=None):
        """The sums of `summarize`; ``theta`` ``(B, 3)``: of these crops instead of the model's."""
        mask = batch["mask"].astype(jnp.float32)
        hinge, pairs, overlap, theta, _ = self._terms(model, batch, mask, theta)
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
