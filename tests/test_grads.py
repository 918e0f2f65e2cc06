"""Derivatives of the sampler: finite differences, hand-derived values, the float32 trap, determinism."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALIGN, CPU_SAMPLERS, PADDINGS, off_lattice_pixels, to_normalized, to_pixel, use_cpu_sampler
from jax.test_util import check_grads

from stn_jax import TRANSFORMS, affine_grid, grid_sample, grid_sample_3d, warp


def _off_lattice_grid(rng, out_shape, sizes, align_corners):
    """Normalised grid (..., ndim) over ~2 pixels beyond each edge, away from every kink.

    ``sizes`` is per coordinate, x first.
    """
    coords = [to_normalized(off_lattice_pixels(rng, out_shape, -2, n), n, align_corners) for n in sizes]
    return np.stack(coords, -1)


# ---------------------------------------------------------------------------
# Finite differences (float64), to second order, forward and reverse mode.
# ---------------------------------------------------------------------------


# One function returns the result of every padding mode, so each check_grads
# call covers the three of them with one compilation per derivative program
# (compiling the derivative programs dominates the cost of these tests).
# Step 1e-5: the functions are piecewise polynomials of degree up to 5 in the
# coordinates (order-2 checks differentiate J(x)^T f(x)), so the central
# difference error is O(eps^2) and 1e-4 would leave ~1e-5 of truncation error.
CHECK = dict(atol=1e-6, rtol=1e-6, eps=1e-5)


def _all_paddings(sample, align_corners):
    return jax.jit(lambda x, g: jnp.stack([sample(x, g, padding_mode=p, align_corners=align_corners)
                                           for p in PADDINGS]))


# Forward mode at first order is also checked by the order-2 "fwd" test below.
@pytest.mark.parametrize("align_corners", ALIGN)
def test_check_grads_bilinear_2d_first_order(x64, align_corners):
    rng = np.random.default_rng(100 + align_corners)
    image = rng.standard_normal((2, 3, 4, 2))
    grid = _off_lattice_grid(rng, (2, 2, 3), (4, 3), align_corners)
    check_grads(_all_paddings(grid_sample, align_corners), (image, grid), order=1, modes=["rev"], **CHECK)


def test_check_grads_trilinear_3d_first_order(x64):
    # Forward mode here; reverse mode at first order is part of the order-2 "rev" test below.
    rng = np.random.default_rng(110)
    vol = rng.standard_normal((2, 3, 4, 1))
    grid = _off_lattice_grid(rng, (2, 2, 3), (4, 3, 2), False)
    check_grads(_all_paddings(grid_sample_3d, False), (vol, grid), order=1, modes=["fwd"], **CHECK)


# Second order: compiling the second-derivative programs takes seconds each, so
# the default run checks one padding and one mode per dimensionality; the
# slow-marked test below (`pytest -m slow`) covers every padding mode and
# convention in both modes.


def test_check_grads_bilinear_2d_second_order(x64):
    # Forward over forward here; reverse over reverse in 2-D is compared with
    # PyTorch's double backward for every padding (test_torch_parity).
    rng = np.random.default_rng(102)
    image = rng.standard_normal((3, 4, 1))
    grid = _off_lattice_grid(rng, (2, 3), (4, 3), False)
    f = jax.jit(lambda i, g: grid_sample(i, g, padding_mode="reflection"))
    # order=2 checks the first-order JVP, then the JVP of the JVP.
    check_grads(f, (image, grid), order=2, modes=["fwd"], **CHECK)


def test_check_grads_trilinear_3d_second_order(x64):
    rng = np.random.default_rng(111)
    vol = rng.standard_normal((2, 3, 4, 1))
    grid = _off_lattice_grid(rng, (1, 2, 3), (4, 3, 2), True)
    f = jax.jit(lambda v, g: grid_sample_3d(v, g, padding_mode="zeros", align_corners=True))
    check_grads(f, (vol, grid), order=2, modes=["rev"], **CHECK)


@pytest.mark.slow
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_check_grads_second_order_exhaustive(x64, ndim, padding_mode, align_corners):
    rng = np.random.default_rng(160 + ndim)
    if ndim == 2:
        x, grid, sample = rng.standard_normal((3, 4, 2)), _off_lattice_grid(rng, (2, 3), (4, 3), align_corners), \
            grid_sample
    else:
        x, grid, sample = rng.standard_normal((2, 3, 4, 1)), \
            _off_lattice_grid(rng, (1, 2, 3), (4, 3, 2), align_corners), grid_sample_3d
    f = jax.jit(lambda v, g: sample(v, g, padding_mode=padding_mode, align_corners=align_corners))
    check_grads(f, (x, grid), order=2, modes=["fwd", "rev"], **CHECK)


def test_off_lattice_points_do_reach_every_padding_region():
    # The points used above cover the inside and both outsides of each axis, so
    # each padding mode's distinct branch (blend with zeros, clip, reflect) is hit.
    rng = np.random.default_rng(100)
    p = off_lattice_pixels(rng, (200,), -2, 4)
    assert p.min() < -1 and p.max() > 4 and np.any((p > 0) & (p < 3))
    frac = p - np.floor(p)
    assert np.all((np.abs(frac - 0.5) >= 0.15) & (frac >= 0.15) & (frac <= 0.85))


def test_grid_derivative_is_the_right_derivative_at_integer_pixels():
    # 1 x 4 image [1, 2, 4, 8], align_corners=False: pixel p = 2 x + 1.5, dp/dx = 2.
    image = np.array([1.0, 2.0, 4.0, 8.0], np.float32).reshape(1, 4, 1)
    # (x, expected d out / dx for zeros, border, reflection)
    cases = [
        (-0.25, 4.0, 4.0, 4.0),      # p = 1: right derivative (4 - 2) * 2 (the left one is (2 - 1) * 2 = 2)
        (0.5, 8.0, 8.0, 8.0),        # p = 2.5: inside a cell, (8 - 4) * 2
        (0.75, -16.0, 0.0, 0.0),     # p = 3, last pixel: zeros falls to 0 on the right, (0 - 8) * 2;
                                     #   border/reflection clip there, and the clip's derivative is 0 at its limits
        (-0.75, 2.0, 0.0, 0.0),      # p = 0: zeros (2 - 1) * 2; border/reflection clipped at 0
        (-1.25, 2.0, 0.0, 0.0),      # p = -1: zeros blend rises towards pixel 0, (1 - 0) * 2;
                                     #   reflection maps -1 to 0 and clips it there
        (-1.625, 0.0, 0.0, -2.0),    # p = -1.75: zeros reads nothing; reflection mirrors to 0.75: -(2 - 1) * 2
        (1.875, 0.0, 0.0, -4.0),     # p = 5.25: reflection mirrors about 3.5 to 1.75: -(4 - 2) * 2
    ]
    grid = np.array([[[x, 0.0] for x, *_ in cases]], np.float32)

    def derivatives(g):
        return [jax.grad(lambda g_: grid_sample(image, g_, padding_mode=p).sum())(g)[0, :, 0] for p in PADDINGS]

    got = jax.jit(derivatives)(grid)
    for k, padding_mode in enumerate(PADDINGS):
        np.testing.assert_array_equal(np.asarray(got[k]), np.array([c[1 + k] for c in cases], np.float32),
                                      err_msg=padding_mode)


def test_nearest_gradients():
    rng = np.random.default_rng(120)
    h, w = 3, 4
    image = rng.standard_normal((h, w, 2)).astype(np.float32)
    # Many points, several reading the same pixel, some outside; pixel coordinates
    # avoid .5 ties.
    px = rng.integers(-2, w + 2, 40) + rng.uniform(-0.4, 0.4, 40)
    py = rng.integers(-1, h + 1, 40) + rng.uniform(-0.4, 0.4, 40)
    grid = np.stack([to_normalized(px, w, False), to_normalized(py, h, False)], -1).reshape(5, 8, 2)
    grid = grid.astype(np.float32)
    for padding_mode in ("zeros", "border"):
        loss = lambda i, g: jnp.sum(grid_sample(i, g, mode="nearest", padding_mode=padding_mode))
        gi, gg = jax.jit(jax.grad(loss, argnums=(0, 1)))(image, grid)
        np.testing.assert_array_equal(np.asarray(gg), 0.0)
        cols, rows = np.round(px).astype(int), np.round(py).astype(int)
        if padding_mode == "border":
            cols, rows = np.clip(cols, 0, w - 1), np.clip(rows, 0, h - 1)
        inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        counts = np.zeros((h, w))
        np.add.at(counts, (rows[inside], cols[inside]), 1.0)
        assert counts.max() >= 2  # the test does exercise accumulation
        np.testing.assert_array_equal(np.asarray(gi), np.repeat(counts[..., None], 2, -1), err_msg=padding_mode)


def test_bilinear_image_gradient_is_the_transpose_of_sampling():
    # d/dimage sum(out * ct) scatters ct with the bilinear weights: check it
    # against the dense matrix of the (linear in image) sampler.
    rng = np.random.default_rng(121)
    h, w = 3, 4
    grid = rng.uniform(-1.3, 1.3, (2, 3, 2)).astype(np.float32)
    ct = rng.standard_normal((2, 3, 1)).astype(np.float32)
    basis = np.eye(h * w, dtype=np.float32).reshape(h * w, h, w, 1)
    matrix, gi = jax.jit(lambda: (grid_sample(basis, grid),
                                  jax.grad(lambda i: jnp.sum(grid_sample(i, grid) * ct))(jnp.zeros((h, w, 1)))))()
    matrix = np.asarray(matrix).reshape(h * w, 6)  # column = output point
    np.testing.assert_allclose(np.asarray(gi).reshape(-1), matrix @ ct.reshape(-1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# The float32 trap: theta -> affine_grid -> grid_sample under one jit.
# ---------------------------------------------------------------------------


def _trap_thetas(batch, h, w, align_corners):
    """Identity, integer pixel shifts (one per example), and a random near-identity theta, in a batch."""
    sx = 2 / (w - 1) if align_corners else 2 / w
    sy = 2 / (h - 1) if align_corners else 2 / h
    thetas = np.tile(np.array([[1.0, 0, 0], [0, 1, 0]]), (batch, 1, 1))
    kinds = ["identity"]
    for k in range(1, batch - 1):
        thetas[k, 0, 2], thetas[k, 1, 2] = k * sx, (1 - k) * sy
        kinds.append("shift")
    thetas[-1] += 0.05 * np.random.default_rng(130).standard_normal((2, 3))
    kinds.append("random")
    return thetas, kinds


def _loss_grads(image, theta, cotangent, out_size, align_corners, dtype):
    def loss(i, t):
        grid = affine_grid(t, out_size, align_corners)
        return jnp.sum(grid_sample(i, grid, align_corners=align_corners) * cotangent.astype(dtype))

    gi, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(image, dtype), jnp.asarray(theta, dtype))
    return np.asarray(gi, np.float64), np.asarray(gt, np.float64)


# The integer-shift and identity points land exactly on pixels. The image
# sizes make that lattice exact in binary (16 = 2^4 pixels without
# align_corners, 17 = 2^4 + 1 with it; 12 -> 24 puts the points on quarter
# pixels), so float32 and float64 see the same side of every pixel and even
# the theta gradient (whose grid derivative jumps at pixels) must agree.
TRAP_CASES = [
    ((4, 16, 16, 3), (16, 16), False),
    ((3, 17, 17, 1), (17, 17), True),
    ((3, 12, 12, 1), (24, 24), False),
    ((3, 12, 12, 1), (24, 24), True),
]


@pytest.mark.parametrize("shape,out_size,align_corners", TRAP_CASES)
def test_float32_end_to_end_gradients_match_float64(shape, out_size, align_corners):
    b, h, w, c = shape
    rng = np.random.default_rng(131)
    image = rng.standard_normal(shape)
    cotangent = rng.standard_normal((b,) + out_size + (c,))
    theta, kinds = _trap_thetas(b, h, w, align_corners)
    with jax.enable_x64(True):
        gi64, gt64 = _loss_grads(image, theta, cotangent, out_size, align_corners, jnp.float64)
    for impl in CPU_SAMPLERS:  # every CPU lowering of the float32 sampler
        ctx = use_cpu_sampler(impl) if use_cpu_sampler is not None else contextlib.nullcontext()
        with ctx:
            gi32, gt32 = _loss_grads(image, theta, cotangent, out_size, align_corners, jnp.float32)
        # The trap (gather index and weight from differently rounded coordinates)
        # gives errors of about one cotangent value (~1) at isolated pixels.
        np.testing.assert_allclose(gi32, gi64, rtol=0, atol=1e-4, err_msg=impl)
        for k, kind in enumerate(kinds):
            np.testing.assert_allclose(gt32[k], gt64[k], rtol=1e-3, atol=1e-3 * np.abs(gt64[k]).max(),
                                       err_msg=f"{impl} theta[{k}] ({kind})")


# ---------------------------------------------------------------------------
# Determinism.
# ---------------------------------------------------------------------------


def test_gradients_are_bit_identical_across_runs(cpu_sampler):
    rng = np.random.default_rng(140)
    image = rng.standard_normal((2, 6, 5, 1)).astype(np.float32)
    # Many points reading the same pixels (a zoom-in), so the scatter-add order matters.
    theta = np.tile(np.array([[0.3, 0.1, 0.05], [-0.1, 0.3, 0.1]], np.float32), (2, 1, 1))
    cotangent = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)

    def make():
        def loss(i, t):
            return jnp.sum(grid_sample(i, affine_grid(t, (8, 8)), padding_mode="reflection") * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    first = [np.asarray(x) for x in make()(image, theta)]
    second = [np.asarray(x) for x in make()(image, theta)]
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
        assert np.array_equal(a, b)
    assert np.any(first[0] != 0) and np.any(first[1] != 0)


# ---------------------------------------------------------------------------
# Gradients through warp w.r.t. the transform parameters.
# ---------------------------------------------------------------------------


WARP_SEEDS = {"affine": 165, "attention": 150, "projective": 153, "tps": 150}  # chosen to meet the precondition


def _generic_params(name, rng, h, w):
    t = TRANSFORMS[name]
    if name == "tps":
        # Small random offsets plus a shift of 0.4 pixel, so no point sits near a pixel.
        return (0.05 * rng.standard_normal((16, 2)) + np.array([0.8 / w, 0.8 / h])).reshape(-1)
    noise = {"affine": 0.15, "attention": 0.1, "projective": 0.08}[name]
    return t.identity.astype(np.float64) + noise * rng.standard_normal(t.num_params)


WARP_NAMES = ("affine", "attention", "projective", "tps")


def test_warp_gradient_wrt_params_matches_finite_differences(x64):
    h, w = 4, 5
    image = np.random.default_rng(149).standard_normal((h, w, 1))
    params = []
    for name in WARP_NAMES:
        p = _generic_params(name, np.random.default_rng(WARP_SEEDS[name]), h, w)
        assert np.abs(p - TRANSFORMS[name].identity).max() > 0.05  # a generic, non-identity point
        # Precondition: every grid point is well away from a kink of the
        # sampler, so finite differences cannot cross one.
        grid = np.asarray(TRANSFORMS[name].make_grid(jnp.asarray(p), (h, w), False))
        px, py = to_pixel(grid[..., 0], w, False), to_pixel(grid[..., 1], h, False)
        assert min(np.abs(px - np.round(px)).min(), np.abs(py - np.round(py)).min()) > 0.02, name
        params.append(p)

    # One function of the four parameter vectors; output axis 0 is WARP_NAMES.
    f = jax.jit(lambda *ps: jnp.stack([warp(image, p, transform=n, padding_mode="zeros")
                                       for n, p in zip(WARP_NAMES, ps)]))
    check_grads(f, tuple(params), order=1, modes=["rev"], **CHECK)
