"""The SVHN multi-digit models (paper Sect. 4.2, Table 2; Appendix A.5): CNN, ST-CNN Single, ST-CNN Multi.

==================  ===========================================================
``svhn_cnn``        the baseline: 8 convs 5x5 "same" (48, 64, 128, 160, 192, 192,
                    192, 192; max-pool 2 after conv 1, 3, 5, 7) -> FC 3072 -> FC
                    3072 -> five 11-way digit classifiers
``svhn_st_single``  one affine spatial transformer on the input (localisation:
                    conv 32@5x5 -> max-pool 2 -> conv 32@5x5 -> FC 32 -> FC 6) -> CNN
``svhn_st_multi``   an affine transformer before each of the first four conv
                    layers (localisation each: FC 32 -> FC 32 -> FC 6 on the whole
                    flattened input of that layer) -> the rest of the CNN
==================  ===========================================================

Outputs: logits ``(B, 5, num_classes)`` (``num_classes`` = 11: digits 0-9 and
10 = "no digit", the data's labels), one row per digit position, left to right;
``model(x, return_aux=True)`` also returns the transformers' ``theta``,
``warped`` and ``identity_penalty`` (`stn_jax.layers.TransformerSequential`).
The objective is `stn_jax.paper.objectives.DigitSequence` (``"sequence"``).

Paper numbers (Table 2, sequence error %) are in each spec's ``paper`` keyed
``("svhn64", transform)`` for the 64 px column and ``("svhn128", transform)``
for the 128 px column (the data task is ``svhn`` in both; ``image_size``
picks the column). The transform is ``""`` for the CNN, ``"affine"`` for the
transformer models:

    model            64px  128px
    CNN              4.0   5.6
    ST-CNN Single    3.7   3.9
    ST-CNN Multi     3.6   3.9

Provenance tags [P], [S], [U] (`stn_jax.paper`): the paper's Sect. 4.2 and
Appendix A.5.

* Backbone [S]: conv[48,5,1,2] - max[2] - conv[64] - conv[128] - max[2] - conv[160]
  - conv[192] - max[2] - conv[192] - conv[192] - max[2] - conv[192] - fc[3072] -
  fc[3072] - 5 x fc[11]. ReLU after every hidden layer [U]; max pools 2x2 stride 2
  (floor mode) [S: "max[2]"]: Goodfellow et al.'s pooling after *every* conv with
  strides alternating 2/1 is not used, because the A.5 list places four pools and
  4x4x192 = 3,072 at 64 px matches the FC width [U].
* The 11th hidden layer [U]: the main text says 11 hidden layers, the A.5 list
  has 10 (8 conv + 2 FC). We follow the list (default ``fc=(3072, 3072)``);
  ``fc=(3072, 3072, 3072)`` adds a third FC layer, one of the plausible
  missing layers (Goodfellow's locally connected layer is the other).
* Dropout 0.5 [S] on the output of every hidden layer except the first conv
  layer (after its ReLU and pool) [U: placement]; none in the localisation
  networks [S]. Uses the "dropout" rng stream (`nnx.Dropout`).
* Initialisation [U] (the paper: random): fan-in normal, He et al.'s variance
  ``2 / fan_in`` for the ReLU layers and LeCun's ``1 / fan_in`` for the heads,
  times the keep probability of the dropout on the layer's input
  (``dropout_init``, default True; `kernel_init`), biases zero. Inverted
  dropout multiplies the second moment of what it keeps by ``1 / keep``, so
  with plain He initialisation nine dropout layers make the training-mode
  logits about 40x larger than the evaluation-mode ones (rms 13 against 0.33 at
  width 0.5); the first SGD steps then drive most ReLUs dead and the network
  sits at the marginal label distribution (docs/models.md, "SVHN: learning
  with the paper's recipe"). Scaled, the training-mode signal keeps its scale.
* Input [U]: the data gives RGB in [0, 1]; ``subtract_mean`` (default True,
  Goodfellow et al. 2013) subtracts each image's mean (over pixels and
  channels) before the first conv. In the transformer models it comes *after*
  the first transformer, which warps the [0, 1] image (zero padding = black).
* The five heads are one linear layer ``fc -> 5 * num_classes`` reshaped to
  ``(5, num_classes)``: the same function, parameter count and (fan-in based)
  initialisation as five independent ``fc -> num_classes`` layers.
* ST-CNN Single localisation [S]: conv[32,5,1,2] - max[2] - conv[32,5,1,2] -
  fc[32] - fc[6] (the paper's "4-layer CNN"); ReLU after each hidden layer [U].
* ST-CNN Multi localisation [S]: fc[32] - fc[32] - fc[6] on the flattened
  input of conv 1-4 (64x64x3, 32x32x48, 32x32x64, 16x16x128 at 64 px); the
  flattening of the whole map is not stated [U].
* Every transformer is affine + bilinear [P], output size = its input [U],
  regression layer initialised to the identity [P], ``align_corners=False``
  [U]. The localisation networks' 0.1 learning-rate multiplier [S] is an
  optimiser setting (``config.optimizer.loc_lr_multiplier``, configs/svhn.py).
* ``width_multiplier`` (default 1.0) scales every conv and FC width of the
  classifier (``max(1, round(w * m))``, not the 11-way heads nor the
  localisation networks), so the same topology can be trained on a CPU
  (e.g. 0.125 or 0.25).

Parameter counts at width 1.0 (3 channels, 11 classes), from abstract models:
see tests/test_svhn_models.py (the baseline's is computed there by hand).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stn_jax.layers import FCBody, Flatten, LocalisationParam, SpatialTransformer, count_params, pool
from stn_jax.paper.models.registry import ModelSpec, PaperModel, register

NUM_DIGITS = 5                                                  # [P] five digit classifiers
CONV_WIDTHS = (48, 64, 128, 160, 192, 192, 192, 192)            # [S] A.5
POOL_AFTER = (True, False, True, False, True, False, True, False)  # [S] max[2] after conv 1, 3, 5, 7
FC_WIDTHS = (3072, 3072)                                        # [S] A.5 (10 hidden layers; see the docstring)
KERNEL = 5                                                      # [S] 5x5, pad 2 ("same")
DROPOUT = 0.5                                                   # [S]
MULTI_ST_BEFORE = 4                                             # [P] a transformer before conv 1-4


def kernel_init(gain: float, input_keep: float = 1.0):
    """Fan-in normal initialisation of variance ``gain * input_keep / fan_in`` [U].

    ``gain`` 2 is He et al.'s for a ReLU layer, 1 LeCun's for the linear heads. ``input_keep`` is the keep
    probability of the dropout on the layer's input (1: none): inverted dropout multiplies its input's
    second moment by ``1 / keep``, so this keeps the training-mode signal's scale through the stack.
    """
    return nnx.initializers.variance_scaling(gain * float(input_keep), "fan_in", "truncated_normal")

# [S] A.5: ST-CNN Single: conv[32,5,1,2] - max[2] - conv[32,5,1,2] - fc[32] - fc[6].
SINGLE_LOCALISATION = {"kind": "conv", "channels": (32, 32), "kernel_size": 5, "fc": (32,), "downsample": None,
                       "padding": "SAME", "pool_after": (True, False)}
# [S] A.5: ST-CNN Multi: fc[32] - fc[32] - fc[6], each on its layer's whole (flattened) input [U].
MULTI_LOCALISATION = {"kind": "fc", "hidden": (32, 32)}

_CNN_OPTIONS = {"width_multiplier": 1.0, "fc": FC_WIDTHS, "dropout": DROPOUT, "subtract_mean": True,
                "dropout_init": True}
_ST_OPTIONS = {"align_corners": False, "mode": "bilinear", "padding_mode": "zeros", "pad_value": 0.0,
               "bound": None, "head_init_std": 0.0}


class SubtractMean(nnx.Module):
    """Subtracts each image's mean over pixels and channels (Goodfellow et al. 2013); no parameters."""

    def __call__(self, x):
        return x - jnp.mean(x, axis=(-3, -2, -1), keepdims=True)


