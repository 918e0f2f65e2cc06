"""Property tests (hypothesis) over random small shapes, modes, paddings and conventions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import ALIGN, MODES, PADDINGS, interior_grid, scipy_sample
from hypothesis import given, settings, strategies as st

import stn_jax
from stn_jax import identity_grid

SETTINGS = settings(max_examples=15, deadline=None)

# Every example has new shapes; one compilation of the whole sampler per example
# is several times cheaper than running its operations eagerly (one small
# compilation each). Eager execution is covered by the other modules.
_STATIC = ("mode", "padding_mode", "align_corners")
grid_sample = functools.partial(jax.jit, static_argnames=_STATIC)(stn_jax.grid_sample)
grid_sample_3d = functools.partial(jax.jit, static_argnames=_STATIC)(stn_jax.grid_sample_3d)

sizes = st.integers(1, 6)
channels = st.integers(1, 3)
batches = st.integers(1, 3)
seeds = st.integers(0, 2**32 - 1)
modes = st.sampled_from(MODES)
paddings = st.sampled_from(PADDINGS)
aligns = st.sampled_from(ALIGN)


@SETTINGS
@given(b=batches, h=sizes, w=sizes, c=channels, ho=sizes, wo=sizes, mode=modes, padding_mode=paddings,
       align_corners=aligns, dtype=st.sampled_from(["float32", "float16", "bfloat16"]), seed=seeds)
def test_shape_dtype_finiteness_and_bounds(b, h, w, c, ho, wo, mode, padding_mode, align_corners, dtype, seed):
    rng = np.random.default_rng(seed)
    image32 = rng.uniform(-2, 2, (b, h, w, c)).astype(np.float32)
    image = image32.astype(getattr(jnp, dtype))  # a numpy cast (ml_dtypes for bfloat16)
    grid = rng.uniform(-1.6, 1.6, (b, ho, wo, 2)).astype(np.float32)
    out = grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    assert out.shape == (b, ho, wo, c)
    assert out.dtype == image.dtype
    out = np.asarray(out).astype(np.float32)
    assert np.all(np.isfinite(out))
    pixels = image.astype(np.float32)
    lo, hi = pixels.min(axis=(1, 2), keepdims=True), pixels.max(axis=(1, 2), keepdims=True)
    # Rounding slack: a float32 convex combination, rounded to the image dtype.
    slack = 1e-5 + {"float32": 0.0, "float16": 2**-10, "bfloat16": 2**-7}[dtype] * 2
    if mode == "nearest":
        # Every output value is a pixel of its image (or 0 outside with zeros padding).
        for k in range(b):
            allowed = set(pixels[k].ravel().tolist()) | ({0.0} if padding_mode == "zeros" else set())
            assert set(out[k].ravel().tolist()) <= allowed
    elif padding_mode == "zeros":
        # A convex combination of pixels and zeros: |out| <= max |pixel|.
        bound = np.abs(pixels).max(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(out) <= bound + slack)
    else:
        # border / reflection read only pixels of the image: within [min, max].
        assert np.all(out >= lo - slack) and np.all(out <= hi + slack)


@SETTINGS
@given(b=batches, h=sizes, w=sizes, c=channels, mode=modes, padding_mode=paddings, align_corners=aligns,
       seed=seeds)
def test_identity_grid_reproduces_image(b, h, w, c, mode, padding_mode, align_corners, seed):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (b, h, w, c)).astype(np.float32)
    out = np.asarray(grid_sample(image, identity_grid((h, w), align_corners), mode=mode, padding_mode=padding_mode,
                                 align_corners=align_corners))
    if mode == "nearest":
        np.testing.assert_array_equal(out, image)
    else:  # exact up to the float32 rounding of the grid (exact for binary-friendly sizes)
        np.testing.assert_allclose(out, image, rtol=0, atol=2e-6)


@SETTINGS
@given(b=batches, h=st.integers(2, 6), w=st.integers(2, 6), c=channels, align_corners=aligns,
       padding_mode=paddings, order=st.sampled_from([0, 1]), seed=seeds)
def test_matches_scipy_at_interior_points(b, h, w, c, align_corners, padding_mode, order, seed):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, h, w, c)).astype(np.float32)
    grids = np.stack([interior_grid(rng, (3, 4), h, w, align_corners, avoid_ties=order == 0)
                      for _ in range(b)]).astype(np.float32)
    out = np.asarray(grid_sample(images, grids, mode=("nearest", "bilinear")[order], padding_mode=padding_mode,
                                 align_corners=align_corners))
    expected = np.stack([scipy_sample(images[k], grids[k], order, align_corners) for k in range(b)])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@SETTINGS
@given(b=batches, h=sizes, w=sizes, c=channels, mode=modes, padding_mode=paddings, align_corners=aligns,
       z=st.floats(-1.9, 1.9).filter(lambda v: abs(abs(v) - 1) > 1e-3), seed=seeds)
def test_2d_sampling_equals_3d_sampling_of_a_depth_one_volume(b, h, w, c, mode, padding_mode, align_corners, z,
                                                              seed):
    # A depth-1 volume has its single slice centred at z = 0 in both conventions
    # (align_corners=False: pixel ((z + 1) * 1 - 1) / 2 = z / 2; align_corners=True:
    # pixel (z + 1) / 2 * 0 = 0 for every z). So at z = 0 the 3-D sampler reads
    # exactly the 2-D result. Off z = 0 (align_corners=False, pixel z / 2):
    #   zeros:       trilinear weight max(0, 1 - |z| / 2) on the slice, nearest reads it iff |z / 2| < 1/2
    #                (the tie |z| = 1 is excluded from the draw);
    #   border:      the depth coordinate clips to the slice: same as 2-D;
    #   reflection:  mirrored about -1/2 and 1/2, then clipped: same as 2-D.
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, h, w, c)).astype(np.float32)
    grid = rng.uniform(-1.4, 1.4, (b, 2, 3, 2)).astype(np.float32)
    kwargs = dict(padding_mode=padding_mode, align_corners=align_corners)
    out2 = np.asarray(grid_sample(images, grid, mode=mode, **kwargs))
    mode3 = "trilinear" if mode == "bilinear" else mode
    z = np.float32(z)
    both = np.stack([np.zeros(grid.shape[:-1], np.float32), np.full(grid.shape[:-1], z)], 1)  # (b, 2, 2, 3)
    grid3 = np.concatenate([np.stack([grid, grid], 1), both[..., None]], -1)
    out3 = np.asarray(grid_sample_3d(images[:, None], grid3, mode=mode3, **kwargs))
    assert out3.shape == (b, 2, 2, 3, c)
    np.testing.assert_allclose(out3[:, 0], out2, rtol=0, atol=1e-6)  # z = 0
    if align_corners or padding_mode != "zeros":
        factor = 1.0
    elif mode == "bilinear":
        factor = max(0.0, 1 - abs(float(z)) / 2)
    else:
        factor = 1.0 if abs(float(z)) < 1 else 0.0  # pixel z / 2 rounds to 0 (|z| = 1 excluded: a tie)
    np.testing.assert_allclose(out3[:, 1], factor * out2, rtol=1e-6, atol=1e-6)
