"""Differentiable grid sampling of images and volumes, PyTorch-compatible.

``grid_sample(image, grid)`` returns ``out[..., i, j, :] = image[..., T(i, j), :]``
where the grid holds the normalised source location ``(x, y)`` for every
output pixel (see `stn_jax.coords` for the conventions). Images are
channels-last; every leading dimension is a batch dimension, broadcast
NumPy-style between image and grid and mapped with `jax.vmap` (an image
shared by many grids is read in place, never copied, and its gradient is
accumulated in place).

For the same arguments the result equals ``torch.nn.functional.grid_sample``
on the transposed arrays up to float rounding, out-of-range points included.
Values are differentiable w.r.t. image and grid to any order, in forward and
reverse mode; the grid derivative of bilinear sampling is the right
derivative at integer pixel coordinates (PyTorch's choice) and that of
nearest sampling is zero.

Points with a NaN coordinate read nothing: the output is 0 and the gradient
0, in every padding mode. An infinite coordinate reads 0 with ``"zeros"`` and
``"reflection"`` padding and the edge pixel with ``"border"``.

Arguments are checked on their Python values and static shapes (free under
`jax.jit`); a bad one raises ``ValueError`` naming it. Empty inputs (a batch
of 0, 0 channels, an output grid with a 0-sized axis) give empty outputs and
gradients of the broadcast shape, as NumPy would. The images of one call may
hold at most `MAX_ELEMENTS` elements in all (indices are int32), and an output
(with `warp`, an output and its sampling grid) that needs more bytes than the
memory there is (`stn_jax._memory.memory_limit`) is refused before anything is
computed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import transforms
from stn_jax._interp import MAX_ELEMENTS, interpolate
from stn_jax._memory import check_memory, nbytes, platform_of
from stn_jax.coords import PADDING_MODES, apply_padding, as_size, check_bool, normalized_to_pixel

MODES_2D = ("bilinear", "nearest")
MODES_3D = ("bilinear", "trilinear", "nearest")
_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _check(image, grid, ndim: int, mode: str, modes: Sequence[str], padding_mode: str, align_corners) -> None:
    name = "grid_sample" if ndim == 2 else "grid_sample_3d"
    layout = "(..., H, W, C)" if ndim == 2 else "(..., D, H, W, C)"
    glayout = "(..., H_out, W_out, 2)" if ndim == 2 else "(..., D_out, H_out, W_out, 3)"
    if mode not in modes:
        raise ValueError(f"{name}: mode must be one of {modes}, got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    check_bool(align_corners, name)
    for arg, x, lay in (("image", image, layout), ("grid", grid, glayout)):
        if x.ndim < ndim + 1:
            raise ValueError(f"{name}: {arg} must have shape {lay}, got shape {x.shape}")
        if not any(x.dtype == d for d in _FLOAT_DTYPES):
            raise ValueError(f"{name}: {arg} must be a floating-point array, got dtype {x.dtype}")
    if grid.shape[-1] != ndim:
        raise ValueError(
            f"{name}: the last axis of grid must hold the {ndim} coordinates "
            f"({'x, y' if ndim == 2 else 'x, y, z'}), got grid shape {grid.shape}")
    if min(image.shape[-ndim - 1:-1]) < 1:
        raise ValueError(f"{name}: image has an empty spatial axis: shape {image.shape}")
    try:
        np.broadcast_shapes(image.shape[:-ndim - 1], grid.shape[:-ndim - 1])
    except ValueError:
        raise ValueError(
            f"{name}: the batch dimensions of image {image.shape[:-ndim - 1]} and grid "
            f"{grid.shape[:-ndim - 1]} do not broadcast (image shape {image.shape}, "
            f"grid shape {grid.shape})") from None
    if image.size > MAX_ELEMENTS:
        raise ValueError(
            f"{name}: image of shape {image.shape} holds {image.size} elements in all; one call may hold at most "
            f"2**31 - 1 = {MAX_ELEMENTS} (the sampler indexes with int32): sample the batch in chunks")


def _sample_one(image, grid, *, ndim, kernel, padding_mode, align_corners):
    """One image ``(*spatial, C)`` at one grid ``(*out, ndim)`` -> ``(*out, C)``."""
    sizes = image.shape[:ndim][::-1]  # per coordinate: x -> W, y -> H, z -> D
    dtype = jnp.promote_types(grid.dtype, jnp.float32)
    points = grid.astype(dtype).reshape(1, -1, ndim)
    # jnp.split, not indexing: its transpose is one concatenate, where slicing's is a pad per axis.
    axes = jnp.split(points, ndim, axis=-1)
    coords = [
        apply_padding(normalized_to_pixel(x[..., 0], n, align_corners), n, padding_mode, align_corners)
        for x, n in zip(axes, sizes)
    ]
    out = interpolate(image.reshape(-1), coords, sizes=sizes, offsets=(0,), channels=image.shape[-1], kernel=kernel)
    return out.reshape(grid.shape[:-1] + image.shape[-1:]).astype(image.dtype)


def _map_batch(fn: Callable, image, grid, nbatch: int):
    """Maps ``fn`` over ``nbatch`` leading axes with `jax.vmap`; size-1 axes broadcast."""
    if nbatch == 0:
        return fn(image, grid)
    n = grid.shape[0] if image.shape[0] == 1 else image.shape[0]  # the broadcast size (0 beats 1)
    image_axis = 0 if image.shape[0] == n else None
    grid_axis = 0 if grid.shape[0] == n else None
    image = image if image_axis == 0 else image[0]
    grid = grid if grid_axis == 0 else grid[0]
    inner = lambda i, g: _map_batch(fn, i, g, nbatch - 1)
    return jax.vmap(inner, in_axes=(image_axis, grid_axis))(image, grid)


def _sample(image, grid, *, ndim, mode, modes, padding_mode, align_corners):
    image, grid = jnp.asarray(image), jnp.asarray(grid)
    _check(image, grid, ndim, mode, modes, padding_mode, align_corners)
    nbatch = max(image.ndim, grid.ndim) - ndim - 1
    out_shape = (np.broadcast_shapes(image.shape[:-ndim - 1], grid.shape[:-ndim - 1])
                 + grid.shape[-ndim - 1:-1] + image.shape[-1:])
    check_memory("grid_sample" if ndim == 2 else "grid_sample_3d", f"an output of shape {out_shape} {image.dtype}",
                 nbytes(out_shape, image.dtype), platform_of(image))
    if math.prod(out_shape) == 0:  # nothing to read or write (an empty image implies this)
        return jnp.zeros(out_shape, image.dtype)
    image = image.reshape((1,) * (nbatch + ndim + 1 - image.ndim) + image.shape)
    grid = grid.reshape((1,) * (nbatch + ndim + 1 - grid.ndim) + grid.shape)
    fn = lambda i, g: _sample_one(
        i, g, ndim=ndim, kernel="nearest" if mode == "nearest" else "linear",
        padding_mode=padding_mode, align_corners=bool(align_corners))
    return _map_batch(fn, image, grid, nbatch)


def grid_sample(image, grid, *, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> jax.Array:
    """Samples ``image`` at the normalised locations in ``grid``.

    Args:
      image: ``(..., H, W, C)`` float16, bfloat16, float32 or float64.
      grid: ``(..., H_out, W_out, 2)`` holding ``(x, y)`` in [-1, 1] (outside is
        allowed: see ``padding_mode``). Leading dimensions broadcast with the image's.
      mode: ``"bilinear"`` or ``"nearest"`` (rounds half to even).
      padding_mode: what points outside the image read: ``"zeros"``, ``"border"``
        (the nearest edge pixel) or ``"reflection"`` (the image mirrored at its edges).
      align_corners: whether -1 and 1 are the centres (True) or outer edges
        (False) of the corner pixels, as in PyTorch.

    Returns:
      ``(..., H_out, W_out, C)`` in the image's dtype; interpolation weights and
      sums are computed in float32 (float64 for a float64 grid). Empty (of that
      shape) when the batch, ``C`` or an output axis is 0.

    Raises:
      ValueError: a bad rank, dtype (integer images are rejected, not cast),
        mode, padding mode or ``align_corners`` (must be a bool), batch
        dimensions that do not broadcast, an empty spatial axis, images
        holding more than `MAX_ELEMENTS` elements in all, or an output larger
        than the memory (`stn_jax._memory.memory_limit`; docs/sampler.md).
    """
    return _sample(image, grid, ndim=2, mode=mode, modes=MODES_2D, padding_mode=padding_mode,
                   align_corners=align_corners)


def grid_sample_3d(volume, grid, *, mode: str = "trilinear", padding_mode: str = "zeros",
                   align_corners: bool = False) -> jax.Array:
    """Samples a volume ``(..., D, H, W, C)`` at a grid ``(..., D_out, H_out, W_out, 3)`` of ``(x, y, z)``.

    ``mode`` is ``"trilinear"`` (also accepted as ``"bilinear"``, PyTorch's name
    for it on 5-D inputs) or ``"nearest"``; the rest is as in `grid_sample`.
    """
    return _sample(volume, grid, ndim=3, mode=mode, modes=MODES_3D, padding_mode=padding_mode,
                   align_corners=align_corners)


def warp(image, params, size: Sequence[int] | None = None, transform: str = "affine", *,
         align_corners: bool = False, **sampler_options) -> jax.Array:
    """Warps ``image`` by a parameterised transform: the grid and the sampling in one call.

    Args:
      image: ``(..., H, W, C)`` (or ``(..., D, H, W, C)`` for ``"affine3d"``).
      params: ``(..., n)`` transform parameters (see `stn_jax.TRANSFORMS`); the
        affine, projective and 3-D affine transforms also take their matrices.
      size: output spatial size ``(H_out, W_out)`` (or ``(D_out, H_out, W_out)``),
        non-negative ints (a 0 gives an empty output); defaults to the input's.
      transform: a name registered in `stn_jax.TRANSFORMS`.
      align_corners: used for both the grid and the sampling (a bool).
      **sampler_options: ``mode`` and ``padding_mode`` of `grid_sample`.

    Example: ``warp(images, theta, (28, 28))`` crops/rotates/scales ``images`` by
    the ``(B, 2, 3)`` affine matrices ``theta`` into 28x28 outputs.

    Raises ValueError as `grid_sample` does, and before building the grid when the
    output and its grid together need more bytes than the memory.
    """
    t = transforms.get_transform(transform)
    image = jnp.asarray(image)
    nd = t.spatial_dims
    check_bool(align_corners, "warp")
    if image.ndim < nd + 1:
        layout = "(..., H, W, C)" if nd == 2 else "(..., D, H, W, C)"
        raise ValueError(f"warp: image must have shape {layout} for the {transform!r} transform, "
                         f"got shape {image.shape}")
    size = image.shape[-nd - 1:-1] if size is None else as_size(size, "warp", n=nd, arg="size", minimum=0)
    params = jnp.asarray(params)
    _check_warp_memory(t, image, params, size, align_corners)
    grid = t.make_grid(params, tuple(max(n, 1) for n in size), align_corners=align_corners)
    if 0 in size:  # an empty output: grids have positive sizes, so build one pixel and cut it off
        grid = grid[(Ellipsis,) + tuple(slice(0, n) for n in size) + (slice(None),)]
    sample = grid_sample if t.spatial_dims == 2 else grid_sample_3d
    return sample(image, grid, align_corners=align_corners, **sampler_options)


@functools.lru_cache(maxsize=256)
def _grid_batch(transform: str, shape: tuple[int, ...], dtype: np.dtype, align_corners: bool
                ) -> tuple[tuple[int, ...], np.dtype]:
    """The batch shape and dtype of the grids that parameters of ``shape`` and ``dtype`` make: a one-pixel
    grid traced abstractly (cached per shape: tracing costs about a millisecond)."""
    t = transforms.get_transform(transform)
    nd = t.spatial_dims
    pixel = jax.eval_shape(lambda p: t.make_grid(p, (1,) * nd, align_corners=align_corners),
                           jax.ShapeDtypeStruct(shape, dtype))
    return pixel.shape[:-nd - 1], pixel.dtype


def _check_warp_memory(t: transforms.Transform, image: jax.Array, params: jax.Array, size: tuple[int, ...],
                       align_corners: bool) -> None:
    """`check_memory` for `warp`, before its grid is built: the output ``(*batch, *size, C)`` and the grid
    ``(*params batch, *size, ndim)`` together."""
    nd = t.spatial_dims
    params_batch, grid_dtype = _grid_batch(t.name, params.shape, params.dtype, align_corners)
    try:
        batch = np.broadcast_shapes(image.shape[:-nd - 1], params_batch)
    except ValueError:
        return  # grid_sample names the batch dimensions that do not broadcast
    out_shape = batch + tuple(size) + image.shape[-1:]
    grid_shape = params_batch + tuple(size) + (nd,)
    check_memory("warp", f"an output of shape {out_shape} {image.dtype} and its sampling grid {grid_shape} "
                         f"{grid_dtype}", nbytes(out_shape, image.dtype) + nbytes(grid_shape, grid_dtype),
                 platform_of(image))
