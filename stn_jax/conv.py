"""2-D convolution as a patch matrix times the kernel: faster than XLA:CPU's convolutions on large kernels.

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated` and
plugs into Flax::

    nnx.Conv(c_in, c_out, (9, 9), conv_general_dilated=stn_jax.conv.conv_general_dilated, rngs=rngs)

When the computation is lowered for the CPU, a float32 convolution in
channels-last layout (``NHWC`` input, ``HWIO`` kernel) with no dilation and
one feature group is computed as ``patches(x) @ kernel.reshape(-1, O)``: the
image's ``KH x KW`` windows copied into the rows of a matrix (`patches`,
"im2col") and one matrix product. Its gradients are two more matrix products
and the transpose of `patches` (`unpatches`, a sum over overlapping windows).
On the paper's distorted-MNIST CNN (9x9 and 7x7 kernels, 86 filters) a training
step takes 57 % of the time it takes with XLA:CPU's own convolutions, whose
backward pass is slow on these shapes (docs/benchmarks.md). On GPU and TPU, for other
dtypes, layouts or options, and when the patch matrix would exceed
`MAX_PATCH_BYTES`, the call is `jax.lax.conv_general_dilated` itself. The two
paths agree to float32 rounding (tests/test_conv.py).

Depthwise convolutions (``feature_group_count`` = input channels = output
channels, an ``HWIO`` kernel of shape ``(KH, KW, 1, C)``; EfficientNet's) are
computed on the CPU, under the same dtype, layout and dilation conditions, as a
sum over the ``KH x KW`` taps of strided slices of the padded input times the
tap's per-channel weights: element-wise work that XLA fuses, where XLA:CPU's
grouped convolution and above all its gradients are slow (EfficientNet-Lite0's
training step, docs/benchmarks.md).

`patches` and `unpatches` are JAX primitives: on CPU, float32 ones run native
kernels (``stn_jax/_native/patches.cc``, plain copies and adds split over
XLA's thread pool, bit-identical from run to run); elsewhere, and when the
native build is unavailable, a pure-XLA lowering with the same semantics. They
differentiate (each is the other's transpose) and vmap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from stn_jax import _native
from stn_jax._interp import _eager

__all__ = ["MAX_PATCH_BYTES", "conv_general_dilated", "patches", "unpatches"]

MAX_PATCH_BYTES = 2**31
"""Largest patch matrix (bytes) the CPU path builds; bigger convolutions use ``lax.conv_general_dilated``.

