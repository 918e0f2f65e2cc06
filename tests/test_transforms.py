"""Transforms, grids, composition and coordinate helpers against hand-derived / numpy expectations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALIGN

from stn_jax import (
    TRANSFORMS,
    affine_grid,
    affine_grid_3d,
    attention_grid,
    attention_to_affine,
    compose_affine,
    compose_projective,
    default_control_points,
    get_transform,
    grid_sample,
    identity_grid,
    invert_affine,
    invert_projective,
    normalized_to_pixel,
    pixel_to_normalized,
    projective_grid,
    projective_matrix,
    tps_grid,
    warp,
)
from stn_jax.coords import pixel_centers


def _apply_affine(theta, grid):
    """Applies (..., n, n+1) theta to points (..., n) in float64 numpy."""
    theta = np.asarray(theta, np.float64)
    n = theta.shape[-2]
    return np.asarray(grid, np.float64) @ theta[:, :n].T + theta[:, n]


def _random_affine(rng, n=2, scale=0.3):
    return np.concatenate([np.eye(n) + scale * rng.standard_normal((n, n)), scale * rng.standard_normal((n, 1))], 1)


# ---------------------------------------------------------------------------
# Coordinates.
# ---------------------------------------------------------------------------


def test_identity_grid_hand_values():
    # size (H, W) = (2, 3); the last axis is (x, y).
    # align_corners=False: centres (2 i + 1) / n - 1 -> x in {-2/3, 0, 2/3}, y in {-1/2, 1/2}.
    g = identity_grid((2, 3), align_corners=False, dtype=np.float64)
    expected = np.array([[[-2 / 3, -0.5], [0, -0.5], [2 / 3, -0.5]],
                         [[-2 / 3, 0.5], [0, 0.5], [2 / 3, 0.5]]])
    assert g.shape == (2, 3, 2)
    np.testing.assert_allclose(g, expected, rtol=0, atol=1e-15)
    # align_corners=True: centres 2 i / (n - 1) - 1 -> x in {-1, 0, 1}, y in {-1, 1}.
    g = identity_grid((2, 3), align_corners=True)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, [[[-1, -1], [0, -1], [1, -1]], [[-1, 1], [0, 1], [1, 1]]])
    # A size-1 axis sits at 0 in both conventions.
    for ac in ALIGN:
        np.testing.assert_array_equal(identity_grid((1, 2), ac)[..., 1], 0.0)
    np.testing.assert_array_equal(identity_grid((1, 3), True), [[[-1, 0], [0, 0], [1, 0]]])


def test_identity_grid_3d_hand_values():
    # (D, H, W) = (2, 1, 2), align_corners=True: x, z in {-1, 1}, y = 0; last axis (x, y, z).
    g = identity_grid((2, 1, 2), align_corners=True)
    expected = np.array([[[[-1, 0, -1], [1, 0, -1]]], [[[-1, 0, 1], [1, 0, 1]]]], np.float32)
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_array_equal(identity_grid((2, 1, 2), align_corners=False), expected / 2)


def test_pixel_centers_and_conversions_hand_values():
    np.testing.assert_allclose(pixel_centers(4, False), [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(pixel_centers(3, True), [-1, 0, 1])
    np.testing.assert_allclose(pixel_centers(1, True), [0])
    for coord, size, ac, pixel in [(-1.0, 4, False, -0.5), (1.0, 4, False, 3.5), (0.0, 4, False, 1.5),
                                   (-1.0, 4, True, 0.0), (1.0, 4, True, 3.0), (0.5, 5, True, 3.0),
                                   (-0.75, 4, False, 0.0), (0.0, 1, True, 0.0), (0.0, 1, False, 0.0)]:
        assert float(normalized_to_pixel(jnp.float32(coord), size, ac)) == pytest.approx(pixel, abs=1e-6)
        assert float(pixel_to_normalized(jnp.float32(pixel), size, ac)) == pytest.approx(
            coord if size > 1 else 0.0, abs=1e-6)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_pixel_normalized_round_trip(align_corners):
    rng = np.random.default_rng(0)
    for size in (2, 5, 16):
        pixel = jnp.asarray(rng.uniform(-3, size + 2, 50))
        back = normalized_to_pixel(pixel_to_normalized(pixel, size, align_corners), size, align_corners)
        np.testing.assert_allclose(np.asarray(back), np.asarray(pixel), rtol=0, atol=1e-5)
        coord = jnp.asarray(rng.uniform(-1.5, 1.5, 50))
        back = pixel_to_normalized(normalized_to_pixel(coord, size, align_corners), size, align_corners)
        np.testing.assert_allclose(np.asarray(back), np.asarray(coord), rtol=0, atol=1e-6)
        # The identity grid's pixel coordinates are the integer indices.
        np.testing.assert_allclose(np.asarray(normalized_to_pixel(pixel_centers(size, align_corners), size,
                                                                  align_corners)),
                                   np.arange(size), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Registry and identities.
# ---------------------------------------------------------------------------


def test_registry_contents():
    assert sorted(TRANSFORMS) == ["affine", "affine3d", "attention", "projective", "tps"]
    expected = {"affine": (6, 2), "attention": (3, 2), "projective": (8, 2), "tps": (32, 2), "affine3d": (12, 3)}
    for name, (num_params, dims) in expected.items():
        t = get_transform(name)
        assert t is TRANSFORMS[name] and t.name == name
        assert (t.num_params, t.spatial_dims) == (num_params, dims)
        assert t.identity.shape == (num_params,)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_identity_params_give_identity_grid(name, align_corners):
    t = TRANSFORMS[name]
    size = (5, 7) if t.spatial_dims == 2 else (3, 4, 5)
    grid = t.make_grid(jnp.asarray(t.identity), size, align_corners=align_corners)
    assert grid.shape == size + (t.spatial_dims,)
    np.testing.assert_array_equal(np.asarray(grid), identity_grid(size, align_corners))
    # Batched parameters give a batch of grids.
    batch = t.make_grid(jnp.asarray(np.stack([t.identity] * 2)), size, align_corners=align_corners)
    assert batch.shape == (2,) + size + (t.spatial_dims,)
    np.testing.assert_array_equal(np.asarray(batch[1]), identity_grid(size, align_corners))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_warp_with_identity_params_reproduces_image(name):
    t = TRANSFORMS[name]
    rng = np.random.default_rng(1)
    # Dyadic sizes (see test_sampler): the identity grid hits pixels exactly.
    for align_corners, size in [(False, (4, 8) if t.spatial_dims == 2 else (2, 4, 4)),
                                (True, (5, 3) if t.spatial_dims == 2 else (3, 2, 5))]:
        image = rng.standard_normal((2,) + size + (2,)).astype(np.float32)
        params = np.stack([t.identity] * 2)
        out = warp(image, params, transform=name, align_corners=align_corners)
        np.testing.assert_array_equal(np.asarray(out), image)


def test_warp_output_size_and_default():
    rng = np.random.default_rng(2)
    image = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    theta = np.tile(np.array([[0.5, 0, 0.1], [0, 0.5, -0.2]], np.float32), (2, 1, 1))
    out = warp(image, theta, (3, 4), mode="nearest", padding_mode="border")
    assert out.shape == (2, 3, 4, 3)
    expected = grid_sample(image, affine_grid(theta, (3, 4)), mode="nearest", padding_mode="border")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert warp(image, theta).shape == image.shape


# ---------------------------------------------------------------------------
# Affine, attention, projective grids.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", ALIGN)
def test_affine_grid_matches_numpy(align_corners):
    rng = np.random.default_rng(3)
    theta = _random_affine(rng)
    grid = affine_grid(theta.astype(np.float32), (4, 6), align_corners)
    expected = _apply_affine(theta, identity_grid((4, 6), align_corners, np.float64))
    np.testing.assert_allclose(np.asarray(grid), expected, rtol=0, atol=1e-6)
    # The flat (..., 6) form is row-major.
    np.testing.assert_array_equal(np.asarray(affine_grid(theta.reshape(6).astype(np.float32), (4, 6),
                                                         align_corners)), np.asarray(grid))
    theta3 = _random_affine(rng, 3)
    grid3 = affine_grid_3d(theta3.astype(np.float32), (2, 3, 4), align_corners)
    expected3 = _apply_affine(theta3, identity_grid((2, 3, 4), align_corners, np.float64))
    np.testing.assert_allclose(np.asarray(grid3), expected3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_attention_equals_isotropic_affine(align_corners):
    params = np.array([[0.5, 0.25, -0.125], [1.5, -0.3, 0.7]], np.float32)
    np.testing.assert_array_equal(np.asarray(attention_to_affine(params)),
                                  np.array([[[0.5, 0, 0.25], [0, 0.5, -0.125]], [[1.5, 0, -0.3], [0, 1.5, 0.7]]],
                                           np.float32))
    grid = np.asarray(attention_grid(params, (4, 5), align_corners))
    base = identity_grid((4, 5), align_corners, np.float64)
    for b, (s, tx, ty) in enumerate(params.astype(np.float64)):
        expected = np.stack([s * base[..., 0] + tx, s * base[..., 1] + ty], -1)
        np.testing.assert_allclose(grid[b], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grid, np.asarray(affine_grid(attention_to_affine(params), (4, 5), align_corners)),
                               rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        attention_to_affine(np.zeros((2, 4)))


@pytest.mark.parametrize("align_corners", ALIGN)
def test_projective_with_affine_params_equals_affine(align_corners):
    rng = np.random.default_rng(4)
    theta = _random_affine(rng).astype(np.float32)
    params = np.concatenate([theta.reshape(6), [0.0, 0.0]]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(projective_grid(params, (4, 6), align_corners)),
                               np.asarray(affine_grid(theta, (4, 6), align_corners)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_projective_grid_matches_numpy(align_corners):
    rng = np.random.default_rng(5)
    h = np.eye(3) + 0.2 * rng.standard_normal((3, 3))
    h /= h[2, 2]
    params = h.reshape(9)[:8]
    np.testing.assert_allclose(np.asarray(projective_matrix(params)), h, rtol=1e-6, atol=1e-7)
    base = identity_grid((4, 6), align_corners, np.float64)
    homog = np.concatenate([base, np.ones(base.shape[:-1] + (1,))], -1) @ h.T
    expected = homog[..., :2] / homog[..., 2:]
    for p in (params, h):  # 8-vector and 3x3 matrix
        np.testing.assert_allclose(np.asarray(projective_grid(p.astype(np.float32), (4, 6), align_corners)),
                                   expected, rtol=1e-5, atol=1e-5)


def test_projective_eps_guard_gives_finite_grid_and_gradients():
    # h31 = 1, h33 = 1: w = x + 1, exactly 0 on the first column (x = -1) with align_corners.
    params = jnp.array([1.0, 0, 0, 0, 1, 0, 1, 0], jnp.float32)
    grid = np.asarray(projective_grid(params, (3, 4), align_corners=True, eps=1e-6))
    assert np.all(np.isfinite(grid))
    # u = x = -1 on that column, divided by +eps: far outside the image.
    np.testing.assert_allclose(grid[:, 0, 0], -1e6, rtol=1e-3)
    # Elsewhere the plain formula: (x / (x + 1), y / (x + 1)).
    x, y = identity_grid((3, 4), True, np.float64)[:, 1:].transpose(2, 0, 1)
    np.testing.assert_allclose(grid[:, 1:], np.stack([x / (x + 1), y / (x + 1)], -1), rtol=1e-5)
    image = np.ones((3, 4, 1), np.float32)

    def losses(p):
        grid_sum = jnp.sum(projective_grid(p, (3, 4), align_corners=True))
        return [grid_sum] + [jnp.sum(warp(image, p, transform="projective", align_corners=True,
                                          padding_mode=padding_mode) ** 2)
                             for padding_mode in ("zeros", "border", "reflection")]

    # Gradient of the sum: finite iff every term's gradient is (non-finite values would propagate).
    values, grads = jax.jit(lambda p: (losses(p), jax.grad(lambda q: sum(losses(q)))(p)))(params)
    assert all(np.isfinite(float(v)) for v in values)
    assert np.all(np.isfinite(np.asarray(grads)))


# ---------------------------------------------------------------------------
# Composition and inversion.
# ---------------------------------------------------------------------------


def test_compose_and_invert_affine_round_trips():
    rng = np.random.default_rng(6)
    round_trips = jax.jit(lambda t: (invert_affine(t), compose_affine(t, invert_affine(t)),
                                     compose_affine(invert_affine(t), t)))
    for n in (2, 3):
        eye = np.eye(n, n + 1)
        t = np.stack([_random_affine(rng, n) for _ in range(3)]).astype(np.float32)
        inv, forward, backward = round_trips(t)
        np.testing.assert_allclose(np.asarray(forward), np.broadcast_to(eye, t.shape), atol=1e-5)
        np.testing.assert_allclose(np.asarray(backward), np.broadcast_to(eye, t.shape), atol=1e-5)
        # Against numpy on homogeneous matrices.
        hom = np.concatenate([t, np.broadcast_to(np.eye(1, n + 1, n), (3, 1, n + 1))], 1).astype(np.float64)
        np.testing.assert_allclose(np.asarray(inv), np.linalg.inv(hom)[:, :n], rtol=1e-4, atol=1e-5)


def test_compose_affine_is_outer_after_inner():
    rng = np.random.default_rng(7)
    outer, inner = _random_affine(rng), _random_affine(rng)
    points = rng.standard_normal((10, 2))
    composed = np.asarray(compose_affine(outer.astype(np.float32), inner.astype(np.float32)), np.float64)
    np.testing.assert_allclose(_apply_affine(composed, points), _apply_affine(outer, _apply_affine(inner, points)),
                               rtol=1e-5, atol=1e-5)
    # Not commutative for these: the order matters and is the documented one.
    assert not np.allclose(_apply_affine(composed, points), _apply_affine(inner, _apply_affine(outer, points)),
                           atol=1e-2)
    with pytest.raises(ValueError):
        compose_affine(np.eye(2, 3), np.eye(3, 4))


def test_compose_and_invert_projective_round_trips():
    rng = np.random.default_rng(8)
    h = np.eye(3) + 0.2 * rng.standard_normal((2, 3, 3))
    h = (h / h[:, 2:, 2:]).astype(np.float32)
    params = h.reshape(2, 9)[:, :8]
    inv = np.asarray(invert_projective(params))
    np.testing.assert_allclose(inv[:, 2, 2], 1.0, rtol=1e-6)
    for prod in (np.asarray(compose_projective(params, inv)), np.asarray(compose_projective(inv, h))):
        prod = prod / prod[:, 2:, 2:]
        np.testing.assert_allclose(prod, np.broadcast_to(np.eye(3), prod.shape), atol=1e-5)
    # compose_projective(outer, inner) maps x to outer(inner(x)) (projectively).
    x = np.array([0.3, -0.4, 1.0])
    composed = np.asarray(compose_projective(h[0], h[1]), np.float64)
    np.testing.assert_allclose(composed @ x, h[0].astype(np.float64) @ (h[1].astype(np.float64) @ x), rtol=1e-5)
    # Unnormalised inverse is the plain matrix inverse.
    np.testing.assert_allclose(np.asarray(invert_projective(h[0], normalize=False)),
                               np.linalg.inv(h[0].astype(np.float64)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_two_warps_equal_one_warp_with_composed_affine(align_corners):
    # Grids map target -> source: warping U with A gives V(x) = U(A x); warping V
    # with B gives U(A(B x)), i.e. one warp with compose_affine(A, B).
    # A = rotation by 90 degrees, B = an integer shift: both land on pixel
    # centres, so the result is exact (up to float32 rounding of the grid), and
    # A and B do not commute, so the order is tested.
    n = 5
    rng = np.random.default_rng(9)
    image = rng.standard_normal((n, n, 2)).astype(np.float32)
    step = 2 / (n - 1) if align_corners else 2 / n
    a = np.array([[0, -1, 0], [1, 0, 0]], np.float32)
    b = np.array([[1, 0, 1 * step], [0, 1, -2 * step]], np.float32)
    twice = warp(warp(image, a, align_corners=align_corners), b, align_corners=align_corners)
    once = warp(image, compose_affine(a, b), align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(twice), np.asarray(once), rtol=0, atol=1e-5)
    # Independent check: rot90 then shift by (ky, kx) = (-2, 1) with zero fill.
    rot = np.rot90(image, 1, axes=(0, 1))
    expected = np.zeros_like(image)
    expected[2:, :n - 1] = rot[:n - 2, 1:]
    np.testing.assert_allclose(np.asarray(once), expected, rtol=0, atol=1e-5)
    wrong = warp(image, compose_affine(b, a), align_corners=align_corners)
    assert not np.allclose(np.asarray(wrong), expected, atol=1e-2)


# ---------------------------------------------------------------------------
# Thin-plate spline.
# ---------------------------------------------------------------------------


def test_default_control_points():
    c = default_control_points()
    assert c.shape == (16, 2)
    third = 1 / 3
    np.testing.assert_allclose(np.unique(c[:, 0]), [-1, -third, third, 1])
    np.testing.assert_allclose(c[:4], [[-1, -1], [-third, -1], [third, -1], [1, -1]])  # x varies fastest
    assert default_control_points(3).shape == (9, 2)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_tps_zero_offsets_give_identity_exactly(align_corners):
    for params in (np.zeros((16, 2), np.float32), np.zeros((2, 32), np.float32)):
        grid = np.asarray(tps_grid(params, (5, 7), align_corners=align_corners))
        np.testing.assert_array_equal(grid, np.broadcast_to(identity_grid((5, 7), align_corners), grid.shape))


@pytest.mark.parametrize("regularization", [0.0, 0.1])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_tps_reproduces_affine_maps(align_corners, regularization):
    rng = np.random.default_rng(10)
    thetas = np.stack([_random_affine(rng, scale=0.2) for _ in range(2)])
    c = default_control_points()
    offsets = np.stack([_apply_affine(t, c) - c for t in thetas]).astype(np.float32)
    grid = tps_grid(offsets, (5, 7), align_corners=align_corners, regularization=regularization)
    expected = np.stack([_apply_affine(t, identity_grid((5, 7), align_corners, np.float64)) for t in thetas])
    np.testing.assert_allclose(np.asarray(grid), expected, rtol=0, atol=1e-5)
    # The flattened (..., 2K) form is the same, (x, y) interleaved.
    np.testing.assert_array_equal(np.asarray(tps_grid(offsets.reshape(2, 32), (5, 7), align_corners=align_corners,
                                                      regularization=regularization)), np.asarray(grid))


def test_tps_custom_control_points_interpolate_offsets():
    # Control points placed on pixel centres of a 5 x 5 grid with align_corners
    # (centres at -1, -0.5, 0, 0.5, 1): the spline passes through c_k + offset_k there.
    points = np.array([[-1, -1], [1, -1], [0, 0], [-0.5, 1], [1, 0.5], [0.5, -0.5]], np.float64)
    rng = np.random.default_rng(11)
    offsets = 0.1 * rng.standard_normal((6, 2))
    grid = np.asarray(tps_grid(offsets.astype(np.float32), (5, 5), control_points=points, align_corners=True))
    cols = np.round((points[:, 0] + 1) * 2).astype(int)
    rows = np.round((points[:, 1] + 1) * 2).astype(int)
    np.testing.assert_allclose(grid[rows, cols], points + offsets, rtol=0, atol=1e-5)
    # Affine offsets are reproduced for custom points too.
    theta = _random_affine(rng, scale=0.2)
    aff = (_apply_affine(theta, points) - points).astype(np.float32)
    np.testing.assert_allclose(np.asarray(tps_grid(aff, (4, 6), control_points=points)),
                               _apply_affine(theta, identity_grid((4, 6), False, np.float64)), rtol=0, atol=1e-5)
    # Regularisation smooths: it no longer interpolates non-affine offsets exactly.
    smooth = np.asarray(tps_grid(offsets.astype(np.float32), (5, 5), control_points=points, align_corners=True,
                                 regularization=1.0))
    assert np.max(np.abs(smooth[rows, cols] - (points + offsets))) > 1e-3


def test_tps_bad_shapes_raise():
    for shape in [(15, 2), (31,), (16, 3), (2, 16)]:
        with pytest.raises(ValueError, match="offsets") as info:
            tps_grid(np.zeros(shape, np.float32), (4, 4))
        assert str(shape) in str(info.value)
    with pytest.raises(ValueError, match="control_points"):
        tps_grid(np.zeros((2, 2), np.float32), (4, 4), control_points=np.zeros((2, 2)))


def test_warp_affine3d():
    rng = np.random.default_rng(12)
    vol = rng.standard_normal((2, 4, 4, 1)).astype(np.float32)
    # Shift by one voxel along z (align_corners=False: t = 2 / D): out[d] = vol[d + 1].
    theta = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.0]], np.float32)
    out = np.asarray(warp(vol, theta, transform="affine3d"))
    np.testing.assert_allclose(out[0], vol[1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)
