"""Parameterised coordinate transforms that turn parameters into sampling grids.

Every transform maps *target* (output) coordinates to *source* (input)
coordinates, in normalised units (see `stn_jax.coords`), as in the paper: each
output pixel asks where to read the input. Grids have shape
``(..., H_out, W_out, 2)`` holding ``(x, y)`` (``(..., D_out, H_out, W_out, 3)``
holding ``(x, y, z)`` in 3-D). All functions are pure, accept any leading batch
dimensions, and are safe under `jax.jit`, `jax.vmap` and `jax.grad`.

The registry `TRANSFORMS` describes each transform for the modules: its
name, number of parameters, identity parameters and a ``make_grid`` function
taking ``(..., num_params)`` parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax._memory import check_memory
from stn_jax.coords import as_size, check_bool, identity_grid, pixel_centers


def _as_size(size: Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``size`` as ``n`` positive ints (ints only: ``14.5`` and ``"14"`` raise ValueError)."""
    return as_size(size, name, n=n, arg="size")


def _matrix(params, rows: int, cols: int, name: str) -> jax.Array:
    """Accepts ``(..., rows, cols)`` matrices or ``(..., rows * cols)`` row-major vectors."""
    params = jnp.asarray(params)
    if params.ndim >= 2 and params.shape[-2:] == (rows, cols):
        m = params
    elif params.ndim >= 1 and params.shape[-1] == rows * cols:
        m = params.reshape(params.shape[:-1] + (rows, cols))
    else:
        raise ValueError(f"{name}: expected parameters of shape (..., {rows}, {cols}) or "
                         f"(..., {rows * cols}), got {params.shape}")
    return m.astype(jnp.promote_types(m.dtype, jnp.float32))


def _target_axes(size: Sequence[int], align_corners: bool, dtype) -> list[jax.Array]:
    """Target coordinates x, y[, z], each broadcastable to ``size``."""
    ndim = len(size)
    axes = []
    for a, n in enumerate(size[::-1]):  # a = 0 is x (the last spatial axis)
        shape = [1] * ndim
        shape[ndim - 1 - a] = n
        axes.append(jnp.asarray(pixel_centers(n, align_corners, np.float64).reshape(shape), dtype))
    return axes


def _homogeneous_map(matrix: jax.Array, size: Sequence[int], align_corners: bool) -> list[jax.Array]:
    """Rows of ``matrix @ (x_t, y_t[, z_t], 1)`` at every target pixel, each ``(..., *size)``."""
    ndim = len(size)
    target = _target_axes(size, align_corners, matrix.dtype)
    lift = (...,) + (None,) * ndim
    rows = []
    for r in range(matrix.shape[-2]):
        acc = matrix[..., r, ndim][lift]
        for c in range(ndim):
            acc = acc + matrix[..., r, c][lift] * target[c]
        rows.append(acc)
    return rows