The matrix holds ``KH * KW`` copies of the (padded) input, and the backward pass
keeps it: for a 7x7 kernel on 256 images of 17x17x86 that is 522 MB.
"""

_NHWC = ("NHWC", "HWIO", "NHWC")

patches_p = Primitive("stn_patches")
unpatches_p = Primitive("stn_unpatches")


def _out_size(n: int, k: int, s: int) -> int:
    return (n - k) // s + 1


def _patches_xla(x, *, kernel, strides):
    b, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, strides
    oh, ow = _out_size(h, kh, sh), _out_size(w, kw, sw)
    windows = [lax.slice(x, (0, i, j, 0), (b, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c), (1, sh, sw, 1))
               for i in range(kh) for j in range(kw)]
    return jnp.stack(windows, axis=3).reshape(b, oh, ow, kh * kw * c)


def _unpatches_xla(p, *, kernel, strides, image_shape):
    image = jax.ShapeDtypeStruct((p.shape[0], *image_shape), p.dtype)
    (x,) = jax.linear_transpose(functools.partial(_patches_xla, kernel=kernel, strides=strides), image)(p)
    return x


def _patches_shape(x, kernel, strides):
    if x.ndim != 4:
        raise ValueError(f"patches: expected (B, H, W, C) images, got shape {x.shape}")
    b, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, strides
    if h < kh or w < kw:
        raise ValueError(f"patches: a {kh}x{kw} kernel does not fit images of {h}x{w}")
    return (b, _out_size(h, kh, sh), _out_size(w, kw, sw), kh * kw * c)


def _patches_abstract(x, *, kernel, strides):
    return jax.core.ShapedArray(_patches_shape(x, kernel, strides), x.dtype)


def _unpatches_abstract(p, *, kernel, strides, image_shape):
    expected = _patches_shape(jax.core.ShapedArray((p.shape[0], *image_shape), p.dtype), kernel, strides)
    if p.shape != expected:
        raise ValueError(f"unpatches: patches of shape {p.shape} do not match images {image_shape} "
                         f"with kernel {kernel} and strides {strides} (expected {expected})")
    return jax.core.ShapedArray((p.shape[0], *image_shape), p.dtype)


patches_p.def_abstract_eval(_patches_abstract)
unpatches_p.def_abstract_eval(_unpatches_abstract)
patches_p.def_impl(_eager(patches_p))
unpatches_p.def_impl(_eager(unpatches_p))

_xla_rules = {patches_p: mlir.lower_fun(_patches_xla, multiple_results=False),
              unpatches_p: mlir.lower_fun(_unpatches_xla, multiple_results=False)}


def _cpu_rule(prim, target):
    """The native kernel for float32 when it is built, else the XLA lowering."""

    def rule(ctx, operand, *, kernel, strides, **rest):
        empty = any(math.prod(a.shape) == 0 for a in (*ctx.avals_in, *ctx.avals_out))
        if empty or ctx.avals_in[0].dtype != np.float32 or not _native.available():
            return _xla_rules[prim](ctx, operand, kernel=kernel, strides=strides, **rest)
        return jax.ffi.ffi_lowering(target)(ctx, operand, kernel=np.asarray(kernel, np.int64),
                                            strides=np.asarray(strides, np.int64))

    return rule


for _prim, _target in ((patches_p, "stn_patches_f32"), (unpatches_p, "stn_unpatches_f32")):
    mlir.register_lowering(_prim, _xla_rules[_prim])
    mlir.register_lowering(_prim, _cpu_rule(_prim, _target), platform="cpu")


def _patches_transpose(ct, x, *, kernel, strides):
    return [unpatches_p.bind(ct, kernel=kernel, strides=strides, image_shape=tuple(x.aval.shape[1:]))]


def _unpatches_transpose(ct, p, *, kernel, strides, image_shape):
    return [patches_p.bind(ct, kernel=kernel, strides=strides)]


ad.deflinear2(patches_p, _patches_transpose)
ad.deflinear2(unpatches_p, _unpatches_transpose)


def _fold_batch(prim):
    """vmap rule: the mapped axis joins the image axis (both primitives act image by image)."""

    def rule(args, dims, **params):
        (x,), (d,) = args, dims
        x = jnp.moveaxis(x, d, 0)
        out = prim.bind(x.reshape(-1, *x.shape[2:]), **params)
        return out.reshape(x.shape[:2] + out.shape[1:]), 0

    return rule


batching.primitive_batchers[patches_p] = _fold_batch(patches_p)
batching.primitive_batchers[unpatches_p] = _fold_batch(unpatches_p)


def _pair(v, name: str) -> tuple[int, int]:
    v = (v, v) if isinstance(v, int) else tuple(int(s) for s in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v}")
    return v


def patches(x: jax.Array, kernel: int | Sequence[int], strides: int | Sequence[int] = 1) -> jax.Array:
    """The ``KH x KW`` windows of channels-last images as rows ("im2col"), without padding.

    Args:
      x: ``(B, H, W, C)`` images.
      kernel, strides: window size and step ``(KH, KW)``, ``(SH, SW)`` (an int for both axes).

    Returns:
      ``(B, OH, OW, KH * KW * C)`` with ``OH = (H - KH) // SH + 1`` (likewise ``OW``) and
      ``out[b, y, x, (i * KW + j) * C + c] = x[b, y * SH + i, x * SW + j, c]``: the order of
      an ``HWIO`` kernel reshaped to ``(KH * KW * C, O)``.
    """
    x = jnp.asarray(x)
    return patches_p.bind(x, kernel=_pair(kernel, "kernel"), strides=_pair(strides, "strides"))


def unpatches(p: jax.Array, image_shape: Sequence[int], kernel: int | Sequence[int],
              strides: int | Sequence[int] = 1) -> jax.Array:
    """The transpose of `patches`: ``(B, OH, OW, KH * KW * C)`` -> ``(B, H, W, C)``, overlaps summed.

    ``image_shape`` is ``(H, W, C)`` (needed with strides, where several sizes give the same windows).
    """
    p = jnp.asarray(p)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise ValueError(f"unpatches: image_shape must be (H, W, C), got {image_shape}")
    return unpatches_p.bind(p, kernel=_pair(kernel, "kernel"), strides=_pair(strides, "strides"), image_shape=shape)


def _patch_path_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, extra) -> bool:
    if feature_group_count != 1 or not _cpu_form_applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                                                         batch_group_count, extra):
        return False
    kh, kw, c, _ = rhs.shape
    pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding) if isinstance(padding, str) \
        else padding
    h, w = (n + lo + hi for n, (lo, hi) in zip(lhs.shape[1:3], pads))
    if h < kh or w < kw or min(lo for pair in pads for lo in pair) < 0:
        return False
    rows = lhs.shape[0] * _out_size(h, kh, window_strides[0]) * _out_size(w, kw, window_strides[1])
    return rows * kh * kw * c * 4 <= MAX_PATCH_BYTES


def _patch_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type):
    kh, kw, c, o = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    if any(lo or hi for lo, hi in padding):
        lhs = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    cols = patches(lhs, (kh, kw), window_strides)
    return jnp.dot(cols, rhs.reshape(kh * kw * c, o), precision=precision,
                   preferred_element_type=preferred_element_type)


def _cpu_form_applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, batch_group_count, extra) -> bool:
    """What both CPU paths need: 2-D float32 NHWC/HWIO, no dilation, one batch group, no other options."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if batch_group_count != 1 or any(v is not None for v in extra.values()):
        return False
    if any(d != 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1)))):
        return False
    if dimension_numbers is None or (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                                     != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return False
    return True


def _depthwise_path_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count, batch_group_count, extra) -> bool:
    if not _cpu_form_applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, batch_group_count, extra):
        return False
    kh, kw, i, o = rhs.shape
    if not (feature_group_count == lhs.shape[3] == o > 1 and i == 1):
        return False
    pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding) if isinstance(padding, str) \
        else padding
    h, w = (n + lo + hi for n, (lo, hi) in zip(lhs.shape[1:3], pads))
    return h >= kh and w >= kw and min(lo for pair in pads for lo in pair) >= 0


