"""grid_sample / grid_sample_3d against independent references (scipy, hand-derived values, numpy)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ALIGN,
    CPU_SAMPLERS,
    MODES,
    PADDINGS,
    for_each_padding,
    interior_grid,
    scipy_sample,
    to_normalized,
    use_cpu_sampler,
)

import stn_jax
from stn_jax import affine_grid, get_transform, grid_sample, grid_sample_3d, identity_grid, warp

# ---------------------------------------------------------------------------
# Interior points against scipy.ndimage.map_coordinates.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode,order", [("bilinear", 1), ("nearest", 0)])
def test_interior_points_match_scipy_map_coordinates(mode, order, align_corners):
    # Inside [0, W-1] x [0, H-1] (pixel units) no padding mode matters, so all
    # of them must agree with map_coordinates(mode="constant").
    rng = np.random.default_rng(10)
    images = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    grids = np.stack([interior_grid(rng, (4, 6), 5, 7, align_corners, avoid_ties=(order == 0))
                      for _ in range(2)]).astype(np.float32)
    expected = np.stack([scipy_sample(images[b], grids[b], order, align_corners) for b in range(2)])
    outs = for_each_padding(grid_sample, mode=mode, align_corners=align_corners)(images, grids)
    for padding_mode, out in zip(PADDINGS, outs):
        assert out.shape == (2, 4, 6, 3)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5, err_msg=padding_mode)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_zeros_padding_matches_scipy_constant_mode_slightly_outside(align_corners):
    # Up to one pixel outside the image, zero padding blends the edge pixels
    # with zeros. scipy's mode="grid-constant" does exactly that (mode="constant"
    # does not interpolate beyond the edges), so it is the reference here.
    from scipy import ndimage

    rng = np.random.default_rng(11)
    h, w = 4, 6
    image = rng.standard_normal((h, w, 2))
    px = rng.uniform(-1.5, w + 0.5, (5, 5))
    py = rng.uniform(-1.5, h + 0.5, (5, 5))
    grid = np.stack([to_normalized(px, w, align_corners), to_normalized(py, h, align_corners)], -1)
    out = np.asarray(grid_sample(image.astype(np.float32), grid.astype(np.float32),
                                 align_corners=align_corners))
    expected = np.stack([ndimage.map_coordinates(image[..., c], [py.ravel(), px.ravel()], order=1,
                                                 mode="grid-constant", cval=0.0).reshape(5, 5)
                         for c in range(2)], -1)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_3d_interior_points_match_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(12)
    d, h, w = 3, 4, 5
    vol = rng.standard_normal((d, h, w, 2))
    pz, py, px = (rng.uniform(0, n - 1, (2, 3, 4)) for n in (d, h, w))
    for align_corners in ALIGN:
        grid = np.stack([to_normalized(px, w, align_corners), to_normalized(py, h, align_corners),
                         to_normalized(pz, d, align_corners)], -1)
        out = np.asarray(grid_sample_3d(vol.astype(np.float32), grid.astype(np.float32),
                                        align_corners=align_corners))
        expected = np.stack([ndimage.map_coordinates(vol[..., c], [pz.ravel(), py.ravel(), px.ravel()],
                                                     order=1, mode="constant").reshape(2, 3, 4)
                             for c in range(2)], -1)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Hand-derived values at the borders: a 1 x 4 image [1, 2, 3, 4].
# ---------------------------------------------------------------------------

# align_corners=False, W=4: pixel p = ((x + 1) * 4 - 1) / 2 = 2 x + 1.5.
#   zeros: taps floor(p), floor(p)+1, pixels outside read 0;
#   border: p clipped to [0, 3];
#   reflection: p mirrored about the outer edges -0.5 and 3.5, then clipped.
BILINEAR_EDGE_CASES_FALSE = [
    # x,    zeros, border, reflection
    (-1.0,  0.5,  1.0, 1.0),   # p=-0.5: 0.5*0 + 0.5*1; border/refl: p -> 0 -> 1
    (-1.1,  0.3,  1.0, 1.0),   # p=-0.7: 0.3*1; reflection -> -0.3 -> clipped to 0 -> 1
    (-1.25, 0.0,  1.0, 1.0),   # p=-1.0: weight 0 on pixel 0; reflection -> 0 -> 1
    (-1.5,  0.0,  1.0, 1.5),   # p=-1.5: reflection -> 0.5 -> (1 + 2) / 2
    (-2.5,  0.0,  1.0, 3.5),   # p=-3.5: reflection -> 2.5 -> (3 + 4) / 2
    (0.0,   2.5,  2.5, 2.5),   # p=1.5: interior, (2 + 3) / 2
    (0.9,   2.8,  4.0, 4.0),   # p=3.3: 0.7*4 + 0.3*0; border clip 3 -> 4; reflection 3.3 -> clip 3 -> 4
    (1.0,   2.0,  4.0, 4.0),   # p=3.5: 0.5*4
    (1.5,   0.0,  4.0, 3.5),   # p=4.5: reflection -> 2.5 -> (3 + 4) / 2
    (2.0,   0.0,  4.0, 2.5),   # p=5.5: reflection -> 1.5 -> (2 + 3) / 2
]
# align_corners=True, W=4: p = (x + 1) * 1.5; reflection mirrors about the end
# pixel centres 0 and 3.
BILINEAR_EDGE_CASES_TRUE = [
    (-1.0,  1.0,  1.0, 1.0),   # p=0: pixel 0 exactly
    (-1.2,  0.7,  1.0, 1.3),   # p=-0.3: zeros 0.7*1; reflection -> 0.3 -> 0.7*1 + 0.3*2
    (-2.0,  0.0,  1.0, 2.5),   # p=-1.5: reflection -> 1.5 -> (2 + 3) / 2
    (-3.0,  0.0,  1.0, 4.0),   # p=-3: reflection -> 3 -> 4
    (0.0,   2.5,  2.5, 2.5),   # p=1.5
    (1.0,   4.0,  4.0, 4.0),   # p=3: pixel 3 exactly
    (1.4,   1.6,  4.0, 3.4),   # p=3.6: zeros 0.4*4; reflection -> 2.4 -> 0.6*3 + 0.4*4
    (2.5,   0.0,  4.0, 1.75),  # p=5.25: reflection -> 0.75 -> 0.25*1 + 0.75*2
]
# Nearest: round the (padded) pixel coordinate; no case is near a .5 tie.
NEAREST_EDGE_CASES_FALSE = [
    (-0.95, 1.0, 1.0, 1.0),    # p=-0.4 -> 0 (inside)
    (-1.1,  0.0, 1.0, 1.0),    # p=-0.7 -> -1 (outside); border 0; reflection -0.3 -> clip 0
    (-1.6,  0.0, 1.0, 2.0),    # p=-1.7; reflection -> 0.7 -> 1 -> value 2
    (0.9,   4.0, 4.0, 4.0),    # p=3.3 -> 3
    (1.2,   0.0, 4.0, 4.0),    # p=3.9 -> 4 (outside); reflection -> 3.1 -> clip 3
    (1.6,   0.0, 4.0, 3.0),    # p=4.7; reflection -> 2.3 -> 2 -> value 3
]
NEAREST_EDGE_CASES_TRUE = [
    (-1.2,  1.0, 1.0, 1.0),    # p=-0.3 -> 0; reflection 0.3 -> 0
    (-1.4,  0.0, 1.0, 2.0),    # p=-0.6 -> -1 (outside); reflection 0.6 -> 1 -> value 2
    (1.5,   0.0, 4.0, 3.0),    # p=3.75 -> 4 (outside); reflection 2.25 -> 2 -> value 3
    (2.5,   0.0, 4.0, 2.0),    # p=5.25; reflection 0.75 -> 1 -> value 2
]
EDGE_CASES = {("bilinear", False): BILINEAR_EDGE_CASES_FALSE, ("bilinear", True): BILINEAR_EDGE_CASES_TRUE,
              ("nearest", False): NEAREST_EDGE_CASES_FALSE, ("nearest", True): NEAREST_EDGE_CASES_TRUE}


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
def test_hand_derived_values_at_the_borders(cpu_sampler, mode, align_corners):
    cases = EDGE_CASES[mode, align_corners]
    coords = np.array([c[0] for c in cases], np.float32)
    # A batch of two 4 x 4 images: [1, 2, 3, 4] along x in every row, and its
    # transpose (the same along y). The other coordinate is 0, pixel 1.5, where
    # the rows (columns) being identical makes the blend irrelevant, so each
    # image acts as the 1 x 4 image of the tables along one axis.
    values = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    along_x = np.tile(values, (4, 1))
    images = np.stack([along_x, along_x.T])[..., None]
    zeros = np.zeros_like(coords)
    grids = np.stack([np.stack([coords, zeros], -1), np.stack([zeros, coords], -1)])[:, None]
    outs = for_each_padding(grid_sample, mode=mode, align_corners=align_corners)(images, grids)
    for column, (padding_mode, out) in enumerate(zip(PADDINGS, outs), start=1):
        expected = np.array([c[column] for c in cases], np.float32)
        out = np.asarray(out)
        np.testing.assert_allclose(out[0, 0, :, 0], expected, rtol=0, atol=1e-5, err_msg=f"x {padding_mode}")
        np.testing.assert_allclose(out[1, 0, :, 0], expected, rtol=0, atol=1e-5, err_msg=f"y {padding_mode}")


def test_hand_derived_values_1xN_image():
    # The literal 1 x 4 image (a size-1 axis: y = 0 is the centre of the single
    # row in both conventions), bilinear, all paddings.
    image = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 4, 1)
    for align_corners in ALIGN:
        cases = EDGE_CASES["bilinear", align_corners]
        coords = np.array([c[0] for c in cases], np.float32)
        grid = np.stack([coords, np.zeros_like(coords)], -1)[None]
        outs = for_each_padding(grid_sample, align_corners=align_corners)(image, grid)
        for column, (padding_mode, out) in enumerate(zip(PADDINGS, outs), start=1):
            np.testing.assert_allclose(np.asarray(out)[0, :, 0], [c[column] for c in cases], rtol=0, atol=1e-5,
                                       err_msg=f"{padding_mode} align_corners={align_corners}")


# ---------------------------------------------------------------------------
# Identity grids, integer translations, rotations by 90 degrees.
# ---------------------------------------------------------------------------

# Sizes whose pixel centres and pixel coordinates are exact binary fractions in
# float32 (n a power of two without align_corners, n - 1 one with it): there the
# identity grid lands exactly on every pixel and sampling must be bit-exact.
DYADIC_2D = {False: (4, 8), True: (5, 9)}
DYADIC_2D_THIN = {False: [(1, 2), (8, 1)], True: [(1, 3), (2, 5)]}
DYADIC_3D = {False: (2, 4, 8), True: (3, 5, 2)}


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
def test_identity_grid_reproduces_image_exactly(mode, align_corners):
    rng = np.random.default_rng(20)
    size = DYADIC_2D[align_corners]
    image = rng.standard_normal((2,) + size + (3,)).astype(np.float32)
    outs = for_each_padding(grid_sample, mode=mode, align_corners=align_corners)(
        image, identity_grid(size, align_corners))
    for padding_mode, out in zip(PADDINGS, outs):
        np.testing.assert_array_equal(np.asarray(out), image, err_msg=padding_mode)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_identity_grid_reproduces_thin_images_exactly(align_corners):
    rng = np.random.default_rng(25)
    for size in DYADIC_2D_THIN[align_corners]:
        image = rng.standard_normal(size + (2,)).astype(np.float32)
        for mode in MODES:
            out = grid_sample(image, identity_grid(size, align_corners), mode=mode, align_corners=align_corners)
            np.testing.assert_array_equal(np.asarray(out), image, err_msg=f"{size} {mode}")


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_identity_grid_reproduces_volume_exactly(mode, align_corners):
    rng = np.random.default_rng(21)
    size = DYADIC_3D[align_corners]
    vol = rng.standard_normal(size + (2,)).astype(np.float32)
    outs = for_each_padding(grid_sample_3d, mode=mode, align_corners=align_corners)(
        vol, identity_grid(size, align_corners))
    for padding_mode, out in zip(PADDINGS, outs):
        np.testing.assert_array_equal(np.asarray(out), vol, err_msg=padding_mode)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_identity_grid_general_sizes(align_corners):
    # For other sizes the float32 grid is rounded (a few 1e-8 in normalised
    # units), so bilinear is exact up to that rounding; nearest stays exact.
    rng = np.random.default_rng(22)
    for size in [(5, 7), (7, 3)]:
        image = rng.uniform(-1, 1, size + (2,)).astype(np.float32)
        grid = identity_grid(size, align_corners)
        np.testing.assert_allclose(np.asarray(grid_sample(image, grid, align_corners=align_corners)),
                                   image, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(
            np.asarray(grid_sample(image, grid, mode="nearest", align_corners=align_corners)), image)
    for size in [(3, 4, 5)]:
        vol = rng.uniform(-1, 1, size + (1,)).astype(np.float32)
        grid = identity_grid(size, align_corners)
        np.testing.assert_allclose(np.asarray(grid_sample_3d(vol, grid, align_corners=align_corners)),
                                   vol, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(
            np.asarray(grid_sample_3d(vol, grid, mode="nearest", align_corners=align_corners)), vol)


def _shifted(image, ky, kx, padding_mode, align_corners):
    """out[i, j] = padded_image[i + ky, j + kx], padding done by numpy.

    zeros -> constant 0; border -> edge replication; reflection -> mirror about
    the outer pixel edges ("symmetric", the edge pixel repeats) without
    align_corners and about the end pixel centres ("reflect") with it.
    """
    h, w = image.shape[:2]
    pad = max(abs(ky), abs(kx))
    np_mode = {"zeros": "constant", "border": "edge",
               "reflection": "reflect" if align_corners else "symmetric"}[padding_mode]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    return padded[pad + ky:pad + ky + h, pad + kx:pad + kx + w]


def test_shift_helper_is_roll_with_zero_fill():
    # Sanity of the numpy reference itself on a tiny example, written out by hand.
    image = np.arange(1, 7, dtype=np.float32).reshape(2, 3, 1)  # [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(_shifted(image, 0, 1, "zeros", False)[..., 0], [[2, 3, 0], [5, 6, 0]])
    np.testing.assert_array_equal(_shifted(image, 1, -1, "zeros", False)[..., 0], [[0, 4, 5], [0, 0, 0]])
    rolled = np.roll(image, (-1, 1), axis=(0, 1))
    rolled[1:] = 0
    rolled[:, :1] = 0
    np.testing.assert_array_equal(_shifted(image, 1, -1, "zeros", False), rolled)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_integer_translation_equals_array_shift(padding_mode, mode, align_corners):
    # A translation by k pixels is t = 2 k / W in normalised units (2 k / (W - 1)
    # with align_corners): out[i, j] = image[i + ky, j + kx] (source = target + t).
    rng = np.random.default_rng(23)
    h, w = 5, 7
    image = rng.standard_normal((h, w, 2)).astype(np.float32)
    step_x = 2 / (w - 1) if align_corners else 2 / w
    step_y = 2 / (h - 1) if align_corners else 2 / h
    for ky, kx in [(0, 1), (1, -3), (-2, 2), (3, 0)]:
        theta = np.array([[1, 0, kx * step_x], [0, 1, ky * step_y]], np.float32)
        out = np.asarray(warp(image, theta, align_corners=align_corners, mode=mode, padding_mode=padding_mode))
        expected = _shifted(image, ky, kx, padding_mode, align_corners)
        if mode == "nearest":
            np.testing.assert_array_equal(out, expected, err_msg=f"shift {(ky, kx)}")
        else:
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5, err_msg=f"shift {(ky, kx)}")


ROT_CCW = np.array([[0, -1, 0], [1, 0, 0]], np.float32)  # source (x, y) = (-y_t, x_t)
ROT_CW = np.array([[0, 1, 0], [-1, 0, 0]], np.float32)   # source (x, y) = (y_t, -x_t)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_rotation_by_90_degrees_equals_rot90(align_corners):
    # Target pixel (i, j) has normalised (x_t, y_t) = (c_j, c_i) with c_{n-1-k} = -c_k.
    # ROT_CCW reads (x, y) = (-c_i, c_j) = (c_{n-1-i}, c_j): row j, column n-1-i,
    # i.e. out[i, j] = image[j, n-1-i] = np.rot90(image)[i, j] (counter-clockwise).
    rng = np.random.default_rng(24)
    n = 5 if align_corners else 4  # dyadic: exact lattice, bit-exact result
    image = rng.standard_normal((n, n, 3)).astype(np.float32)
    rotate = jax.jit(lambda x, t: [warp(x, t, align_corners=align_corners, mode=m) for m in MODES])
    for theta, k in [(ROT_CCW, 1), (ROT_CW, -1)]:
        expected = np.rot90(image, k, axes=(0, 1))
        for mode, out in zip(MODES, rotate(image, theta)):
            np.testing.assert_array_equal(np.asarray(out), expected, err_msg=f"k={k} {mode}")
    # Other sizes: exact up to the float32 rounding of the grid (nearest exactly).
    image = rng.standard_normal((6, 6, 1)).astype(np.float32)
    bilinear, nearest = rotate(image, ROT_CCW)
    np.testing.assert_allclose(np.asarray(bilinear), np.rot90(image, 1, axes=(0, 1)), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(nearest), np.rot90(image, 1, axes=(0, 1)))


# ---------------------------------------------------------------------------
# Broadcasting, vmap, jit.
# ---------------------------------------------------------------------------


def _random_grid(rng, shape):
    return rng.uniform(-1.3, 1.3, shape + (2,)).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_one_image_many_grids_broadcasts(mode):
    rng = np.random.default_rng(30)
    image = rng.standard_normal((5, 7, 2)).astype(np.float32)
    grids = _random_grid(rng, (3, 4, 6))
    out = np.asarray(grid_sample(image, grids, mode=mode))
    copies = np.broadcast_to(image, (3,) + image.shape)
    expected = np.asarray(grid_sample(np.ascontiguousarray(copies), grids, mode=mode))
    assert out.shape == (3, 4, 6, 2)
    np.testing.assert_array_equal(out, expected)
    for b in range(3):  # and each equals the unbatched call
        np.testing.assert_allclose(out[b], np.asarray(grid_sample(image, grids[b], mode=mode)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_many_images_one_grid_broadcasts(mode):
    rng = np.random.default_rng(31)
    images = rng.standard_normal((3, 5, 7, 2)).astype(np.float32)
    grid = _random_grid(rng, (4, 6))
    out = np.asarray(grid_sample(images, grid, mode=mode, padding_mode="border"))
    expected = np.asarray(grid_sample(images, np.ascontiguousarray(np.broadcast_to(grid, (3, 4, 6, 2))),
                                      mode=mode, padding_mode="border"))
    np.testing.assert_array_equal(out, expected)
    for b in range(3):
        np.testing.assert_allclose(out[b], np.asarray(grid_sample(images[b], grid, mode=mode, padding_mode="border")),
                                   rtol=0, atol=1e-6)


def test_multiple_batch_dims_broadcast_numpy_style():
    rng = np.random.default_rng(32)
    images = rng.standard_normal((2, 1, 4, 5, 1)).astype(np.float32)
    grids = _random_grid(rng, (1, 3, 2, 3))
    # Under jit (the nested eager vmaps compile every operation separately: slow).
    sample = jax.jit(functools.partial(grid_sample, padding_mode="reflection"))
    out = np.asarray(sample(images, grids))
    assert out.shape == (2, 3, 2, 3, 1)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(out[a, b], np.asarray(sample(images[a, 0], grids[0, b])),
                                       rtol=0, atol=1e-6)


def test_3d_broadcasting():
    rng = np.random.default_rng(33)
    vol = rng.standard_normal((2, 3, 4, 1)).astype(np.float32)
    grids = rng.uniform(-1.2, 1.2, (2, 2, 3, 2, 3)).astype(np.float32)
    sample = jax.jit(grid_sample_3d)
    out = np.asarray(sample(vol, grids))
    assert out.shape == (2, 2, 3, 2, 1)
    for b in range(2):
        np.testing.assert_allclose(out[b], np.asarray(sample(vol, grids[b])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_equals_batched_call(mode):
    rng = np.random.default_rng(34)
    images = rng.standard_normal((3, 5, 7, 2)).astype(np.float32)
    grids = _random_grid(rng, (3, 4, 6))
    f = functools.partial(grid_sample, mode=mode, padding_mode="zeros")
    batched = np.asarray(f(images, grids))
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(images, grids)), batched, rtol=0, atol=1e-6)
    # Only the grid mapped, and only the image mapped.
    np.testing.assert_allclose(np.asarray(jax.vmap(f, in_axes=(None, 0))(images[0], grids)),
                               np.asarray(f(images[0], grids)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(f, in_axes=(0, None))(images, grids[1])),
                               np.stack([np.asarray(f(images[b], grids[1])) for b in range(3)]), rtol=0, atol=1e-6)
    # Mapped axis not in front.
    np.testing.assert_allclose(np.asarray(jax.vmap(f, in_axes=(3, 0), out_axes=0)(np.moveaxis(images, 0, 3), grids)),
                               batched, rtol=0, atol=1e-6)


def test_jit_matches_eager_and_reference():
    rng = np.random.default_rng(35)
    image = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    grid = interior_grid(rng, (2, 4, 4), 5, 7, False).astype(np.float32)
    f = jax.jit(lambda i, g: [grid_sample(i, g, padding_mode=p) for p in PADDINGS])
    expected = np.stack([scipy_sample(image[b], grid[b], 1, False) for b in range(2)])
    for padding_mode, out in zip(PADDINGS, f(image, grid)):
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5, err_msg=padding_mode)


def test_cpu_lowerings_agree():
    # The float32 CPU sampler has a native kernel and the pure-XLA lowering (the
    # one GPUs use); values must agree for every mode, padding and convention,
    # and bilinear gradients for the paddings whose float32 gradients no other
    # test runs through both lowerings (zeros: the float32 trap test in
    # test_grads; all paddings at NaN/inf points below). Each lowering is
    # compiled once for all of them.
    rng = np.random.default_rng(36)
    image = rng.standard_normal((2, 4, 5, 2)).astype(np.float32)
    grid = rng.uniform(-1.4, 1.4, (2, 3, 4, 2)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    configs = [(m, p, a) for m in MODES for p in PADDINGS for a in ALIGN]
    GRAD_CONFIGS = [("border", True), ("reflection", False)]

    def make_everything():  # a new function per lowering: jit caches traces per function
        def everything(i, g):
            out = []
            for mode, padding_mode, align_corners in configs:
                f = functools.partial(grid_sample, mode=mode, padding_mode=padding_mode,
                                      align_corners=align_corners)
                if mode == "nearest" or (padding_mode, align_corners) not in GRAD_CONFIGS:
                    out.append((f(i, g),))  # values only
                else:
                    value, vjp = jax.vjp(f, i, g)
                    out.append((value,) + vjp(cotangent))
            return out
        return jax.jit(everything)

    results = {}
    for impl in CPU_SAMPLERS:
        ctx = use_cpu_sampler(impl) if use_cpu_sampler is not None else contextlib.nullcontext()
        with ctx:
            lowered = make_everything().lower(image, grid)
            hlo = lowered.as_text()
            results[impl] = lowered.compile()(image, grid)
        # The choice does reach the compiled program (native = custom calls).
        assert ("stn_interp_f32" in hlo) == (impl == "native"), impl
    reference = results[CPU_SAMPLERS[-1]]
    for impl, res in results.items():
        for config, got, want in zip(configs, res, reference):
            for name, a, b in zip(("value", "image grad", "grid grad"), got, want):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                           err_msg=f"{impl} {config} {name}")
    # Sanity: the reference itself is right at one config (against scipy, interior points).
    inner = interior_grid(rng, (3, 4), 4, 5, False).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(grid_sample)(image[0], inner)),
                               scipy_sample(image[0], inner, 1, False), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,mantissa_bits", [(jnp.float16, 10), (jnp.bfloat16, 7)])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_images(dtype, mantissa_bits, mode):
    rng = np.random.default_rng(40)
    image32 = rng.uniform(0.5, 4.0, (2, 5, 7, 3)).astype(np.float32)
    image = jnp.asarray(image32, dtype)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 6, 2)).astype(np.float32)
    out = grid_sample(image, grid, mode=mode, padding_mode="border")
    assert out.dtype == dtype
    assert out.shape == (2, 4, 6, 3)
    out = np.asarray(out.astype(jnp.float32))
    # Interpolation is in float32: the result is the float32 result on the same
    # (rounded) pixels, rounded once to the image dtype: within half an ulp.
    ref = np.asarray(grid_sample(np.asarray(image.astype(jnp.float32)), grid, mode=mode, padding_mode="border"))
    ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - mantissa_bits)
    assert np.all(np.abs(out - ref) <= 0.5 * ulp + 1e-6 * np.abs(ref)), np.max(np.abs(out - ref) / ulp)
    # And close to the float32 image's result (the pixels were rounded too).
    full = np.asarray(grid_sample(image32, grid, mode=mode, padding_mode="border"))
    np.testing.assert_allclose(out, full, rtol=2.0 ** -mantissa_bits * 2, atol=0)


def test_float64_under_x64(x64):
    rng = np.random.default_rng(41)
    image = rng.standard_normal((5, 7, 2))
    grid = interior_grid(rng, (3, 4), 5, 7, True)
    out = grid_sample(jnp.asarray(image), jnp.asarray(grid), align_corners=True)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), scipy_sample(image, grid, 1, True), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# NaN and infinite coordinates.
# ---------------------------------------------------------------------------

NAN, INF = np.nan, np.inf
# 3 x 4 image with values 1..12: row y has [4y+1, ..., 4y+4].
NONFINITE_POINTS = np.array([[NAN, 0.0], [0.0, NAN], [NAN, NAN], [NAN, INF],
                             [INF, 0.0], [-INF, 0.0], [0.0, INF], [0.0, -INF], [INF, -INF]], np.float32)
# With border padding an infinite coordinate clips to the edge; y=0 is row 1
# ([5, 6, 7, 8]), x=0 is pixel 1.5 (between columns 1 and 2).
BORDER_EXPECTED = {"bilinear": [0, 0, 0, 0, 8.0, 5.0, 10.5, 2.5, 4.0],
                   "nearest": [0, 0, 0, 0, 8.0, 5.0, 11.0, 3.0, 4.0]}  # nearest: 1.5 -> 2 (half to even)


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_coordinates(cpu_sampler, mode):
    image = np.arange(1, 13, dtype=np.float32).reshape(3, 4, 1)
    grid = NONFINITE_POINTS[None]
    # Eagerly, values only.
    for padding_mode in PADDINGS:
        out = np.asarray(grid_sample(image, grid, mode=mode, padding_mode=padding_mode))[0, :, 0]
        expected = BORDER_EXPECTED[mode] if padding_mode == "border" else [0.0] * len(NONFINITE_POINTS)
        np.testing.assert_array_equal(out, np.array(expected, np.float32), err_msg=padding_mode)

    # Under jit, values and gradients of sum(out): finite; zero for NaN points.
    def values_and_grads(i, g):
        out = []
        for padding_mode in PADDINGS:
            loss = lambda i_, g_: jnp.sum(grid_sample(i_, g_, mode=mode, padding_mode=padding_mode))
            out.append((loss(i, g),) + jax.grad(loss, argnums=(0, 1))(i, g))
        return out

    for padding_mode, (total, gi, gg) in zip(PADDINGS, jax.jit(values_and_grads)(image, grid)):
        gi, gg = np.asarray(gi), np.asarray(gg)
        expected_total = sum(BORDER_EXPECTED[mode]) if padding_mode == "border" else 0.0
        assert float(total) == expected_total, padding_mode
        assert np.all(np.isfinite(gi)) and np.all(np.isfinite(gg)), padding_mode
        # NaN points: zero gradient w.r.t. their coordinates.
        np.testing.assert_array_equal(gg[0, :4], 0.0, err_msg=padding_mode)
        if padding_mode != "border":
            # Nothing is read anywhere: zero image gradient, zero grid gradient.
            np.testing.assert_array_equal(gi, 0.0, err_msg=padding_mode)
            np.testing.assert_array_equal(gg, 0.0, err_msg=padding_mode)
            continue
        # Only the infinite points read: the edge pixels, with the weights of BORDER_EXPECTED.
        expected = np.zeros((3, 4), np.float32)
        expected[1, 3] += 1  # (inf, 0)
        expected[1, 0] += 1  # (-inf, 0)
        expected[0, 3] += 1  # (inf, -inf)
        if mode == "bilinear":
            expected[2, 1:3] += 0.5  # (0, inf)
            expected[0, 1:3] += 0.5  # (0, -inf)
        else:
            expected[2, 2] += 1
            expected[0, 2] += 1
        np.testing.assert_array_equal(gi[..., 0], expected)
        # The clipped coordinate has zero derivative.
        np.testing.assert_array_equal(gg[0, 4:6, 0], 0.0)
        np.testing.assert_array_equal(gg[0, 6:8, 1], 0.0)
        np.testing.assert_array_equal(gg[0, 8], 0.0)


# ---------------------------------------------------------------------------
# Argument validation.
# ---------------------------------------------------------------------------


def _raises(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_bad_ranks_raise():
    grid = np.zeros((4, 4, 2), np.float32)
    _raises(lambda: grid_sample(np.zeros((5, 7), np.float32), grid), "image", "(5, 7)")
    _raises(lambda: grid_sample(np.zeros((5, 7, 1), np.float32), np.zeros((4, 2), np.float32)), "grid", "(4, 2)")
    _raises(lambda: grid_sample_3d(np.zeros((5, 7, 1), np.float32), np.zeros((2, 2, 2, 3), np.float32)),
            "image", "(5, 7, 1)")


def test_mismatched_batch_dims_raise():
    _raises(lambda: grid_sample(np.zeros((2, 5, 7, 1), np.float32), np.zeros((3, 4, 4, 2), np.float32)),
            "image", "grid", "(2, 5, 7, 1)", "(3, 4, 4, 2)")


def test_wrong_number_of_coordinates_raises():
    _raises(lambda: grid_sample(np.zeros((5, 7, 1), np.float32), np.zeros((4, 4, 3), np.float32)),
            "grid", "(4, 4, 3)")
    _raises(lambda: grid_sample_3d(np.zeros((3, 5, 7, 1), np.float32), np.zeros((2, 2, 2, 2), np.float32)),
            "grid", "(2, 2, 2, 2)")


def test_unknown_mode_and_padding_raise():
    image, grid = np.zeros((5, 7, 1), np.float32), np.zeros((4, 4, 2), np.float32)
    _raises(lambda: grid_sample(image, grid, mode="bicubic"), "mode", "bicubic", "bilinear", "nearest")
    _raises(lambda: grid_sample(image, grid, mode="trilinear"), "mode", "trilinear")  # 3-D only
    _raises(lambda: grid_sample(image, grid, padding_mode="wrap"), "padding_mode", "wrap", "reflection")
    _raises(lambda: grid_sample_3d(image[None], np.zeros((1, 2, 2, 3), np.float32), mode="cubic"), "mode", "cubic")


def test_integer_image_raises():
    _raises(lambda: grid_sample(np.zeros((5, 7, 1), np.int32), np.zeros((4, 4, 2), np.float32)), "image", "int32")
    _raises(lambda: grid_sample(np.zeros((5, 7, 1), np.float32), np.zeros((4, 4, 2), np.int32)), "grid", "int32")


def test_unknown_transform_lists_choices():
    with pytest.raises(ValueError) as info:
        get_transform("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ("affine", "attention", "projective", "tps", "affine3d"):
        assert repr(name) in message
    with pytest.raises(ValueError, match="nope"):
        warp(np.zeros((4, 4, 1), np.float32), np.zeros(6, np.float32), transform="nope")


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5,), (2, 4), (7,), ()])
def test_bad_theta_shapes_raise(shape):
    _raises(lambda: affine_grid(np.zeros(shape, np.float32), (4, 5)), "affine_grid", str(shape))


def test_bad_theta_3d_and_size_raise():
    _raises(lambda: stn_jax.affine_grid_3d(np.zeros((2, 3), np.float32), (2, 3, 4)), "affine_grid_3d", "(2, 3)")
    _raises(lambda: affine_grid(np.eye(2, 3, dtype=np.float32), (4,)), "size")
    _raises(lambda: affine_grid(np.eye(2, 3, dtype=np.float32), (4, 0)), "size")
