"""Parity with PyTorch (the reference implementation): values, gradients, double backward, affine grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch (optional reference) is not installed: pip install torch==2.13.0")
F = torch.nn.functional

from conftest import ALIGN, MODES, PADDINGS, for_each_padding, from_torch, to_torch  # noqa: E402

from stn_jax import affine_grid, affine_grid_3d, grid_sample, grid_sample_3d, identity_grid  # noqa: E402

# Sizes whose pixel lattice is exact in binary for the convention (see
# test_sampler): identity and integer-shift grids land exactly on pixels in
# both libraries, so even the one-sided grid derivative must agree there.
LATTICE_2D = {False: (4, 8), True: (5, 9)}
LATTICE_3D = {False: (2, 4, 4), True: (3, 5, 3)}


def _lattice_grids(size, align_corners, shifts):
    """Identity grid plus integer-pixel shifts (k_x, k_y[, k_z]) of it, stacked, float64."""
    base = identity_grid(size, align_corners, np.float64)
    steps = np.array([2 / (n - 1) if align_corners else 2 / n for n in size[::-1]])  # per coordinate x, y[, z]
    return np.stack([base] + [base + np.asarray(k) * steps for k in shifts])


def _grids_2d(rng, align_corners):
    """A batch of 3: random points in [-1.5, 1.5]^2 (many outside), the identity, an integer shift."""
    size = LATTICE_2D[align_corners]
    lattice = _lattice_grids(size, align_corners, [(-2, 3)])
    random = rng.uniform(-1.5, 1.5, (1,) + size + (2,))
    return np.concatenate([random, lattice]), size


def _grids_3d(rng, align_corners):
    size = LATTICE_3D[align_corners]
    lattice = _lattice_grids(size, align_corners, [(1, -2, 1)])
    random = rng.uniform(-1.5, 1.5, (1,) + size + (3,))
    return np.concatenate([random, lattice]), size


def _torch_sample(image, grid, mode, padding_mode, align_corners, dtype=torch.float32):
    out = F.grid_sample(to_torch(image, dtype), torch.tensor(grid, dtype=dtype), mode=mode,
                        padding_mode=padding_mode, align_corners=align_corners)
    return from_torch(out)


# ---------------------------------------------------------------------------
# Values (float32).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
def test_values_match_torch_2d(mode, align_corners):
    rng = np.random.default_rng(200)
    grid, size = _grids_2d(rng, align_corners)
    image = rng.standard_normal((3,) + size + (2,)).astype(np.float32)
    grid = grid.astype(np.float32)
    outs = for_each_padding(grid_sample, mode=mode, align_corners=align_corners)(image, grid)
    for padding_mode, out in zip(PADDINGS, outs):
        out = np.asarray(out)
        expected = _torch_sample(image, grid, mode, padding_mode, align_corners)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5, err_msg=padding_mode)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
def test_values_match_torch_3d(mode, align_corners):
    rng = np.random.default_rng(201)
    grid, size = _grids_3d(rng, align_corners)
    vol = rng.standard_normal((3,) + size + (2,)).astype(np.float32)
    grid = grid.astype(np.float32)
    jax_mode = "trilinear" if mode == "bilinear" else mode  # torch calls trilinear "bilinear" on 5-D input
    outs = for_each_padding(grid_sample_3d, mode=jax_mode, align_corners=align_corners)(vol, grid)
    for padding_mode, out in zip(PADDINGS, outs):
        out = np.asarray(out)
        expected = _torch_sample(vol, grid, mode, padding_mode, align_corners)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5, err_msg=padding_mode)


def test_values_match_torch_on_odd_sizes_and_size_one_axes():
    rng = np.random.default_rng(202)
    samplers = {ac: for_each_padding(grid_sample, align_corners=ac) for ac in ALIGN}
    for size in [(5, 7), (1, 4), (3, 1), (1, 1)]:
        image = rng.standard_normal((2,) + size + (2,)).astype(np.float32)
        grid = rng.uniform(-1.5, 1.5, (2, 3, 4, 2)).astype(np.float32)
        for align_corners in ALIGN:
            for padding_mode, out in zip(PADDINGS, samplers[align_corners](image, grid)):
                out = np.asarray(out)
                expected = _torch_sample(image, grid, "bilinear", padding_mode, align_corners)
                np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5,
                                           err_msg=f"{size} {padding_mode} align_corners={align_corners}")


# ---------------------------------------------------------------------------
# Gradients (float64 in both), including at pixel lattice points.
# ---------------------------------------------------------------------------


def _torch_grads(image, grid, cotangent, mode, padding_mode, align_corners):
    t_image = to_torch(image, torch.float64, requires_grad=True)
    t_grid = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
    out = F.grid_sample(t_image, t_grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    (out * to_torch(cotangent, torch.float64)).sum().backward()
    return from_torch(t_image.grad), t_grid.grad.numpy()


def _jax_grads_all_paddings(sample, mode, align_corners):
    """One jitted function: (image grad, grid grad) of sum(out * cotangent) for every padding mode."""
    def grads(image, grid, cotangent):
        out = []
        for padding_mode in PADDINGS:
            loss = lambda i, g: jnp.sum(sample(i, g, mode=mode, padding_mode=padding_mode,
                                               align_corners=align_corners) * cotangent)
            out.append(jax.grad(loss, argnums=(0, 1))(image, grid))
        return out
    return jax.jit(grads)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_torch_2d(x64, mode, align_corners):
    rng = np.random.default_rng(210)
    grid, size = _grids_2d(rng, align_corners)
    image = rng.standard_normal((3,) + size + (2,))
    cotangent = rng.standard_normal((3,) + size + (2,))
    results = _jax_grads_all_paddings(grid_sample, mode, align_corners)(image, grid, cotangent)
    for padding_mode, (gi, gg) in zip(PADDINGS, results):
        ti, tg = _torch_grads(image, grid, cotangent, mode, padding_mode, align_corners)
        np.testing.assert_allclose(np.asarray(gi), ti, rtol=1e-10, atol=1e-10, err_msg=f"image {padding_mode}")
        # Batch element 0 is random, 1 the identity, 2 an integer shift: the
        # latter two sit on pixels, where the grid derivative is one-sided.
        for b in range(3):
            np.testing.assert_allclose(np.asarray(gg[b]), tg[b], rtol=1e-10, atol=1e-10,
                                       err_msg=f"grid {padding_mode} batch {b}")


def test_gradients_match_torch_3d(x64):
    # align_corners=True here; the 3-D finite-difference checks (test_grads) use False.
    align_corners = True
    rng = np.random.default_rng(211)
    grid, size = _grids_3d(rng, align_corners)
    vol = rng.standard_normal((3,) + size + (1,))
    cotangent = rng.standard_normal((3,) + size + (1,))
    results = _jax_grads_all_paddings(grid_sample_3d, "trilinear", align_corners)(vol, grid, cotangent)
    for padding_mode, (gi, gg) in zip(PADDINGS, results):
        ti, tg = _torch_grads(vol, grid, cotangent, "bilinear", padding_mode, align_corners)
        np.testing.assert_allclose(np.asarray(gi), ti, rtol=1e-10, atol=1e-10, err_msg=f"volume {padding_mode}")
        for b in range(3):
            np.testing.assert_allclose(np.asarray(gg[b]), tg[b], rtol=1e-10, atol=1e-10,
                                       err_msg=f"grid {padding_mode} batch {b}")


def test_lattice_gradients_are_nontrivial():
    # The lattice grids above must actually exercise one-sided derivatives:
    # their pixel coordinates are exact integers (so a left derivative would differ).
    for align_corners in ALIGN:
        grid = _lattice_grids(LATTICE_2D[align_corners], align_corners, [(-2, 3)])
        h, w = LATTICE_2D[align_corners]
        px = ((grid[..., 0] + 1) / 2 * (w - 1)) if align_corners else (((grid[..., 0] + 1) * w - 1) / 2)
        np.testing.assert_array_equal(px, np.round(px))
        np.testing.assert_array_equal(px.astype(np.float32), px)


# ---------------------------------------------------------------------------
# Double backward.
# ---------------------------------------------------------------------------


# Each padding once, alternating the conventions (one compiled program).
DOUBLE_BACKWARD_CONFIGS = [("zeros", False), ("border", True), ("reflection", False), ("reflection", True)]


def test_double_backward_matches_torch(x64):
    # L(image, grid) = || d/dgrid sum(out * ct) ||^2; compare dL/dimage and dL/dgrid
    # (second-order quantities) at off-lattice random points.
    rng = np.random.default_rng(220)
    image = rng.standard_normal((2, 3, 4, 2))
    grid = rng.uniform(-1.3, 1.3, (2, 3, 2, 2))
    cotangent = rng.standard_normal((2, 3, 2, 2))

    def second_order(image, grid):
        out = []
        for padding_mode, align_corners in DOUBLE_BACKWARD_CONFIGS:
            def penalty(i, g):
                inner = lambda g_: jnp.sum(grid_sample(i, g_, padding_mode=padding_mode,
                                                       align_corners=align_corners) * cotangent)
                return jnp.sum(jax.grad(inner)(g) ** 2)
            out.append(jax.grad(penalty, argnums=(0, 1))(image, grid))
        return out

    results = jax.jit(second_order)(image, grid)
    for (padding_mode, align_corners), (gi, gg) in zip(DOUBLE_BACKWARD_CONFIGS, results):
        t_image = to_torch(image, torch.float64, requires_grad=True)
        t_grid = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
        out = F.grid_sample(t_image, t_grid, padding_mode=padding_mode, align_corners=align_corners)
        (g,) = torch.autograd.grad((out * to_torch(cotangent, torch.float64)).sum(), t_grid, create_graph=True)
        ti, tg = torch.autograd.grad((g ** 2).sum(), (t_image, t_grid))
        assert float(ti.abs().max()) > 0 and float(tg.abs().max()) > 0
        msg = f"{padding_mode} align_corners={align_corners}"
        np.testing.assert_allclose(np.asarray(gi), from_torch(ti), rtol=1e-9, atol=1e-9, err_msg=msg)
        np.testing.assert_allclose(np.asarray(gg), tg.numpy(), rtol=1e-9, atol=1e-9, err_msg=msg)


# ---------------------------------------------------------------------------
# affine_grid / affine_grid_3d.
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid:UserWarning")
@pytest.mark.parametrize("align_corners", ALIGN)
def test_affine_grid_matches_torch(align_corners):
    rng = np.random.default_rng(230)
    theta = (np.eye(2, 3) + 0.3 * rng.standard_normal((3, 2, 3))).astype(np.float32)
    for size in [(4, 6), (5, 3), (1, 4), (3, 1), (1, 1)]:
        out = np.asarray(affine_grid(theta, size, align_corners))
        expected = F.affine_grid(torch.tensor(theta), [3, 1, *size], align_corners=align_corners).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=str(size))


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid:UserWarning")
@pytest.mark.parametrize("align_corners", ALIGN)
def test_affine_grid_3d_matches_torch(align_corners):
    rng = np.random.default_rng(231)
    theta = (np.eye(3, 4) + 0.3 * rng.standard_normal((2, 3, 4))).astype(np.float32)
    for size in [(2, 3, 4), (1, 3, 2), (3, 1, 1), (1, 1, 1)]:
        out = np.asarray(affine_grid_3d(theta, size, align_corners))
        expected = F.affine_grid(torch.tensor(theta), [2, 1, *size], align_corners=align_corners).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=str(size))


def test_affine_warp_matches_torch_end_to_end():
    rng = np.random.default_rng(232)
    theta = (np.eye(2, 3) + 0.2 * rng.standard_normal((2, 2, 3))).astype(np.float32)
    image = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    for align_corners in ALIGN:
        out = np.asarray(grid_sample(image, affine_grid(theta, (4, 7), align_corners), padding_mode="border",
                                     align_corners=align_corners))
        t_grid = F.affine_grid(torch.tensor(theta), [2, 3, 4, 7], align_corners=align_corners)
        expected = from_torch(F.grid_sample(to_torch(image), t_grid, padding_mode="border",
                                            align_corners=align_corners))
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