class ConvBlock(nnx.Module):
    """conv kxk "same" -> ReLU [-> max-pool 2x2 stride 2] [-> dropout]."""

    def __init__(self, in_channels: int, out_channels: int, *, pool_after: bool, dropout: float,
                 input_keep: float = 1.0, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (KERNEL, KERNEL), padding="SAME",
                             kernel_init=kernel_init(2.0, input_keep), rngs=rngs)
        self.pool_after = bool(pool_after)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        if self.pool_after:
            x = pool(x, 2, kind="max")
        return x if self.dropout is None else self.dropout(x)


class DenseBlock(nnx.Module):
    """linear -> ReLU [-> dropout]."""

    def __init__(self, in_features: int, out_features: int, *, dropout: float, input_keep: float = 1.0,
                 rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, kernel_init=kernel_init(2.0, input_keep), rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x):
        x = jax.nn.relu(self.linear(x))
        return x if self.dropout is None else self.dropout(x)


class DigitHeads(nnx.Module):
    """Five independent ``num_classes``-way linear classifiers: ``(B, F) -> (B, 5, num_classes)``.

    Stored as one ``F -> 5 * num_classes`` linear layer (the same function and parameter count).
    """

    def __init__(self, in_features: int, num_classes: int, num_digits: int = NUM_DIGITS, *, input_keep: float = 1.0,
                 rngs: nnx.Rngs):
        self.num_digits, self.num_classes = int(num_digits), int(num_classes)
        self.linear = nnx.Linear(in_features, self.num_digits * self.num_classes,
                                 kernel_init=kernel_init(1.0, input_keep), rngs=rngs)

    def __call__(self, x):
        return self.linear(x).reshape(x.shape[:-1] + (self.num_digits, self.num_classes))