def _depthwise_conv(lhs, rhs, window_strides, padding):
    kh, kw, _, c = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    if any(lo or hi for lo, hi in padding):
        lhs = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    b, h, w, _ = lhs.shape
    (sh, sw), oh, ow = window_strides, _out_size(h, kh, window_strides[0]), _out_size(w, kw, window_strides[1])
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(lhs, (0, i, j, 0), (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                            (1, sh, sw, 1)) * rhs[i, j, 0]
            out = tap if out is None else out + tap
    return out


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **extra):
    """`jax.lax.conv_general_dilated`, computed as patches x kernel (or per tap) on CPU where that applies.

    Same arguments and result. Both CPU paths need 2-D ``NHWC``/``HWIO``/``NHWC``
    dimension numbers, float32 operands, no dilation, one batch group and
    non-negative padding. The patch path needs one feature group and a patch matrix
    of at most `MAX_PATCH_BYTES`; the per-tap path a depthwise convolution
    (``feature_group_count`` = input channels = output channels > 1). Otherwise, and
    when lowered for any platform but the CPU, this is ``lax.conv_general_dilated``.
    """
    window_strides = tuple(window_strides)
    lax_conv = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        **extra)
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, extra)
    if _depthwise_path_applies(*args):
        depthwise = functools.partial(_depthwise_conv, window_strides=window_strides, padding=padding)
        return lax.platform_dependent(lhs, rhs, cpu=depthwise, default=lax_conv)
    if not _patch_path_applies(*args):
        return lax_conv(lhs, rhs)
    patch_conv = functools.partial(_patch_conv, window_strides=window_strides, padding=padding, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return lax.platform_dependent(lhs, rhs, cpu=patch_conv, default=lax_conv)
