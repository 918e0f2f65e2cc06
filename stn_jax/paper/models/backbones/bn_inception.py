"""BN-Inception (Inception with batch normalisation, Ioffe & Szegedy 2015) as a Flax NNX module.

The paper's CUB backbone ("Inception-BN", Table 3). Architecture of ``pretrainedmodels==0.7.4``'s
``bninception`` (``BNInception``), whose ImageNet weights ``bn_inception-52deb4733.pth`` (ported
from Caffe, top-1 73.5 %) convert with `stn_jax.paper.models.backbones.load_pretrained`:

* stem: conv 7x7/2 64 -> max-pool 3/2 -> conv 1x1 64 -> conv 3x3 192 -> max-pool 3/2;
* inception 3a, 3b, 3c (stride 2), 4a-4d, 4e (stride 2), 5a, 5b. Each module has up to four
  branches, concatenated on channels in this order: 1x1 conv; 1x1 reduce -> 3x3; 1x1 reduce
  -> 3x3 -> 3x3 ("double 3x3"); pool [-> 1x1 projection]. The stride-2 modules (3c, 4e) have no
  1x1 branch; their pool branch is a max pool 3/2 without projection;
* 1024 output channels; global average pool -> Linear(1024, 1000).

Every convolution has a bias and is followed by BatchNorm (epsilon 1e-5, PyTorch momentum 0.1)
and ReLU: 69 of them, 10,270,240 parameters without the classifier (11,295,240 with).

PyTorch details kept exactly: the four stride-2 max pools (pool1, pool2, 3c, 4e) use ceil mode
(at 224 pixels 3c's pool branch would otherwise give 13 against 14 for its conv branches); the
pool branches of 3a-5a are 3x3 stride-1 average pools dividing by 9, padding zeros included;
5b's pool branch is a 3x3 stride-1 max pool. The reference's final pool is ``AvgPool2d(7)``,
which equals the global mean used here at 224 pixels (7x7 map) and would not give one vector
per image at other sizes; this module always takes the global mean (448 pixels: 14x14x1024 map).

Input: `preprocess` turns RGB in [0, 1] into what the Caffe weights expect: BGR in [0, 255]
minus the mean [104, 117, 128] (BGR order), standard deviation 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ._common import BackboneOutput, avg_pool_3x3_count_pad, batch_norm, conv, global_avg_pool, max_pool, torch_momentum

__all__ = ["BNInception", "ConvBNReLU", "InceptionModule", "InceptionSpec", "INCEPTION_SPECS", "preprocess",
           "torch_name_map", "NUM_FEATURES", "INPUT_SIZE", "MEAN_BGR"]

NUM_FEATURES = 1024
INPUT_SIZE = 224
BN_EPSILON = 1e-5
BN_MOMENTUM = torch_momentum(0.1)
MEAN_BGR = (104.0, 117.0, 128.0)


def preprocess(images_rgb_01: jax.Array) -> jax.Array:
    """RGB in [0, 1], ``(..., H, W, 3)``, to BGR in [0, 255] minus the mean ``[104, 117, 128]`` (BGR)."""
    x = jnp.asarray(images_rgb_01)
    return x[..., ::-1] * 255.0 - jnp.asarray(MEAN_BGR, x.dtype)


class ConvBNReLU(nnx.Module):
    """Conv (with bias, symmetric zero padding) -> BatchNorm -> ReLU: ``(B, H, W, cin) -> (B, H', W', cout)``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int | None = None, *,
                 dtype=None, rngs: nnx.Rngs):
        padding = kernel // 2 if padding is None else padding
        self.conv = conv(cin, cout, kernel, strides=stride, padding=[(padding, padding)] * 2, use_bias=True,
                         dtype=dtype, rngs=rngs)
        self.bn = batch_norm(cout, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionSpec(NamedTuple):
    """One inception module: input channels, branch widths (0 = no such branch), pool kind, stride."""

    cin: int
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double: int
    pool: str  # "avg" (3x3/1, counts padding), "max" (3x3/1, padding 1) or "max_s2" (3x3/2, ceil mode)
    pool_proj: int
    stride: int = 1

    @property
    def cout(self) -> int:
        return self.n1x1 + self.n3x3 + self.double + (self.pool_proj or self.cin)


INCEPTION_SPECS: dict[str, InceptionSpec] = {
    "3a": InceptionSpec(192, 64, 64, 64, 64, 96, "avg", 32),
    "3b": InceptionSpec(256, 64, 64, 96, 64, 96, "avg", 64),
    "3c": InceptionSpec(320, 0, 128, 160, 64, 96, "max_s2", 0, stride=2),
    "4a": InceptionSpec(576, 224, 64, 96, 96, 128, "avg", 128),
    "4b": InceptionSpec(576, 192, 96, 128, 96, 128, "avg", 128),
    "4c": InceptionSpec(576, 160, 128, 160, 128, 160, "avg", 128),
    "4d": InceptionSpec(608, 96, 128, 192, 160, 192, "avg", 128),
    "4e": InceptionSpec(608, 0, 128, 192, 192, 256, "max_s2", 0, stride=2),
    "5a": InceptionSpec(1056, 352, 192, 320, 160, 224, "avg", 128),
    "5b": InceptionSpec(1024, 352, 192, 320, 192, 224, "max", 128),
}


class InceptionModule(nnx.Module):
    """Four parallel branches concatenated on channels: ``(B, H, W, cin) -> (B, H/s, W/s, spec.cout)``.

    Branches (attributes): ``conv_1x1``; ``conv_3x3_reduce -> conv_3x3``; ``conv_double_3x3_reduce
    -> conv_double_3x3_1 -> conv_double_3x3_2``; pool -> ``conv_pool_proj``. Absent branches are
    ``None``. With stride 2 the second conv of the 3x3 branches and the max pool (ceil mode)
    have stride 2.
    """

    def __init__(self, spec: InceptionSpec, *, dtype=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        s = spec.stride
        self.pool_kind = spec.pool
        self.conv_1x1 = ConvBNReLU(spec.cin, spec.n1x1, 1, **kw) if spec.n1x1 else None
        self.conv_3x3_reduce = ConvBNReLU(spec.cin, spec.n3x3_reduce, 1, **kw)
        self.conv_3x3 = ConvBNReLU(spec.n3x3_reduce, spec.n3x3, 3, s, **kw)
        self.conv_double_3x3_reduce = ConvBNReLU(spec.cin, spec.double_reduce, 1, **kw)
        self.conv_double_3x3_1 = ConvBNReLU(spec.double_reduce, spec.double, 3, **kw)
        self.conv_double_3x3_2 = ConvBNReLU(spec.double, spec.double, 3, s, **kw)
        self.conv_pool_proj = ConvBNReLU(spec.cin, spec.pool_proj, 1, **kw) if spec.pool_proj else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool_kind == "max_s2" and (x.shape[1] % 2 or x.shape[2] % 2):
            raise ValueError(f"BNInception: a stride-2 inception module got an odd spatial size {x.shape[1:3]}: its "
                             f"conv branches (padding 1) and ceil-mode pool disagree there, as in the reference; "
                             f"use an input size that is a multiple of 32 (e.g. 224 or 448)")
        outs = []
        if self.conv_1x1 is not None:
            outs.append(self.conv_1x1(x))
        outs.append(self.conv_3x3(self.conv_3x3_reduce(x)))
        outs.append(self.conv_double_3x3_2(self.conv_double_3x3_1(self.conv_double_3x3_reduce(x))))
        if self.pool_kind == "avg":
            p = avg_pool_3x3_count_pad(x)
        elif self.pool_kind == "max":
            p = max_pool(x, 3, 1, padding=1, ceil=True)
        else:
            p = max_pool(x, 3, 2, ceil=True)
        outs.append(p if self.conv_pool_proj is None else self.conv_pool_proj(p))
        return jnp.concatenate(outs, axis=-1)


class BNInception(nnx.Module):
    """BN-Inception backbone, channels last.

    ``model(x)`` with ``x`` of shape ``(B, H, W, 3)`` (already `preprocess`-ed: BGR, mean
    subtracted) returns a `BackboneOutput`: ``feature_map`` ``(B, h, w, 1024)`` (7x7 at 224
    pixels, 14x14 at 448; the output of inception 5b, before pooling), ``features`` ``(B, 1024)``
    (its spatial mean) and ``logits`` ``(B, num_classes)`` (``None`` when ``num_classes`` is
    ``None``). The reference has no dropout. The inputs of the stride-2 modules 3c and 4e must
    have even sizes (their conv and pool branches disagree otherwise, as in the reference): use
    multiples of 32 (96, 128, 224, 448; 112 fails).

    Built in training mode (BatchNorm on batch statistics); ``model.eval()`` uses the running
    statistics (or ``nnx.view(model, use_running_average=True)``).

    Args:
      num_classes: classifier outputs (1000 for the ImageNet weights), or ``None`` for none.
      dtype: computation dtype of the layers (parameters stay float32).
    """

    def __init__(self, num_classes: int | None = 1000, *, dtype=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.num_features = NUM_FEATURES
        self.num_classes = num_classes
        self.conv1_7x7_s2 = ConvBNReLU(3, 64, 7, 2, 3, **kw)
        self.conv2_3x3_reduce = ConvBNReLU(64, 64, 1, **kw)
        self.conv2_3x3 = ConvBNReLU(64, 192, 3, **kw)
        self.inception = nnx.Dict({name: InceptionModule(spec, **kw) for name, spec in INCEPTION_SPECS.items()})
        self.last_linear = None if num_classes is None else nnx.Linear(NUM_FEATURES, num_classes, **kw)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, 3) -> (B, h, w, 1024)`` (``h = 7`` for ``H = 224``): everything before the global pool."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"BNInception: expected (B, H, W, 3) BGR input, got shape {x.shape}")
        x = max_pool(self.conv1_7x7_s2(x), 3, 2, ceil=True)
        x = max_pool(self.conv2_3x3(self.conv2_3x3_reduce(x)), 3, 2, ceil=True)
        for name in INCEPTION_SPECS:
            x = self.inception[name](x)
        return x

    def classify(self, features: jax.Array) -> jax.Array:
        """``(B, 1024) -> (B, num_classes)``: the linear classifier."""
        if self.last_linear is None:
            raise ValueError("BNInception was built with num_classes=None: it has no classifier")
        return self.last_linear(features)

    def __call__(self, x: jax.Array) -> BackboneOutput:
        fmap = self.feature_map(x)
        features = global_avg_pool(fmap)
        logits = None if self.last_linear is None else self.classify(features)
        return BackboneOutput(fmap, features, logits)


def torch_name_map(num_classes: int | None = 1000) -> dict[str, str]:
    """Names in ``pretrainedmodels``' BNInception state dict -> NNX paths (``"/"``-joined) of `BNInception`.

    ``num_batches_tracked`` entries are not listed (the loader ignores them); ``last_linear``
    only when ``num_classes`` is not ``None``.
    """
    out: dict[str, str] = {}

    def unit(t: str, n: str) -> None:
        out[f"{t}.weight"] = f"{n}/conv/kernel"
        out[f"{t}.bias"] = f"{n}/conv/bias"
        for a, b in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            out[f"{t}_bn.{a}"] = f"{n}/bn/{b}"

    for name in ("conv1_7x7_s2", "conv2_3x3_reduce", "conv2_3x3"):
        unit(name, name)
    for name, spec in INCEPTION_SPECS.items():
        branches = (["1x1"] if spec.n1x1 else []) + ["3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1",
                                                     "double_3x3_2"] + (["pool_proj"] if spec.pool_proj else [])
        for b in branches:
            unit(f"inception_{name}_{b}", f"inception/{name}/conv_{b}")
    if num_classes is not None:
        out["last_linear.weight"] = "last_linear/kernel"
        out["last_linear.bias"] = "last_linear/bias"
    return out