def scaled(width: int, multiplier: float) -> int:
    """``max(1, round(width * multiplier))``."""
    return max(1, int(round(width * float(multiplier))))


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _describe_loc(t: SpatialTransformer) -> str:
    body, parts = t.body, []
    if isinstance(body, FCBody):
        parts = [f"FC {layer.out_features}" for layer in body.layers]
    else:
        if body.downsample:
            parts.append(f"{body.downsample}-pool 2")
        for conv, p in zip(body.convs, body.pool_after):
            parts.append(f"conv {conv.out_features}@{'x'.join(map(str, conv.kernel_size))} {conv.padding.lower()}"
                         + (" > max-pool 2" if p else ""))
        parts += [f"FC {layer.out_features}" for layer in body.fcs]
    return " > ".join(parts + [f"FC {t.num_params}"])


def _transformer(shape, transform, localisation, o, rngs) -> SpatialTransformer:
    return SpatialTransformer(shape, transform, localisation=dict(localisation), align_corners=o["align_corners"],
                              mode=o["mode"], padding_mode=o["padding_mode"], pad_value=o["pad_value"],
                              bound=o["bound"], head_init_std=o["head_init_std"], rngs=rngs)


def _build(name: str, display: str, *, input_shape, num_classes, transform, rngs, st: str | None,
           width_multiplier: float, fc: Sequence[int], dropout: float, subtract_mean: bool, dropout_init: bool,
           localisation: Any = None, **o: Any) -> PaperModel:
    """[ST] -> [mean] -> 8 conv blocks (an ST before conv 1-4 for ``st="multi"``) -> FC blocks -> heads."""
    if len(input_shape) != 3:
        raise ValueError(f"expected an image shape (H, W, C), got {input_shape}")
    if not float(width_multiplier) > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    fc = tuple(int(f) for f in fc)
    if not fc or min(fc) < 1:
        raise ValueError(f"fc must be a non-empty sequence of positive widths, got {fc}")
    sizes = [input_shape[0], input_shape[1]]
    for p in POOL_AFTER:
        sizes = [s // 2 if p else s for s in sizes]
    if min(sizes) < 1:
        raise ValueError(f"the input is too small for four 2x2 max-pools: {input_shape} (at least 16x16)")
    dropout = float(dropout)
    layers: list = []
    parts: list[str] = []
    shape = tuple(input_shape)
    if st == "single":
        t = _transformer(shape, transform, localisation, o, rngs)
        layers.append(t)
        parts.append(f"ST {transform} on {_shape_str(shape)} (loc: {_describe_loc(t)})")
    if subtract_mean and st != "multi":  # ST-CNN Multi subtracts it after its first transformer
        layers.append(SubtractMean())
        parts.append("minus image mean")
    cin, keep = shape[-1], 1.0   # keep: the keep probability of the dropout on the next layer's input
    for i, (w, p) in enumerate(zip(CONV_WIDTHS, POOL_AFTER)):
        if st == "multi" and i < MULTI_ST_BEFORE:
            t = _transformer(shape, transform, localisation, o, rngs)
            layers.append(t)
            parts.append(f"ST {transform} on {_shape_str(shape)} (loc: {_describe_loc(t)})")
            if i == 0 and subtract_mean:  # the first transformer warps the [0, 1] image
                layers.append(SubtractMean())
                parts.append("minus image mean")
        w = scaled(w, width_multiplier)
        drop = dropout if i > 0 else 0.0   # [S] no dropout on the first conv layer
        layers.append(ConvBlock(cin, w, pool_after=p, dropout=drop, input_keep=keep, rngs=rngs))
        keep = 1.0 - drop if dropout_init else 1.0
        shape = (shape[0] // 2, shape[1] // 2, w) if p else (shape[0], shape[1], w)
        parts.append(f"conv {w}@5x5 same > ReLU" + (" > max-pool 2" if p else "") + (" > dropout" if drop else ""))
        cin = w
    layers.append(Flatten(3))
    features = shape[0] * shape[1] * shape[2]
    for f in fc:
        f = scaled(f, width_multiplier)
        layers.append(DenseBlock(features, f, dropout=dropout, input_keep=keep, rngs=rngs))
        keep = 1.0 - dropout if dropout_init else 1.0
        parts.append(f"FC {f} > ReLU" + (" > dropout" if dropout else ""))
        features = f
    layers.append(DigitHeads(features, num_classes, input_keep=keep, rngs=rngs))
    parts.append(f"{NUM_DIGITS} x FC {num_classes}")
    summary = f"{display} on {_shape_str(input_shape)}: " + " -> ".join(parts)
    return PaperModel(layers, model_name=name, display_name=display, transform=transform, width=None,
                      input_shape=tuple(input_shape), num_classes=num_classes, summary=summary)


def _register(name: str, display: str, paper: dict, st: str | None) -> None:
    options: dict[str, Any] = dict(_CNN_OPTIONS)
    if st:
        options.update(_ST_OPTIONS, localisation=dict(SINGLE_LOCALISATION if st == "single" else MULTI_LOCALISATION))


    def build(input_shape, num_classes, transform, rngs: nnx.Rngs, **o):
        return _build(name, spec.display_name(transform), input_shape=input_shape, num_classes=num_classes,
                      transform=transform, rngs=rngs, st=st, **o)

    spec = register(ModelSpec(name, build, options, (), display, TASKS, paper, any_transform=bool(st)))


TASKS = ("svhn", "svhn_synth")
# Paper Table 2, sequence error % [P]: ("svhn64", transform) = 64 px column, ("svhn128", transform) = 128 px.
_register("svhn_cnn", "CNN", {("svhn64", ""): 4.0, ("svhn128", ""): 5.6}, st=None)
_register("svhn_st_single", "ST-CNN Single {t}", {("svhn64", "affine"): 3.7, ("svhn128", "affine"): 3.9},
          st="single")
_register("svhn_st_multi", "ST-CNN Multi {t}", {("svhn64", "affine"): 3.6, ("svhn128", "affine"): 3.9},
          st="multi")


def localisation_params(model: nnx.Module) -> int:
    """Parameters of the model's localisation networks."""
    return count_params(model, LocalisationParam)