def affine_grid(theta, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Grid of the 2-D affine map ``source = theta @ (x_t, y_t, 1)``.

    Args:
      theta: ``(..., 2, 3)`` (or ``(..., 6)`` row-major), identity ``[[1, 0, 0], [0, 1, 0]]``.
      size: ``(H_out, W_out)``.
      align_corners: see `stn_jax.coords`.

    Returns:
      ``(..., H_out, W_out, 2)``, equal to ``torch.nn.functional.affine_grid``.
    """
    size = _as_size(size, 2, "affine_grid")
    align_corners = check_bool(align_corners, "affine_grid")
    return jnp.stack(_homogeneous_map(_matrix(theta, 2, 3, "affine_grid"), size, align_corners), -1)


def affine_grid_3d(theta, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Grid of the 3-D affine map ``source = theta @ (x_t, y_t, z_t, 1)``.

    ``theta`` is ``(..., 3, 4)`` (or ``(..., 12)``), identity ``[I_3 | 0]``;
    ``size`` is ``(D_out, H_out, W_out)``; returns ``(..., D_out, H_out, W_out, 3)``.
    """
    size = _as_size(size, 3, "affine_grid_3d")
    align_corners = check_bool(align_corners, "affine_grid_3d")
    return jnp.stack(_homogeneous_map(_matrix(theta, 3, 4, "affine_grid_3d"), size, align_corners), -1)


def attention_to_affine(params) -> jax.Array:
    """The paper's attention ``(s, t_x, t_y)`` as the affine ``[[s, 0, t_x], [0, s, t_y]]``."""
    params = jnp.asarray(params)
    if params.ndim < 1 or params.shape[-1] != 3:
        raise ValueError(f"attention parameters must have shape (..., 3) = (s, t_x, t_y), got {params.shape}")
    s, tx, ty = params[..., 0], params[..., 1], params[..., 2]
    zero = jnp.zeros_like(s)
    return jnp.stack([jnp.stack([s, zero, tx], -1), jnp.stack([zero, s, ty], -1)], -2)


def attention_grid(params, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Grid of the attention transform (isotropic scale and translation), ``(..., 3)`` params."""
    return affine_grid(attention_to_affine(params), size, align_corners)


def projective_matrix(params) -> jax.Array:
    """``(..., 8)`` parameters ``(h11, h12, h13, h21, h22, h23, h31, h32)`` -> ``(..., 3, 3)`` with ``h33 = 1``.

    ``(..., 3, 3)`` matrices are returned as they are.
    """
    params = jnp.asarray(params)
    if params.ndim >= 2 and params.shape[-2:] == (3, 3):
        return params.astype(jnp.promote_types(params.dtype, jnp.float32))
    if params.ndim < 1 or params.shape[-1] != 8:
        raise ValueError(f"projective parameters must have shape (..., 8) or (..., 3, 3), got {params.shape}")
    params = params.astype(jnp.promote_types(params.dtype, jnp.float32))
    full = jnp.concatenate([params, jnp.ones(params.shape[:-1] + (1,), params.dtype)], -1)
    return full.reshape(params.shape[:-1] + (3, 3))


def projective_grid(params, size: Sequence[int], align_corners: bool = False, eps: float = 1e-6) -> jax.Array:
    """Grid of the plane projective map (homography).

    ``(u, v, w) = H @ (x_t, y_t, 1)`` and the source is ``(u / w, v / w)``.
    Where ``|w| < eps`` the divisor is replaced by ``eps`` with w's sign, so a
    point near the line at infinity lands far outside the image (reading the
    padding) instead of producing inf or NaN, and its gradient stays finite.

    Args:
      params: ``(..., 8)`` (identity ``(1, 0, 0, 0, 1, 0, 0, 0)``) or ``(..., 3, 3)``.
      size: ``(H_out, W_out)``.
    """
    size = _as_size(size, 2, "projective_grid")
    align_corners = check_bool(align_corners, "projective_grid")
    u, v, w = _homogeneous_map(projective_matrix(params), size, align_corners)
    w = jnp.where(jnp.abs(w) < eps, jnp.where(w < 0, -eps, eps).astype(w.dtype), w)
    return jnp.stack([u / w, v / w], -1)


# ----------------------------------------------------------------------------
# Thin-plate spline.
# ----------------------------------------------------------------------------


def default_control_points(n: int = 4) -> np.ndarray:
    """The paper's regular ``n x n`` grid of TPS control points over [-1, 1]^2, ``(n * n, 2)`` as (x, y).

    For ``n = 4`` the points sit at -1, -1/3, 1/3 and 1 on each axis (Lasagne's layout).
    """
    t = np.linspace(-1.0, 1.0, n)
    x, y = np.meshgrid(t, t, indexing="xy")
    return np.stack([x.ravel(), y.ravel()], -1)


# Peak host memory of `_tps_matrix` per (target pixel, control point), measured with tracemalloc (the float64
# differences to the control points, their squares, the kernel values).
_TPS_BYTES_PER_ENTRY = 34


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    """``U(r) = r^2 log r``, written in ``r^2``: ``r2 log(r2) / 2``, with ``U(0) = 0``."""
    safe = np.where(r2 > 0, r2, 1.0)
    return np.where(r2 > 0, 0.5 * r2 * np.log(safe), 0.0)


@functools.lru_cache(maxsize=64)
def _tps_matrix(size: tuple[int, int], points: tuple[tuple[float, float], ...], align_corners: bool,
                regularization: float) -> np.ndarray:
    """``A`` with ``grid = A @ source_points`` at every target pixel, ``(H * W, K)``, float64.

    Solves Bookstein's system ``[[K + lambda I, P], [P^T, 0]]`` once (inverted in
    float64) for the fixed control points; the spline is then a fixed linear
    map of the regressed source points.
    """
    c = np.asarray(points, np.float64)
    k = len(c)
    kc = _tps_kernel(((c[:, None] - c[None]) ** 2).sum(-1)) + regularization * np.eye(k)
    p = np.concatenate([np.ones((k, 1)), c], 1)
    system = np.block([[kc, p], [p.T, np.zeros((3, 3))]])
    inverse = np.linalg.inv(system)
    target = identity_grid(size, align_corners, np.float64).reshape(-1, 2)
    basis = np.concatenate(
        [_tps_kernel(((target[:, None] - c[None]) ** 2).sum(-1)), np.ones((len(target), 1)), target], 1)
    return basis @ inverse[:, :k]


def tps_grid(params, size: Sequence[int], control_points=None, align_corners: bool = False,
             regularization: float = 0.0) -> jax.Array:
    """Grid of the thin-plate spline that moves control points ``c_k`` to ``c_k + params_k``.

    The spline interpolates the source positions ``p_k = c_k + params_k`` of K
    control points fixed in target coordinates (Bookstein 1989), with kernel
    ``U(r) = r^2 log r``. Zero offsets give the identity, and offsets taken
    from any affine map reproduce that affine grid exactly. The system's
    inverse is computed once per (size, control points) and cached; a call
    costs one ``(H W, K) x (K, 2)`` matrix product per example.

    Args:
      params: offsets ``(..., K, 2)`` as (x, y), or ``(..., 2 K)`` flattened.
      size: ``(H_out, W_out)``.
      control_points: ``(K, 2)`` target positions; default the paper's 4x4 grid.
      regularization: Tikhonov weight added to the kernel's diagonal (0 interpolates exactly).

    Raises ValueError before building anything when the precomputed matrix (about 34 bytes of host memory
    per output pixel and control point while it is built) would not fit in the machine's memory.
    """
    size = _as_size(size, 2, "tps_grid")
    align_corners = check_bool(align_corners, "tps_grid")
    points = default_control_points() if control_points is None else np.asarray(control_points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"tps_grid: control_points must be (K, 2) with K >= 3, got shape {points.shape}")
    k = len(points)
    params = jnp.asarray(params)
    if params.ndim >= 1 and params.shape[-1] == 2 * k:
        params = params.reshape(params.shape[:-1] + (k, 2))
    if params.ndim < 2 or params.shape[-2:] != (k, 2):
        raise ValueError(f"tps_grid: expected offsets of shape (..., {k}, 2) or (..., {2 * k}) for {k} "
                         f"control points, got {params.shape}")
    params = params.astype(jnp.promote_types(params.dtype, jnp.float32))
    check_memory("tps_grid", f"the spline's float64 matrix for size {size} and {k} control points (built on the "
                             f"host)", _TPS_BYTES_PER_ENTRY * math.prod(size) * k, "cpu")
    a = _tps_matrix(size, tuple(map(tuple, points.tolist())), bool(align_corners), float(regularization))
    offsets = jnp.einsum("pk,...kd->...pd", jnp.asarray(a, params.dtype), params)
    base = jnp.asarray(identity_grid(size, align_corners, np.float64).reshape(-1, 2), params.dtype)
    return (base + offsets).reshape(params.shape[:-2] + size + (2,))


# ----------------------------------------------------------------------------
# Composition and inversion.
# ----------------------------------------------------------------------------


def _homogeneous(theta, n: int) -> jax.Array:
    bottom = jnp.zeros(theta.shape[:-2] + (1, n + 1), theta.dtype).at[..., 0, n].set(1)
    return jnp.concatenate([theta, bottom], -2)


def compose_affine(outer, inner) -> jax.Array:
    """The affine map ``outer(inner(x))``, 2-D ``(..., 2, 3)`` or 3-D ``(..., 3, 4)``.

    Sampling an image with ``outer``'s grid and then sampling the result with
    ``inner``'s grid equals sampling the image once with ``compose_affine(outer,
    inner)`` (up to interpolation): grids map target to source.
    """
    outer, inner = jnp.asarray(outer), jnp.asarray(inner)
    if outer.shape[-2:] != inner.shape[-2:] or outer.shape[-2:] not in ((2, 3), (3, 4)):
        raise ValueError(f"compose_affine: expected two (..., 2, 3) or two (..., 3, 4) matrices, "
                         f"got {outer.shape} and {inner.shape}")
    n = outer.shape[-2]
    return (_homogeneous(outer, n) @ _homogeneous(inner, n))[..., :n, :]


def invert_affine(theta) -> jax.Array:
    """The inverse affine map, 2-D ``(..., 2, 3)`` or 3-D ``(..., 3, 4)``."""
    theta = jnp.asarray(theta)
    if theta.shape[-2:] not in ((2, 3), (3, 4)):
        raise ValueError(f"invert_affine: expected (..., 2, 3) or (..., 3, 4), got {theta.shape}")
    n = theta.shape[-2]
    a, t = theta[..., :, :n], theta[..., :, n:]
    a_inv = jnp.linalg.inv(a)
    return jnp.concatenate([a_inv, -a_inv @ t], -1)


def compose_projective(outer, inner) -> jax.Array:
    """The homography ``outer(inner(x))`` as ``(..., 3, 3)``; accepts 8-vectors or matrices."""
    return projective_matrix(outer) @ projective_matrix(inner)


def invert_projective(params, normalize: bool = True) -> jax.Array:
    """The inverse homography ``(..., 3, 3)``, scaled so that ``h33 = 1`` when ``normalize``."""
    inv = jnp.linalg.inv(projective_matrix(params))
    return inv / inv[..., 2:3, 2:3] if normalize else inv


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    """A transform family as the modules see it.

    Attributes:
      name: registry key.
      num_params: length of the parameter vector a localisation network regresses.
      identity: ``(num_params,)`` parameters of the identity map (the regression
        layer's initial bias).
      spatial_dims: 2 for images, 3 for volumes.
      grid_fn: ``(params (..., num_params), size, align_corners) -> grid``.
      short_name: the abbreviation used in model names (``ST-CNN Aff``).
      translation_index: positions of the translation parameters in the vector
        (``()`` when the transform has no separate translation, e.g. TPS); used
        by bounded parameterisations.

    Adding a transform is one entry in `TRANSFORMS`: the modules, the models,
    the configs and the study tables all read their choices from it.
    """

    name: str
    num_params: int
    identity: np.ndarray
    spatial_dims: int
    grid_fn: Callable[..., jax.Array]
    short_name: str
    translation_index: tuple[int, ...] = ()

    def make_grid(self, params, size: Sequence[int], align_corners: bool = False) -> jax.Array:
        """The sampling grid ``(..., *size, spatial_dims)`` for ``params``."""
        return self.grid_fn(params, size, align_corners)


_TPS_POINTS = default_control_points()

TRANSFORMS: dict[str, Transform] = {
    t.name: t for t in [
        Transform("affine", 6, np.array([1.0, 0, 0, 0, 1, 0], np.float32), 2, affine_grid, "Aff", (2, 5)),
        Transform("attention", 3, np.array([1.0, 0, 0], np.float32), 2, attention_grid, "Att", (1, 2)),
        Transform("projective", 8, np.array([1.0, 0, 0, 0, 1, 0, 0, 0], np.float32), 2, projective_grid, "Proj",
                  (2, 5)),
        Transform("tps", 2 * len(_TPS_POINTS), np.zeros(2 * len(_TPS_POINTS), np.float32), 2,
                  lambda p, size, ac: tps_grid(p, size, align_corners=ac), "TPS"),
        Transform("affine3d", 12, np.array([1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], np.float32), 3,
                  affine_grid_3d, "Aff3D", (3, 7, 11)),
    ]
}


def get_transform(name: str) -> Transform:
    """Looks up a registered transform; unknown names raise ``ValueError`` listing the choices."""
    try:
        return TRANSFORMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}") from None
