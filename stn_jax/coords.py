"""Coordinate conventions: normalised [-1, 1] coordinates and pixel indices.

Normalised coordinates run over the image extent, ``x`` along the width axis
and ``y`` along the height axis (``z`` along depth for volumes), exactly as in
PyTorch's ``grid_sample``:

* ``align_corners=False`` (the default): -1 and +1 are the *outer edges* of the
  first and last pixels; pixel ``i`` of ``n`` has centre ``(2 i + 1) / n - 1``.
  Resizing an image keeps the same normalised coordinates for the same content.
* ``align_corners=True``: -1 and +1 are the *centres* of the first and last
  pixels (the convention of the original Torch/Lasagne STN code); pixel ``i``
  has centre ``2 i / (n - 1) - 1``.

Pixel coordinates put the centre of pixel ``i`` at ``i``. See
``docs/conventions.md`` for a picture.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = ("zeros", "border", "reflection")


# ----------------------------------------------------------------------------
# Argument checks shared by the sampler, the transforms and the modules. They
# look at Python values and static shapes only, so they cost nothing under jit.
# ----------------------------------------------------------------------------


def as_size(size: Any, name: str, *, n: int | None = None, arg: str = "size", minimum: int = 1) -> tuple[int, ...]:
    """``size`` as a tuple of ints, or a ValueError naming ``name``, ``arg`` and the value.

    Accepts any sequence (or 1-D array) of Python or NumPy integers; rejects
    floats (even integral ones, as NumPy does for shapes), strings, bools,
    values below ``minimum`` and, when ``n`` is given, a length other than ``n``.
    """
    def error() -> ValueError:
        count = f"{n} " if n is not None else ""
        lower = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
        return ValueError(f"{name}: {arg} must be a sequence of {count}{lower} ints, got {size!r}")

    if isinstance(size, (str, bytes)) or not np.iterable(size):
        raise error()
    out = []
    for s in size:
        if isinstance(s, (bool, np.bool_)):
            raise error()
        try:
            out.append(operator.index(s))
        except TypeError:  # floats, strings, traced values
            raise error() from None
    if (n is not None and len(out) != n) or any(s < minimum for s in out):
        raise error()
    return tuple(out)


def check_bool(value: Any, name: str, arg: str = "align_corners") -> bool:
    """``value`` as a bool if it is one (Python or NumPy), else a ValueError naming ``arg``.

    Strings such as ``"False"`` and ints are rejected: ``bool("False")`` is True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: {arg} must be a bool (True or False), got {value!r}")
    return bool(value)


def normalized_to_pixel(coord: jax.Array, size: int, align_corners: bool = False) -> jax.Array:
    """Maps normalised coordinates along an axis of ``size`` pixels to pixel units."""
    if align_corners:
        return (coord + 1) * ((size - 1) / 2)
    return ((coord + 1) * size - 1) / 2


def pixel_to_normalized(pixel: jax.Array, size: int, align_corners: bool = False) -> jax.Array:
    """Inverse of `normalized_to_pixel`. With ``align_corners`` and ``size == 1`` gives 0."""
    if align_corners:
        return pixel * (2 / (size - 1)) - 1 if size > 1 else jnp.zeros_like(pixel)
    return (2 * pixel + 1) / size - 1


def pixel_centers(size: int, align_corners: bool = False, dtype=np.float32) -> np.ndarray:
    """Normalised coordinates of the centres of ``size`` pixels, shape ``(size,)``.

    A single pixel sits at 0 in both conventions, as in PyTorch's ``affine_grid``.
    """
    i = np.arange(size, dtype=np.float64)
    if align_corners:
        c = i * (2 / (size - 1)) - 1 if size > 1 else np.zeros(1)
    else:
        c = (2 * i + 1) / size - 1
    return c.astype(dtype)


def identity_grid(size: Sequence[int], align_corners: bool = False, dtype=np.float32) -> np.ndarray:
    """The grid that reproduces an image, a NumPy constant of shape ``(*size, len(size))``.

    ``size`` is ``(H, W)`` or ``(D, H, W)``; the last axis holds ``(x, y[, z])``.
    Computed in float64 and rounded once to ``dtype``.
    """
    axes = [pixel_centers(n, align_corners, np.float64) for n in size]
    mesh = np.meshgrid(*axes, indexing="ij")  # (D,) H, W order
    return np.stack(mesh[::-1], axis=-1).astype(dtype)


# Padding as a map of pixel coordinates, with PyTorch's sub-gradients: the
# gradient is zero where a coordinate is clipped, including exactly at the
# limits, and flips sign where it is reflected.


def _clip(x: jax.Array, size: int) -> jax.Array:
    return jnp.where(x <= 0, 0.0, jnp.where(x >= size - 1, float(size - 1), x)).astype(x.dtype)


def _reflect(x: jax.Array, twice_low: int, twice_high: int) -> jax.Array:
    if twice_low == twice_high:
        return jnp.zeros_like(x)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    x = x - low
    x = jnp.where(x < 0, -x, x)
    extra = jnp.fmod(x, span)
    flips = jnp.floor(x / span)
    even = jnp.fmod(flips, 2) == 0
    return jnp.where(even, extra + low, span - extra + low)


def apply_padding(x: jax.Array, size: int, padding_mode: str, align_corners: bool) -> jax.Array:
    """Maps pixel coordinates so that sampling with zero padding realises ``padding_mode``.

    ``"zeros"`` leaves them unchanged (points outside read zeros, blended per
    corner); ``"border"`` clips them to ``[0, size - 1]``; ``"reflection"``
    reflects them about the image edges (the pixel centres with
    ``align_corners``, the outer edges otherwise), then clips.
    """
    if padding_mode == "zeros":
        return x
    if padding_mode == "border":
        return _clip(x, size)
    if padding_mode == "reflection":
        if align_corners:
            x = _reflect(x, 0, 2 * (size - 1))
        else:
            x = _reflect(x, -1, 2 * size - 1)
        return _clip(x, size)
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
