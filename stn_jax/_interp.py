"""Interpolation primitives behind `grid_sample`: the gather side and its transpose.

Two JAX primitives, closed under differentiation, so forward and reverse mode
work to any order (gradient penalties, Hessians):

* ``interp_p(flat, *coords)`` reads a flattened channels-last image at points:
  ``out[m, p, c] = sum_k flat[offset_m + idx_k(m, p) + c] * w_k(m, p)``, where
  ``w_k`` is the product over spatial axes of a 1-D kernel factor, or of its
  derivative for the axes whose ``orders`` entry is 1.
* ``spread_p(ct, *coords)`` is its transpose in ``flat``: a scatter-add of
  ``ct * w_k`` into a zero image (the image gradient of the sampler).

Shapes: ``flat`` is ``(L,)``, the channels-last images ``(N, *spatial, C)``
raveled; each coordinate array is ``(M, P)``, one row of ``P`` points per
sampled image, in pixel units (pixel ``i`` has centre ``i``; axis order is
fastest-varying first: x, y[, z]); ``offsets[m]`` is where row ``m``'s image
starts in ``flat``. Outputs are in the coordinates' dtype (float32 unless
float64 is enabled), whatever the image dtype.

Kernels (per axis, point ``x``, image size ``s``):

* ``linear``: taps at ``c = clip(floor(x), 0, s - 2)`` and ``c + 1``, weights
  ``max(0, 1 - |x - tap|)``; pixels outside the image contribute nothing
  (zero padding blended per corner, as in PyTorch). The derivative is the
  right derivative (PyTorch's convention at integer coordinates).
* ``nearest``: one tap at ``round(x)`` (half to even, as ``std::nearbyint``),
  weight 1 inside the image and 0 outside; the derivative is zero.

NaN coordinates read nothing (output 0, gradient 0). The integer cell ``c`` is
computed once and passed through a fusion barrier, so every gather, scatter
and weight derives from the same value (see ``_cells``).
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_PROMISE = lax.GatherScatterMode.PROMISE_IN_BOUNDS
_NOT_MAPPED = None  # how batching rules mark an unmapped operand
KERNELS = ("linear", "nearest")


# --------------------------------------------------------------------------
# Pure-JAX implementation (the lowering on every platform).
# --------------------------------------------------------------------------


def _fusion_barrier(xs: list[jax.Array], probe: jax.Array) -> list[jax.Array]:
    """Returns ``xs`` unchanged, computed exactly once.

    XLA duplicates cheap elementwise producers into each consumer fusion (and
    XLA:CPU drops ``optimization_barrier``). If the floor of a coordinate were
    recomputed in two fusions, FMA contraction can round the coordinate
    differently in each, so a gather index and its weight would come from
    neighbouring pixels: errors of a whole pixel value at isolated points
    (the float32 trap in docs/sampler.md). A one-trip while loop whose trip
    count XLA cannot see is a buffer boundary on every backend. The count
    comes from a float ``probe`` (``x == x`` cannot be folded: NaN); whatever
    it is, the loop returns its input.
    """
    first = probe.reshape(-1)[:1]
    trips = (first == first).astype(jnp.int32).sum()

    def body(carry):
        i, vals = carry
        return i + 1, [jnp.where(i < 0, v + 1, v) for v in vals]

    return lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), list(xs)))[1]


def _linear_factor(u: jax.Array, order: int) -> jax.Array:
    """Tent weight ``max(0, 1 - |u|)`` (order 0) or its right derivative (order 1)."""
    if order == 0:
        return jnp.maximum(0.0, 1.0 - jnp.abs(u))
    one = jnp.ones_like(u)
    return jnp.where((u >= -1) & (u < 0), one, jnp.where((u >= 0) & (u < 1), -one, 0 * one))


def _taps(coords, sizes, kernel, orders):
    """Per axis: the cell (int32, after the barrier) and a list of (tap, factor)."""
    xs = [jnp.where(jnp.isnan(x), -2.0, x).astype(x.dtype) for x in coords]
    if kernel == "linear":
        cells = [jnp.clip(jnp.floor(x), 0, max(s - 2, 0)).astype(jnp.int32) for x, s in zip(xs, sizes)]
    else:
        cells = [jnp.clip(jnp.round(x), 0, s - 1).astype(jnp.int32) for x, s in zip(xs, sizes)]
    cells = _fusion_barrier(cells, coords[0])
    taps = []
    for x, c, s, order in zip(xs, cells, sizes, orders):
        t = x - c.astype(x.dtype)  # exact; the offset of x from its own cell
        if kernel == "linear":
            taps.append([(k, _linear_factor(t - k, order)) for k in range(min(s, 2))])
        elif order == 0:
            r = jnp.round(x)
            taps.append([(0, ((r >= 0) & (r <= s - 1)).astype(x.dtype))])
        else:
            taps.append([(0, jnp.zeros_like(x))])
    return cells, taps


def _strides(sizes: Sequence[int], channels: int) -> list[int]:
    return [channels * int(np.prod(sizes[:a])) for a in range(len(sizes))]


def _corners(coords, sizes, offsets, channels, kernel, orders):
    """Yields (flat index of channel 0, weight), each (M, P), for every corner."""
    cells, taps = _taps(coords, sizes, kernel, orders)
    strides = _strides(sizes, channels)
    base = sum(c * s for c, s in zip(cells, strides)) + jnp.asarray(offsets, jnp.int32)[:, None]
    for corner in itertools.product(*taps):
        shift = sum(k * s for (k, _), s in zip(corner, strides))
        weight = functools.reduce(lambda a, b: a * b, [f for _, f in corner])
        yield base + shift, weight


def _interp_impl(flat, *coords, sizes, offsets, channels, kernel, orders):
    dtype = coords[0].dtype
    dn = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    out = [jnp.zeros(coords[0].shape, dtype)] * channels
    for idx, weight in _corners(coords, sizes, offsets, channels, kernel, orders):
        for ch in range(channels):
            v = lax.gather(flat, (idx + ch)[..., None], dn, (1,), mode=_PROMISE)
            out[ch] = out[ch] + v.astype(dtype) * weight
    return jnp.stack(out, -1)


def _spread_impl(ct, *coords, sizes, offsets, channels, kernel, orders, length):
    dn = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,))
    idx, upd = [], []
    for i, weight in _corners(coords, sizes, offsets, channels, kernel, orders):
        idx.append(i[..., None] + jnp.arange(channels, dtype=jnp.int32))
        upd.append(ct * weight[..., None])
    idx = jnp.stack(idx, -2)  # (M, P, K, C): one scatter for all corners and channels
    upd = jnp.stack(upd, -2)
    return lax.scatter_add(jnp.zeros((length,), ct.dtype), idx[..., None], upd, dn, mode=_PROMISE)


# --------------------------------------------------------------------------
# Primitives: abstract evaluation, eager impl, lowering.
# --------------------------------------------------------------------------

interp_p = Primitive("stn_interp")
spread_p = Primitive("stn_spread")


@interp_p.def_abstract_eval
def _interp_abstract(flat, *coords, sizes, offsets, channels, kernel, orders):
    m, p = coords[0].shape
    return jax.core.ShapedArray((m, p, channels), coords[0].dtype)


@spread_p.def_abstract_eval
def _spread_abstract(ct, *coords, sizes, offsets, channels, kernel, orders, length):
    return jax.core.ShapedArray((length,), ct.dtype)


@functools.lru_cache(maxsize=None)
def _jitted_bind(prim, params):
    return jax.jit(lambda *args: prim.bind(*args, **dict(params)))


def _eager(prim):
    return lambda *args, **params: _jitted_bind(prim, tuple(sorted(params.items())))(*args)


interp_p.def_impl(_eager(interp_p))
spread_p.def_impl(_eager(spread_p))
mlir.register_lowering(interp_p, mlir.lower_fun(_interp_impl, multiple_results=False))
mlir.register_lowering(spread_p, mlir.lower_fun(_spread_impl, multiple_results=False))


# --------------------------------------------------------------------------
# Differentiation: each primitive's derivative is the other, or itself with
# one more derivative order on an axis (the kernel's second derivative is 0).
# --------------------------------------------------------------------------


def _raise(orders, axis):
    return tuple(o + (a == axis) for a, o in enumerate(orders))


def _coord_terms(params):
    """Axes whose derivative is non-zero: linear kernel, not yet differentiated."""
    if params["kernel"] != "linear":
        return []
    return [a for a, o in enumerate(params["orders"]) if o == 0]


def _zero_if_symbolic(t, like):
    return jnp.zeros(like.shape, like.dtype) if type(t) is ad.Zero else t


def _interp_jvp(primals, tangents, **params):
    flat, *coords = primals
    tflat, *tcoords = tangents
    out = interp_p.bind(flat, *coords, **params)
    tout = jnp.zeros_like(out)
    if type(tflat) is not ad.Zero:
        tout = tout + interp_p.bind(tflat, *coords, **params)
    for a in _coord_terms(params):
        if type(tcoords[a]) is not ad.Zero:
            deriv = interp_p.bind(flat, *coords, **{**params, "orders": _raise(params["orders"], a)})
            tout = tout + deriv * tcoords[a][..., None]
    return out, tout


def _spread_jvp(primals, tangents, **params):
    ct, *coords = primals
    tct, *tcoords = tangents
    out = spread_p.bind(ct, *coords, **params)
    tout = jnp.zeros_like(out)
    if type(tct) is not ad.Zero:
        tout = tout + spread_p.bind(tct, *coords, **params)
    for a in _coord_terms(params):
        if type(tcoords[a]) is not ad.Zero:
            raised = {**params, "orders": _raise(params["orders"], a)}
            tout = tout + spread_p.bind(ct * tcoords[a][..., None], *coords, **raised)
    return out, tout


def _interp_transpose(ct, flat, *coords, **params):
    if any(ad.is_undefined_primal(c) for c in coords):
        raise ValueError("stn_interp is not linear in its coordinates")
    if type(ct) is ad.Zero:
        return (None,) + (None,) * len(coords)
    length = flat.aval.shape[0]
    g = spread_p.bind(ct, *coords, **params, length=length).astype(flat.aval.dtype)
    return (g,) + (None,) * len(coords)


def _spread_transpose(ct, ctin, *coords, length, **params):
    if any(ad.is_undefined_primal(c) for c in coords):
        raise ValueError("stn_spread is not linear in its coordinates")
    if type(ct) is ad.Zero:
        return (None,) + (None,) * len(coords)
    g = interp_p.bind(ct, *coords, **params).astype(ctin.aval.dtype)
    return (g,) + (None,) * len(coords)


ad.primitive_jvps[interp_p] = _interp_jvp
ad.primitive_jvps[spread_p] = _spread_jvp
ad.primitive_transposes[interp_p] = _interp_transpose
ad.primitive_transposes[spread_p] = _spread_transpose


# --------------------------------------------------------------------------
# Batching (jax.vmap): fold the mapped axis into the rows (M) and, when the
# image is mapped too, into the flat image. An unmapped image is never copied:
# every row just points at it.
# --------------------------------------------------------------------------


def _fold_coords(coords, dims, size):
    out = []
    for c, d in zip(coords, dims):
        c = jnp.broadcast_to(c, (size,) + c.shape) if d is _NOT_MAPPED else jnp.moveaxis(c, d, 0)
        out.append(c.reshape((-1,) + c.shape[2:]))
    return out


def _folded_offsets(offsets, size, length, image_mapped):
    step = length if image_mapped else 0
    return tuple(b * step + o for b in range(size) for o in offsets)


def _interp_batch(args, dims, **params):
    flat, *coords = args
    fdim, *cdims = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    length = flat.shape[-1] if fdim is _NOT_MAPPED else flat.shape[1 - fdim]
    if fdim is not _NOT_MAPPED:
        flat = jnp.moveaxis(flat, fdim, 0).reshape(-1)
    offsets = _folded_offsets(params["offsets"], size, length, fdim is not _NOT_MAPPED)
    out = interp_p.bind(flat, *_fold_coords(coords, cdims, size), **{**params, "offsets": offsets})
    return out.reshape((size, -1) + out.shape[1:]), 0


def _spread_batch(args, dims, **params):
    ct, *coords = args
    ctdim, *cdims = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    ct = jnp.broadcast_to(ct, (size,) + ct.shape) if ctdim is _NOT_MAPPED else jnp.moveaxis(ct, ctdim, 0)
    ct = ct.reshape((-1,) + ct.shape[2:])
    length = params["length"]
    offsets = _folded_offsets(params["offsets"], size, length, True)
    out = spread_p.bind(ct, *_fold_coords(coords, cdims, size), **{**params, "offsets": offsets, "length": size * length})
    return out.reshape(size, length), 0


batching.primitive_batchers[interp_p] = _interp_batch
batching.primitive_batchers[spread_p] = _spread_batch


# --------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------


def interpolate(flat, coords, *, sizes, offsets, channels, kernel="linear"):
    """Samples ``flat`` at ``coords`` (see module docstring); returns ``(M, P, C)``.

    Args:
      flat: ``(L,)`` raveled channels-last images, any float dtype.
      coords: sequence of ``D`` arrays ``(M, P)`` in pixel units, x first.
      sizes: spatial sizes per coordinate axis, x first (``(W, H)`` or ``(W, H, D)``).
      offsets: ``M`` Python ints, the start of each row's image in ``flat``.
      channels: ``C``.
      kernel: ``"linear"`` or ``"nearest"``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if flat.size >= 2**31:
        raise ValueError(
            f"the images hold {flat.size} elements; the sampler indexes with int32 "
            "(at most 2**31 - 1): sample the batch in chunks")
    params = dict(sizes=tuple(int(s) for s in sizes), offsets=tuple(int(o) for o in offsets),
                  channels=int(channels), kernel=kernel, orders=(0,) * len(coords))
    return interp_p.bind(flat, *coords, **params)
