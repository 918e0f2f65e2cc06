"""Interpolation primitives behind `grid_sample`: the gather side and its transpose.

Two JAX primitives, closed under differentiation, so forward and reverse mode
work to any order (gradient penalties, Hessians):

* ``interp_p(flat, *coords)`` reads a flattened channels-last image at points,
  once per entry of ``orders``:
  ``out[j, m, p, c] = sum_k flat[offset_m + idx_k(m, p) + c] * w_jk(m, p)``,
  where ``w_jk`` is the product over spatial axes of a 1-D kernel factor
  (order 0) or of its derivative (order 1), as ``orders[j]`` says per axis.
  Values and derivatives come from one pass over the same taps.
* ``spread_p(ct, *coords)`` is its transpose in ``flat``: a scatter-add of
  ``sum_j ct[j] * w_jk`` into a zero image (the image gradient).

Shapes: ``flat`` is ``(L,)``, the channels-last images ``(N, *spatial, C)``
raveled; each coordinate array is ``(M, P)``, one row of ``P`` points per
sampled image, in pixel units (pixel ``i`` has centre ``i``; axis order is
fastest-varying first: x, y[, z]); ``offsets[m]`` is where row ``m``'s image
starts in ``flat``; ``out`` and ``ct`` are ``(len(orders), M, P, C)`` in the
coordinates' dtype (float32 unless float64 is enabled), whatever the image
dtype.

Kernels (per axis, point ``x``, image size ``s``):

* ``linear``: taps at ``c = clip(floor(x), 0, s - 2)`` and ``c + 1``, weights
  ``max(0, 1 - |x - tap|)``; pixels outside the image contribute nothing
  (zero padding blended per corner, as in PyTorch). The derivative is the
  right derivative (PyTorch's convention at integer coordinates); the second
  derivative along an axis is zero.
* ``nearest``: one tap at ``round(x)`` (half to even, as ``std::nearbyint``),
  weight 1 inside the image and 0 outside; the derivative is zero.

NaN coordinates read nothing (output 0, gradient 0). The integer cell ``c`` is
computed once and passed through a fusion barrier, so every gather, scatter
and weight derives from the same value (see ``_fusion_barrier``).

Indices are int32, so the images of one problem (``flat``, whatever vmap
folds into it, and the image gradient) hold at most `MAX_ELEMENTS`; the entry
point and the batching rules raise ValueError beyond that, on static shapes.
Empty problems (no rows, points or channels) lower to zeros.

On CPU, float32 problems run native kernels (``stn_jax/_native``) unless
``STN_JAX_CPU_SAMPLER=xla`` (or `stn_jax.use_cpu_sampler("xla")`), with one
exception: reading a single-channel image's values alone stays with the XLA
lowering, whose fused gathers are 2-4x faster there (docs/sampler.md).
Everywhere else the pure-JAX lowering below runs.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from stn_jax import _native

_PROMISE = lax.GatherScatterMode.PROMISE_IN_BOUNDS
_NOT_MAPPED = None  # how batching rules mark an unmapped operand
KERNELS = ("linear", "nearest")
MAX_ELEMENTS = 2**31 - 1  # int32 indices: the most elements the images of one problem may hold


def check_length(length: int, what: str) -> None:
    """Raises ValueError when ``length`` image elements cannot be indexed with int32."""
    if length > MAX_ELEMENTS:
        raise ValueError(
            f"{what} hold {length} elements in all; one sampler call may hold at most 2**31 - 1 = "
            f"{MAX_ELEMENTS} (the sampler indexes with int32): sample the batch in chunks")


# --------------------------------------------------------------------------
# Pure-JAX implementation (the lowering on every platform but CPU-native).
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


def _axis_taps(coords, sizes, kernel, needed):
    """Per axis: the cell (int32, computed once) and ``{(tap, order): factor}``."""
    xs = [jnp.where(jnp.isnan(x), -2.0, x).astype(x.dtype) for x in coords]
    if kernel == "linear":
        cells = [jnp.clip(jnp.floor(x), 0, max(s - 2, 0)).astype(jnp.int32) for x, s in zip(xs, sizes)]
    else:
        cells = [jnp.clip(jnp.round(x), 0, s - 1).astype(jnp.int32) for x, s in zip(xs, sizes)]
    cells = _fusion_barrier(cells, coords[0])
    factors = []
    for a, (x, c, s) in enumerate(zip(xs, cells, sizes)):
        t = x - c.astype(x.dtype)  # exact: the offset of x from its own cell
        taps = range(min(s, 2)) if kernel == "linear" else range(1)
        f = {}
        for k in taps:
            for order in needed[a]:
                if kernel == "linear":
                    f[k, order] = _linear_factor(t - k, order)
                elif order == 0:
                    r = jnp.round(x)
                    f[k, order] = ((r >= 0) & (r <= s - 1)).astype(x.dtype)
                else:
                    f[k, order] = jnp.zeros_like(x)
        factors.append(f)
    return cells, factors


def _corners(coords, sizes, offsets, channels, kernel, orders):
    """Yields (flat index of channel 0, [weight per order]), each (M, P), for every corner."""
    ndim = len(coords)
    needed = [sorted({o[a] for o in orders}) for a in range(ndim)]
    cells, factors = _axis_taps(coords, sizes, kernel, needed)
    strides = [channels * int(np.prod(sizes[:a])) for a in range(ndim)]
    base = sum(c * s for c, s in zip(cells, strides)) + jnp.asarray(offsets, jnp.int32)[:, None]
    taps = [sorted({k for k, _ in f}) for f in factors]
    for corner in itertools.product(*taps):
        shift = sum(k * s for k, s in zip(corner, strides))
        weights = [functools.reduce(lambda p, q: p * q, [factors[a][k, o[a]] for a, k in enumerate(corner)])
                   for o in orders]
        yield base + shift, weights


def _interp_impl(flat, *coords, sizes, offsets, channels, kernel, orders, cpu_impl):
    dtype = coords[0].dtype
    if coords[0].size == 0 or channels == 0:
        return jnp.zeros((len(orders),) + coords[0].shape + (channels,), dtype)
    dn = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    out = [[jnp.zeros(coords[0].shape, dtype)] * channels for _ in orders]
    for idx, weights in _corners(coords, sizes, offsets, channels, kernel, orders):
        for ch in range(channels):
            v = lax.gather(flat, (idx + ch)[..., None], dn, (1,), mode=_PROMISE).astype(dtype)
            for j, w in enumerate(weights):
                out[j][ch] = out[j][ch] + v * w
    return jnp.stack([jnp.stack(o, -1) for o in out])


def _spread_impl(ct, *coords, sizes, offsets, channels, kernel, orders, cpu_impl, length):
    if ct.size == 0 or length == 0:
        return jnp.zeros((length,), ct.dtype)
    dn = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                     scatter_dims_to_operand_dims=(0,))
    idx, upd = [], []
    for i, weights in _corners(coords, sizes, offsets, channels, kernel, orders):
        idx.append(i[..., None] + jnp.arange(channels, dtype=jnp.int32))
        upd.append(sum(ct[j] * w[..., None] for j, w in enumerate(weights)))
    idx = jnp.stack(idx, -2)  # (M, P, K, C): one scatter for all corners and channels
    upd = jnp.stack(upd, -2)
    return lax.scatter_add(jnp.zeros((length,), ct.dtype), idx[..., None], upd, dn, mode=_PROMISE)


# --------------------------------------------------------------------------
# Primitives: abstract evaluation, eager impl, lowering.
# --------------------------------------------------------------------------

interp_p = Primitive("stn_interp")
spread_p = Primitive("stn_spread")


@interp_p.def_abstract_eval
def _interp_abstract(flat, *coords, sizes, offsets, channels, kernel, orders, cpu_impl):
    m, p = coords[0].shape
    return jax.core.ShapedArray((len(orders), m, p, channels), coords[0].dtype)


@spread_p.def_abstract_eval
def _spread_abstract(ct, *coords, sizes, offsets, channels, kernel, orders, cpu_impl, length):
    return jax.core.ShapedArray((length,), ct.dtype)


@functools.cache
def _jitted_bind(prim, params):
    return jax.jit(lambda *args: prim.bind(*args, **dict(params)))


def _eager(prim):
    return lambda *args, **params: _jitted_bind(prim, tuple(sorted(params.items())))(*args)


interp_p.def_impl(_eager(interp_p))
spread_p.def_impl(_eager(spread_p))
_xla_interp = mlir.lower_fun(_interp_impl, multiple_results=False)
_xla_spread = mlir.lower_fun(_spread_impl, multiple_results=False)
mlir.register_lowering(interp_p, _xla_interp)
mlir.register_lowering(spread_p, _xla_spread)


def _cpu_lowering(name: str, xla_rule):
    """Native kernel for float32 on CPU when chosen and available, else the XLA lowering."""

    def rule(ctx, *args, sizes, offsets, channels, kernel, orders, cpu_impl, **rest):
        params = dict(sizes=sizes, offsets=offsets, channels=channels, kernel=kernel, orders=orders)
        # A single-channel read of values alone is where XLA:CPU's fused gathers beat
        # the native kernel (2-4x, docs/sampler.md), so "native" leaves it to XLA.
        xla_wins = name == "interp" and channels == 1 and all(not any(o) for o in orders)
        # Empty problems go to the XLA lowering too: it returns zeros without reading anything.
        empty = any(math.prod(a.shape) == 0 for a in (*ctx.avals_in, *ctx.avals_out))
        native = (cpu_impl == "native" and not xla_wins and not empty
                  and all(a.dtype == np.float32 for a in ctx.avals_in) and _native.available())
        if not native:
            return xla_rule(ctx, *args, cpu_impl=cpu_impl, **params, **rest)
        return jax.ffi.ffi_lowering(f"stn_{name}_f32")(
            ctx, *args, sizes=np.asarray(sizes, np.int64), offsets=np.asarray(offsets, np.int64),
            orders=np.asarray(orders, np.int64).reshape(-1), channels=np.int64(channels),
            kernel=np.int64(KERNELS.index(kernel)))

    return rule


mlir.register_lowering(interp_p, _cpu_lowering("interp", _xla_interp), platform="cpu")
mlir.register_lowering(spread_p, _cpu_lowering("spread", _xla_spread), platform="cpu")


# --------------------------------------------------------------------------
# Differentiation. The derivative of interp along axis a raises order a by
# one (zero if it is already 1, or for the nearest kernel); the derivative
# of spread likewise; each is the other's transpose in the image.
# --------------------------------------------------------------------------


def _with_derivatives(orders, kernel, active_axes):
    """All orders plus their first derivatives along ``active_axes``; and where each sits.

    Returns ``(all_orders, deriv)`` with ``deriv[j][a]`` the index in
    ``all_orders`` of d(orders[j]) / d(axis a), or None when that derivative is zero.
    """
    all_orders = list(orders)
    deriv = []
    for o in orders:
        row = {}
        for a in active_axes:
            if kernel != "linear" or o[a] != 0:
                row[a] = None
                continue
            raised = tuple(v + (b == a) for b, v in enumerate(o))
            if raised not in all_orders:
                all_orders.append(raised)
            row[a] = all_orders.index(raised)
        deriv.append(row)
    return tuple(all_orders), deriv


def _per_channel(x: jax.Array, channels: int) -> jax.Array:
    """``x[..., None]`` repeated over ``channels`` on a new last axis.

    Built by stacking copies rather than broadcasting, so that its transpose
    (the grid cotangent: a sum over channels) is a chain of elementwise adds.
    XLA:CPU runs a ``reduce_sum`` over a short minor axis 10-25x slower
    (measured: 131 ms vs 5 ms for 4.8M points of 3 channels); past 16
    channels the reduction is competitive and the unrolled graph too large.
    """
    return jnp.stack([x] * channels, -1) if channels <= 16 else x[..., None]


def _interp_jvp(primals, tangents, **params):
    flat, *coords = primals
    tflat, *tcoords = tangents
    n = len(params["orders"])
    active = [a for a, t in enumerate(tcoords) if type(t) is not ad.Zero]
    all_orders, deriv = _with_derivatives(params["orders"], params["kernel"], active)
    full = interp_p.bind(flat, *coords, **{**params, "orders": all_orders})
    out = full[:n]
    # Each order's tangent is a plain sum of terms (no scatter into a zero
    # array): its transpose is then slices and adds that XLA fuses.
    from_image = interp_p.bind(tflat, *coords, **params) if type(tflat) is not ad.Zero else None
    tout = []
    for j in range(n):
        terms = [] if from_image is None else [from_image[j]]
        terms += [full[deriv[j][a]] * _per_channel(tcoords[a], params["channels"])
                  for a in active if deriv[j][a] is not None]
        tout.append(sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out[j]))
    return out, jnp.stack(tout)


def _spread_jvp(primals, tangents, **params):
    ct, *coords = primals
    tct, *tcoords = tangents
    active = [a for a, t in enumerate(tcoords) if type(t) is not ad.Zero]
    all_orders, deriv = _with_derivatives(params["orders"], params["kernel"], active)
    out = spread_p.bind(ct, *coords, **params)
    tout = jnp.zeros_like(out)
    if type(tct) is not ad.Zero:
        tout = tout + spread_p.bind(tct, *coords, **params)
    # d/dx_a sum_j scatter(ct_j * w_j) = sum_j scatter(ct_j * dx_a * w_{raise_a(j)}): one spread.
    terms = [[] for _ in all_orders]
    for j in range(len(params["orders"])):
        for a in active:
            if deriv[j][a] is not None:
                terms[deriv[j][a]].append(ct[j] * _per_channel(tcoords[a], params["channels"]))
    if any(terms):
        stacked = jnp.stack([sum(t[1:], t[0]) if t else jnp.zeros_like(ct[0]) for t in terms])
        tout = tout + spread_p.bind(stacked, *coords, **{**params, "orders": all_orders})
    return out, tout


def _interp_transpose(ct, flat, *coords, **params):
    if any(ad.is_undefined_primal(c) for c in coords):
        raise ValueError("stn_interp is not linear in its coordinates")
    if type(ct) is ad.Zero:
        return (None,) + (None,) * len(coords)
    g = spread_p.bind(ct, *coords, **params, length=flat.aval.shape[0]).astype(flat.aval.dtype)
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


def _fold(x, dim, size, axis):
    """Moves the mapped axis of ``x`` (or a broadcast one) to ``axis`` and merges it with the next."""
    x = jnp.broadcast_to(x, (size,) + x.shape) if dim is _NOT_MAPPED else jnp.moveaxis(x, dim, 0)
    x = jnp.moveaxis(x, 0, axis)
    # Explicit sizes, not -1: a reshape cannot infer -1 when another axis is 0 (an empty batch).
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _folded_offsets(offsets, size, length, image_mapped):
    step = length if image_mapped else 0
    return tuple(b * step + o for b in range(size) for o in offsets)


def _mapped_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)


def _interp_batch(args, dims, **params):
    flat, *coords = args
    fdim, *cdims = dims
    size = _mapped_size(args, dims)
    mapped = fdim is not _NOT_MAPPED
    length = flat.shape[1 - fdim] if mapped else flat.shape[0]
    if mapped:
        check_length(size * length, f"the images (a batch of {size} of {length} elements each, under vmap)")
        flat = jnp.moveaxis(flat, fdim, 0).reshape(size * length)
    rows = len(params["offsets"])
    coords = [_fold(c, d, size, 0) for c, d in zip(coords, cdims)]
    offsets = _folded_offsets(params["offsets"], size, length, mapped)
    out = interp_p.bind(flat, *coords, **{**params, "offsets": offsets})  # (n, size * M, P, C)
    return out.reshape(out.shape[:1] + (size, rows) + out.shape[2:]), 1


def _spread_batch(args, dims, **params):
    ct, *coords = args
    ctdim, *cdims = dims
    size = _mapped_size(args, dims)
    ct = _fold(ct, ctdim, size, 1)  # (n, size * M, P, C)
    coords = [_fold(c, d, size, 0) for c, d in zip(coords, cdims)]
    length = params["length"]
    check_length(size * length, f"the image gradients (a batch of {size} of {length} elements each, under vmap)")
    offsets = _folded_offsets(params["offsets"], size, length, True)
    out = spread_p.bind(ct, *coords, **{**params, "offsets": offsets, "length": size * length})
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
    check_length(flat.size, f"the images ({flat.shape} raveled)")
    params = dict(sizes=tuple(int(s) for s in sizes), offsets=tuple(int(o) for o in offsets),
                  channels=int(channels), kernel=kernel, orders=((0,) * len(coords),),
                  cpu_impl=_native.cpu_sampler())
    return interp_p.bind(flat, *coords, **params)[0]
