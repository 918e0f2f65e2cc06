"""Pieces shared by the backbones: the output tuple, PyTorch-compatible pooling, BatchNorm defaults.

Everything is channels-last (NHWC).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from stn_jax.conv import conv_general_dilated
from stn_jax.layers import tree_maximum

__all__ = ["BackboneOutput", "max_pool", "avg_pool_3x3_count_pad", "global_avg_pool", "batch_norm",
           "conv", "torch_momentum"]


class BackboneOutput(NamedTuple):
    """What a backbone returns.

    Attributes:
      feature_map: ``(B, h, w, F)``: the last feature map, before the global pooling (the
        localisation network of the CUB ST-CNN uses it).
      features: ``(B, F)``: its spatial mean (the global average pool).
      logits: ``(B, num_classes)`` from the ImageNet classifier (dropout applied in training mode
        where the architecture has one), or ``None`` for a backbone built with ``num_classes=None``.
    """

    feature_map: jax.Array
    features: jax.Array
    logits: jax.Array | None


def torch_momentum(momentum: float) -> float:
    """Flax's BatchNorm momentum (weight of the old running value) for PyTorch's ``momentum``."""
    return 1.0 - momentum


def conv(cin: int, cout: int, kernel: int, **kwargs) -> nnx.Conv:
    """``nnx.Conv(cin, cout, (kernel, kernel), **kwargs)`` computed by `stn_jax.conv.conv_general_dilated`.

    On the CPU that is a patch matrix times the kernel (per tap for depthwise kernels); under `nnx.vmap`
    (the stacked part networks of `stn_jax.paper.models.cub`) a batched matrix product, where XLA:CPU's
    own convolution becomes a grouped convolution that made a BN-Inception 2xST-CNN step 8x its CNN's.
    """
    return nnx.Conv(cin, cout, (kernel, kernel), conv_general_dilated=conv_general_dilated, **kwargs)


def batch_norm(features: int, *, epsilon: float, momentum: float, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """A channels-last `nnx.BatchNorm` in training mode (``model.eval()`` switches to running statistics).

    ``momentum`` is Flax's (the weight of the old running value, ``1 - torch momentum``). The exact
    two-pass variance is used (``use_fast_variance=False``), as PyTorch does. As in every Flax
    BatchNorm, the running variance is updated with the biased batch variance; PyTorch uses the
    unbiased one (a factor ``n / (n - 1)``, ``n`` = batch x height x width, on the update only).
    """
    return nnx.BatchNorm(features, use_running_average=False, momentum=momentum, epsilon=epsilon,
                         use_fast_variance=False, dtype=dtype, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, *, padding: int = 0, ceil: bool = False) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding, ceil_mode=ceil)`` on ``(B, H, W, C)``.

    Padding is with ``-inf``. In ceil mode the output has ``ceil((n + 2p - k) / s) + 1`` positions,
    less one when the last window would start in the right/bottom padding (PyTorch's rule); the
    extra windows read ``-inf`` beyond the border, so they take the maximum of the pixels present.
    """
    pads = []
    for n in x.shape[1:3]:
        span = n + 2 * padding - window
        out = (-(-span // stride) if ceil else span // stride) + 1
        if ceil and (out - 1) * stride >= n + padding:
            out -= 1
        if out < 1:
            raise ValueError(f"max_pool: spatial size {x.shape[1:3]} (padding {padding}) gives no {window}x{window} "
                             f"window at stride {stride}{' in ceil mode' if ceil else ''}")
        pads.append((padding, (out - 1) * stride + window - n - padding))
    return tree_maximum(_window_views(x, window, stride, pads, -jnp.inf))


def avg_pool_3x3_count_pad(x: jax.Array) -> jax.Array:
    """``torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)`` on ``(B, H, W, C)``.

    Every window is divided by 9, zeros of the padding included (ceil mode changes nothing at
    stride 1).
    """
    return sum(_window_views(x, 3, 1, [(1, 1), (1, 1)], 0.0)) / 9.0


def _window_views(x: jax.Array, window: int, stride: int, pads, fill: float) -> list[jax.Array]:
    """The ``window ** 2`` strided views of the padded ``x`` whose element-wise reduction pools it.

    ``pads`` are ``(low, high)`` per spatial axis, filled with ``fill``; a negative ``high`` crops.

    View ``(i, j)`` holds, at output position ``(y, x)``, the pixel at offset ``(i, j)`` of that
    window. Reducing views (pairwise maxima, a sum) fuses into one pass and differentiates into
    element-wise work, where ``reduce_window``'s gradient (``select_and_scatter``) is slow on CPU.
    """
    x = x[:, :x.shape[1] + min(pads[0][1], 0), :x.shape[2] + min(pads[1][1], 0)]
    x = jnp.pad(x, [(0, 0), *((lo, max(hi, 0)) for lo, hi in pads), (0, 0)], constant_values=fill)
    b, h, w, c = x.shape
    oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    return [jax.lax.slice(x, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                          (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``(B, h, w, C) -> (B, C)``: the spatial mean."""
    return x.mean(axis=(1, 2))
