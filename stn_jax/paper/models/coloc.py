"""Co-localisation model (paper Appendix A.2): ``coloc_st``.

    84x84 image -> attention ST (loc: conv 8@9x9 stride 4 > ReLU > max-pool 2 > FC 8 > ReLU > FC 8 > ReLU > FC 3)
               -> 28x28 crop -> the FROZEN distorted-MNIST CNN -> descriptor
                  (its two hidden layers' activations and its logits, concatenated)

``model(x)`` returns the descriptors ``(B, D)`` of the crops; ``model(x, return_aux=True)``
adds the attention parameters (``aux["theta"][0]``, ``(s, t_x, t_y)``) and the crops;
``model.describe_patches(x, theta)`` encodes other crops of the same images (the
triplet loss's random patches, `stn_jax.paper.coloc`).

The encoder's weights are `Frozen` variables (not `nnx.Param`): the trainer puts them
in ``model_state`` (carried, checkpointed, never optimised). They come from a run of
ours (``encoder`` option: a ``configs/distorted_mnist.py:r,cnn`` workdir) or, with
``encoder=""``, from a short run trained on first use and cached
(`stn_jax.paper.coloc.ensure_encoder`). docs/coloc.md lists the assumptions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax.conv import conv_general_dilated
from stn_jax.layers import Bound, Flatten, LocalisationParam, SpatialTransformer, count_params, pool, pooled_size
from stn_jax.paper import coloc as C
from stn_jax.paper.models import ModelSpec, PaperModel, module_params, register, solve_width
from stn_jax.paper.models.classifiers import CNNClassifier

log = logging.getLogger(__name__)


class Frozen(nnx.Variable):
    """A fixed weight: not an `nnx.Param`, so no optimiser sees it (it lives in the train state's ``model_state``)."""


class ColocLocalisation(nnx.Module):
    """conv ``channels``@``kernel_size`` stride ``stride`` (valid) > ReLU > max-pool ``pool`` > [FC > ReLU]* (A.2)."""

    def __init__(self, input_shape: Sequence[int], channels: int = 8, kernel_size: int = 9, stride: int = 4,
                 pool: int = 2, fc: Sequence[int] = (8, 8), *, rngs: nnx.Rngs):
        h, w, c = (int(s) for s in input_shape)
        self.conv = nnx.Conv(c, int(channels), (int(kernel_size),) * 2, strides=int(stride), padding="VALID",
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        size = [(n - int(kernel_size)) // int(stride) + 1 for n in (h, w)]
        self.pool_size = int(pool)
        if self.pool_size > 1:
            size = [pooled_size(n, self.pool_size, False) for n in size]
        if min(size) < 1:
            raise ValueError(f"localisation: input {tuple(input_shape)} is too small for conv {kernel_size} "
                             f"stride {stride} and pool {pool}")
        self.flatten = Flatten(3)
        features = size[0] * size[1] * int(channels)
        fcs = []
        for n in fc:
            fcs.append(nnx.Linear(features, int(n), rngs=rngs))
            features = int(n)
        self.fcs = nnx.List(fcs)
        self.out_features = features
        self.text = (f"conv {channels}@{kernel_size}x{kernel_size} stride {stride} > ReLU"
                     + (f" > max-pool {pool}" if self.pool_size > 1 else "")
                     + "".join(f" > FC {n} > ReLU" for n in fc))

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        if self.pool_size > 1:
            x = pool(x, self.pool_size, kind="max")
        x = self.flatten(x)
        for layer in self.fcs:
            x = jax.nn.relu(layer(x))
        return x


class ColocBound(Bound):
    """`Bound` whose scale range need not contain 1 (the crop starts at ``init_scale``, not at the identity).

    ``translation = -1`` means "inside": ``t = (1 - s) tanh(raw)``, so the crop never leaves the image.
    """

    def apply(self, raw, transform):
        if self.translation is not None and self.translation < 0:
            theta = dataclasses.replace(self, translation=None).apply(raw, transform)
            room = jnp.clip(1.0 - jnp.abs(theta[..., :1]), 0.0)
            return jnp.concatenate([theta[..., :1], room * jnp.tanh(raw[..., 1:])], -1)
        return super().apply(raw, transform)

    def inverse(self, theta, transform):
        if self.translation is not None and self.translation < 0:
            raw = dataclasses.replace(self, translation=None).inverse(theta, transform)
            room = np.clip(1.0 - np.abs(raw[..., :1] * 0 + np.asarray(theta)[..., :1]), 1e-6, None)
            raw[..., 1:] = np.arctanh(np.asarray(theta, np.float64)[..., 1:] / room)
            return raw
        return super().inverse(theta, transform)

    def check(self, transform: str) -> None:
        if self.scale is not None:
            lo, hi = self.scale
            if not 0 < lo < hi:
                raise ValueError(f"bound 'scale' must be (low, high) with 0 < low < high, got {self.scale}")
        if self.translation is not None and self.translation < 0:
            if self.translation != -1:
                raise ValueError(f"bound 'translation' must be positive, or -1 (inside the image), got "
                                 f"{self.translation}")
            if transform != "attention":
                raise ValueError("bound translation -1 (inside the image) applies to the attention transform only")
            return
        Bound(None, self.translation, self.offset).check(transform)


DESCRIPTOR_PARTS = ("hidden1", "hidden2", "logits")


class FrozenCNN(nnx.Module):
    """The distorted-MNIST CNN (`CNNClassifier`'s computation) with `Frozen` weights; returns a descriptor.

    ``weights``: ``{"conv1": (kernel, bias), "conv2": ..., "out": ...}`` (NumPy), or None for
    zeros of the shapes of a CNN of ``width`` (shape-only builds). The descriptor concatenates
    the ``parts`` of: ``hidden1`` (conv 1 > ReLU > max-pool), ``hidden2`` (conv 2 > ReLU >
    max-pool), ``logits``, each flattened.
    """

    def __init__(self, input_shape: Sequence[int], weights: dict | None = None, *, width: int = 8,
                 num_classes: int = 10, parts: Sequence[str] = DESCRIPTOR_PARTS):
        self.input_shape = tuple(int(s) for s in input_shape)
        if weights is None:
            k1, k2 = CNNClassifier.KERNELS
            fh, fw, _ = CNNClassifier.feature_shape(self.input_shape, width)
            c = self.input_shape[-1]
            weights = {"conv1": (np.zeros((k1, k1, c, width)), np.zeros(width)),
                       "conv2": (np.zeros((k2, k2, width, width)), np.zeros(width)),
                       "out": (np.zeros((fh * fw * width, num_classes)), np.zeros(num_classes))}
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        self.conv1_kernel, self.conv1_bias = (Frozen(f32(a)) for a in weights["conv1"])
        self.conv2_kernel, self.conv2_bias = (Frozen(f32(a)) for a in weights["conv2"])
        self.out_kernel, self.out_bias = (Frozen(f32(a)) for a in weights["out"])
        self.width = int(np.shape(weights["conv1"][0])[-1])
        unknown = [p for p in parts if p not in DESCRIPTOR_PARTS]
        if not parts or unknown:
            raise ValueError(f"descriptor parts must be a non-empty subset of {DESCRIPTOR_PARTS}, got {list(parts)}")
        self.parts = tuple(parts)

    def __call__(self, x):
        w = lambda v: jax.lax.stop_gradient(v.get_value())
        conv = lambda x, k, b: conv_general_dilated(x, w(k), (1, 1), "VALID",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + w(b)
        h1 = pool(jax.nn.relu(conv(x, self.conv1_kernel, self.conv1_bias)), 2, kind="max", ceil=True)
        h2 = pool(jax.nn.relu(conv(h1, self.conv2_kernel, self.conv2_bias)), 2, kind="max", ceil=True)
        flat = lambda a: a.reshape(a.shape[0], math.prod(a.shape[1:]))
        logits = flat(h2) @ w(self.out_kernel) + w(self.out_bias)
        out = {"hidden1": flat(h1), "hidden2": flat(h2), "logits": logits}
        return jnp.concatenate([out[p] for p in self.parts], -1)

    def logits(self, x):
        """The CNN's logits (for checks against the classifier it came from)."""
        parts, self.parts = self.parts, ("logits",)
        try:
            return self(x)
        finally:
            self.parts = parts


class ColocModel(PaperModel):
    """``[SpatialTransformer (attention), FrozenCNN]`` plus `describe_patches`."""

    def describe_patches(self, x, theta):
        """Descriptors of the crops of ``x`` at attention parameters ``theta`` ``(B, 3)``."""
        st, encoder = self.layers[0], self.layers[-1]
        return encoder(st.sample(x, st.grid(theta)))

    def crop(self, x, theta):
        st = self.layers[0]
        return st.sample(x, st.grid(theta))


def _tracing() -> bool:
    """Whether we are inside a shape-only trace (`nnx.eval_shape`): then no encoder is trained or loaded."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _default_width(input_shape) -> int:
    from stn_jax.paper.models.mnist import PARAM_BUDGET

    return solve_width(lambda w: module_params(CNNClassifier, tuple(input_shape), w, 10), PARAM_BUDGET, "encoder")


OPTIONS: dict[str, Any] = {
    "encoder": "",             # a distorted-MNIST CNN run's workdir; "" = train one automatically (cached)
    "encoder_source": "tfds",  # MNIST source of the automatic encoder (configs link it to data.source)
    "encoder_cache": "",       # where the automatic encoder is cached; "" = $STN_JAX_CACHE or ~/.cache/stn_jax
    "encoder_task": "r",       # [U] the automatic encoder's data (R: rotated MNIST, 28x28)
    "encoder_steps": 600,      # [U] its training steps (batch 64)
    "encoder_max_angle": -1.0,  # its rotation range in degrees; -1 = the task's (R: 90); 0 = upright MNIST
    "descriptor": "hidden1,hidden2,logits",  # [P] the two hidden layers' activations and the logits
    "output_size": 0,          # crop size; 0 = the encoder's input (28x28 for R) [U]
    "localisation": {"channels": 8, "kernel_size": 9, "stride": 4, "pool": 2, "fc": (8, 8)},  # [P] list; ~6k params
    "init_scale": 0.5,         # [U] the crop starts centred with this scale (1 = the whole image)
    "bound": {"scale": (0.1, 1.2), "translation": 1.0},  # [U] s in (0.1, 1.2) (sigmoid), |t| < 1 (tanh)
    "head_init_std": 0.0,      # 0: zero regression kernel (every image starts with the same crop)
    "align_corners": False,
}


def build(input_shape, num_classes, transform, rngs: nnx.Rngs, **o) -> ColocModel:
    input_shape = tuple(input_shape)
    parts = tuple(p.strip() for p in str(o["descriptor"]).split(",") if p.strip())
    abstract = _tracing()
    if abstract:
        source = "shapes only"
        enc_shape = (28, 28, input_shape[-1])
        encoder = FrozenCNN(enc_shape, None, width=_default_width(enc_shape), parts=parts)
    else:
        workdir = o["encoder"] or C.ensure_encoder(o["encoder_source"], o["encoder_cache"] or None,
                                                   task=o["encoder_task"], steps=int(o["encoder_steps"]),
                                                   max_angle=None if o["encoder_max_angle"] < 0
                                                   else float(o["encoder_max_angle"]))
        weights = C.load_encoder(workdir)
        enc_shape = weights["input_shape"]
        if enc_shape[-1] != input_shape[-1]:
            raise ValueError(f"the encoder takes {enc_shape[-1]} channel(s), the images have {input_shape[-1]}")
        encoder = FrozenCNN(enc_shape, weights, parts=parts)
        source = f"{weights['model']} on {weights['task']}, {weights['workdir']} step {weights['step']}"
        log.info("co-localisation encoder: %s", source)
    out = int(o["output_size"]) or enc_shape[0]
    if (out, out) != tuple(enc_shape[:2]):
        raise ValueError(f"output_size {out} must match the encoder's input {enc_shape[:2]} (or be 0)")
    loc = dict(o["localisation"])
    body = ColocLocalisation(input_shape, **loc, rngs=rngs)
    bound = ColocBound.create(dict(o["bound"])) if o["bound"] else None
    bound = ColocBound(bound.scale, bound.translation, bound.offset) if bound is not None else None
    with np.errstate(invalid="ignore", divide="ignore"):  # the identity (s = 1) may lie outside bound.scale
        st = SpatialTransformer(input_shape, transform, output_size=(out, out), localisation=body,
                                bound=bound, head_init_std=float(o["head_init_std"]),
                                align_corners=bool(o["align_corners"]), rngs=rngs)
    s0 = float(o["init_scale"])
    init = np.array([s0, 0.0, 0.0])
    bias = init if st.bound is None else st.bound.inverse(init, transform)
    if st.bound is not None and st.bound.scale is not None and not st.bound.scale[0] < s0 < st.bound.scale[1]:
        raise ValueError(f"init_scale {s0} must lie inside bound.scale {st.bound.scale}")
    if not np.all(np.isfinite(bias)):
        raise ValueError(f"init_scale {s0} is outside the bound {st.bound}")
    st.head.linear.bias.set_value(jnp.asarray(bias, jnp.float32))
    loc_params = count_params(st, LocalisationParam)
    summary = (f"ST-coloc on {'x'.join(map(str, input_shape))}: ST attention to {out}x{out} (loc: {body.text} > "
               f"FC 3; {loc_params:,} params; starts at s={s0:g}) -> frozen CNN {encoder.width}@9x9 > pool > "
               f"{encoder.width}@7x7 > pool > FC 10 (descriptor: {'+'.join(parts)}; {source})")
    return ColocModel([st, encoder], model_name="coloc_st", display_name="ST-coloc", transform=transform,
                      width=encoder.width, input_shape=input_shape, num_classes=num_classes, summary=summary)


register(ModelSpec("coloc_st", build, OPTIONS, ("attention",), "ST-coloc", ("coloc_set",)))
