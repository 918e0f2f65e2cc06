"""Bad and edge-case input: the size limit, empty arrays, module layouts, argument types.

Every test here is small: the size limit is checked on abstract shapes
(`jax.eval_shape` of `jax.ShapeDtypeStruct`), never on allocated arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stn_jax
from stn_jax import _memory, affine_grid, grid_sample, grid_sample_3d, warp
from stn_jax.layers import ConvBody, FCBody, ParallelTransformers, SpatialTransformer

S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _raises(fn, *fragments, error=ValueError):
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------
# 1. The int32 limit counts every image of the call.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [3, 4])
def test_size_limit_counts_the_whole_batch(batch):
    shape = (batch, 25000, 30000, 1)  # each image fits in int32, the batch does not
    _raises(lambda: jax.eval_shape(grid_sample, S(shape, F32), S((batch, 2, 2, 2), F32)),
            "grid_sample", str(shape), "2147483647")


def test_size_limit_3d_and_warp():
    shape = (2, 1000, 1000, 1100, 1)
    _raises(lambda: jax.eval_shape(grid_sample_3d, S(shape, F32), S((2, 1, 1, 1, 3), F32)),
            "grid_sample_3d", str(shape), "2147483647")
    _raises(lambda: jax.eval_shape(lambda x, t: warp(x, t, (2, 2)), S((3, 25000, 30000, 1), F32), S((3, 2, 3), F32)),
            "(3, 25000, 30000, 1)", "2147483647")


def test_size_limit_under_user_vmap_and_grad():
    one = S((25000, 30000, 1), F32)
    batched = S((3, 25000, 30000, 1), F32)
    grid = np.zeros((2, 2, 2), np.float32)
    _raises(lambda: jax.eval_shape(jax.vmap(lambda x: grid_sample(x, grid)), batched), "2147483647")
    grad_one = jax.grad(lambda x: grid_sample(x, grid).sum())
    assert jax.eval_shape(grad_one, one).shape == one.shape  # one image is fine
    _raises(lambda: jax.eval_shape(jax.vmap(grad_one), batched), "2147483647")


def test_outputs_beyond_memory_are_refused_before_dispatch(monkeypatch):
    """``warp(img, theta, (100000, 100000))`` needs a 37 GiB output and a 75 GiB grid: with 16 GiB of memory
    it is refused in one line naming the sizes, eagerly and under jit, before anything is allocated (XLA
    would fail after dispatching, in dozens of lines). Calls that pass the check are only traced here."""
    monkeypatch.setattr(_memory, "memory_limit", lambda platform: 16 * 2**30)
    image, theta = jnp.zeros((28, 28, 1)), jnp.array([[1.0, 0, 0], [0, 1, 0]])
    fragments = ("warp: an output of shape (100000, 100000, 1) float32 and its sampling grid (100000, 100000, 2) "
                 f"float32 would take 111.8 GiB, more than the 16.0 GiB of {jax.default_backend()} memory", "in tiles")
    _raises(lambda: warp(image, theta, (100000, 100000)), *fragments)
    _raises(lambda: jax.jit(lambda t: warp(image, t, (100000, 100000)))(theta), *fragments)
    _raises(lambda: warp(image, jnp.zeros((40, 16, 2)), (20000, 20000), "tps"), "(40, 20000, 20000, 1) float32",
            "(40, 20000, 20000, 2) float32")  # the grid's batch comes from the parameters
    # 4.5 GiB of output and grid pass; the spline's matrix, built on the host, would take 202.7 GiB.
    _raises(lambda: warp(image, jnp.zeros((1, 16, 2)), (20000, 20000), "tps"),
            "tps_grid: the spline's float64 matrix for size (20000, 20000) and 16 control points", "202.7 GiB")
    _raises(lambda: jax.eval_shape(grid_sample, S((28, 28, 1), F32), S((200000, 200000, 2), F32)),
            "grid_sample: an output of shape (200000, 200000, 1) float32 would take 149.0 GiB")
    _raises(lambda: jax.eval_shape(grid_sample_3d, S((8, 8, 8, 1), F32), S((3000, 3000, 3000, 3), F32)),
            "grid_sample_3d: an output of shape (3000, 3000, 3000, 1) float32")
    traced = jax.eval_shape(lambda t: warp(image, t, (30000, 30000)), theta)  # 3.4 + 6.7 GiB: allowed
    assert traced.shape == (30000, 30000, 1)


def test_memory_limit_is_the_machines():
    assert _memory.memory_limit("cpu") > 2**28  # the physical memory
    _raises(lambda: jax.eval_shape(lambda t: warp(jnp.zeros((8, 8, 1)), t, (10**6, 10**6)), S((2, 3), F32)),
            "more than the", f"GiB of {jax.default_backend()} memory")  # 11 TiB: beyond any machine


def test_shared_image_is_counted_once():
    # An image broadcast over many grids is read in place: only its own size counts.
    out = jax.eval_shape(grid_sample, S((1, 25000, 30000, 1), F32), S((8, 2, 2, 2), F32))
    assert out.shape == (8, 2, 2, 1)


# ---------------------------------------------------------------------------
# 2. Empty inputs give empty outputs (and gradients) of the right shape.
# ---------------------------------------------------------------------------

EMPTY_2D = [  # image, grid, output
    ((0, 5, 6, 2), (0, 3, 4, 2), (0, 3, 4, 2)),
    ((1, 5, 6, 2), (0, 3, 4, 2), (0, 3, 4, 2)),
    ((0, 5, 6, 2), (1, 3, 4, 2), (0, 3, 4, 2)),
    ((2, 5, 6, 0), (2, 3, 4, 2), (2, 3, 4, 0)),
    ((2, 5, 6, 1), (2, 0, 4, 2), (2, 0, 4, 1)),
    ((5, 6, 3), (3, 0, 2), (3, 0, 3)),
]


@pytest.mark.parametrize("image_shape,grid_shape,out_shape", EMPTY_2D)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_empty_grid_sample(image_shape, grid_shape, out_shape, mode, cpu_sampler):
    image, grid = jnp.zeros(image_shape, F32), jnp.zeros(grid_shape, F32)
    out = grid_sample(image, grid, mode=mode)
    assert out.shape == out_shape and out.dtype == F32
    gi, gg = jax.grad(lambda i, g: grid_sample(i, g, mode=mode).sum(), (0, 1))(image, grid)
    assert gi.shape == image_shape and gg.shape == grid_shape
    assert jax.jit(lambda i, g: grid_sample(i, g, mode=mode))(image, grid).shape == out_shape


def test_empty_grid_sample_3d_and_half_precision():
    out = grid_sample_3d(jnp.zeros((0, 2, 3, 4, 1)), jnp.zeros((0, 1, 2, 2, 3)))
    assert out.shape == (0, 1, 2, 2, 1)
    out = grid_sample_3d(jnp.zeros((2, 3, 4, 1)), jnp.zeros((1, 0, 2, 3)))
    assert out.shape == (1, 0, 2, 1)
    out = grid_sample(jnp.zeros((0, 3, 3, 1), jnp.bfloat16), jnp.zeros((0, 2, 2, 2)))
    assert out.shape == (0, 2, 2, 1) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("transform,image_shape,params_shape,size,out_shape", [
    ("affine", (0, 5, 6, 2), (0, 2, 3), None, (0, 5, 6, 2)),
    ("affine", (2, 5, 6, 2), (2, 2, 3), (0, 4), (2, 0, 4, 2)),
    ("tps", (2, 5, 6, 1), (2, 32), (3, 0), (2, 3, 0, 1)),
    ("projective", (0, 5, 6, 1), (0, 8), (3, 3), (0, 3, 3, 1)),
    ("affine3d", (0, 2, 5, 6, 1), (0, 12), None, (0, 2, 5, 6, 1)),
])
def test_empty_warp(transform, image_shape, params_shape, size, out_shape):
    image, params = jnp.zeros(image_shape, F32), jnp.zeros(params_shape, F32)
    assert warp(image, params, size, transform).shape == out_shape
    gi, gp = jax.grad(lambda i, p: warp(i, p, size, transform).sum(), (0, 1))(image, params)
    assert gi.shape == image_shape and gp.shape == params_shape


def test_empty_batch_under_user_vmap(cpu_sampler):
    images, grids = jnp.zeros((0, 5, 6, 2)), jnp.zeros((0, 3, 4, 2))
    out = jax.vmap(grid_sample)(images, grids)
    assert out.shape == (0, 3, 4, 2)
    gi, gg = jax.vmap(jax.grad(lambda i, g: grid_sample(i, g).sum(), (0, 1)))(images, grids)
    assert gi.shape == images.shape and gg.shape == grids.shape
    shared = jnp.ones((5, 6, 2))
    out = jax.vmap(grid_sample, in_axes=(None, 0))(shared, grids)
    assert out.shape == (0, 3, 4, 2)


@pytest.mark.parametrize("localisation", ["fc", "conv"])
def test_empty_batch_through_the_module(localisation):
    st = SpatialTransformer((28, 28, 1), localisation=localisation, output_size=(14, 14), rngs=nnx.Rngs(0))
    x = jnp.zeros((0, 28, 28, 1))
    warped, theta = st(x)
    assert warped.shape == (0, 14, 14, 1) and theta.shape == (0, 6)
    grads = nnx.grad(lambda m: m(x)[0].sum())(st)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(nnx.state(st, nnx.Param))):
        assert g.shape == p.shape


# ---------------------------------------------------------------------------
# 3. Modules check the layout of their input.
# ---------------------------------------------------------------------------


def test_spatial_transformer_rejects_channels_first():
    st = SpatialTransformer((28, 28, 1), rngs=nnx.Rngs(0))
    _raises(lambda: st(jnp.zeros((4, 1, 28, 28))), "(..., 28, 28, 1)", "channels last", "(4, 1, 28, 28)")
    _raises(lambda: st(jnp.zeros((4, 28, 28, 3))), "(..., 28, 28, 1)", "(4, 28, 28, 3)")
    _raises(lambda: st(jnp.zeros((4, 32, 32, 1))), "(..., 28, 28, 1)", "(4, 32, 32, 1)")
    _raises(lambda: jax.jit(lambda x: st(x)[0])(jnp.zeros((4, 1, 28, 28))), "(4, 1, 28, 28)")
    assert st(jnp.zeros((4, 28, 28, 1)))[0].shape == (4, 28, 28, 1)


def test_spatial_transformer_checks_loc_input_and_3d():
    st = SpatialTransformer((28, 28, 1), loc_input_shape=(7, 7, 8), rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 28, 28, 1))
    assert st(x, jnp.zeros((2, 7, 7, 8)))[0].shape == (2, 28, 28, 1)
    _raises(lambda: st(x, jnp.zeros((2, 8, 7, 7))), "loc_input", "(..., 7, 7, 8)", "(2, 8, 7, 7)")
    st3 = SpatialTransformer((4, 8, 8, 1), "affine3d", rngs=nnx.Rngs(0))
    _raises(lambda: st3(jnp.zeros((2, 1, 4, 8, 8))), "(..., 4, 8, 8, 1)", "(2, 1, 4, 8, 8)")


def test_parallel_transformers_and_bodies_check_input():
    sts = [SpatialTransformer((12, 12, 2), rngs=nnx.Rngs(i)) for i in range(2)]
    _raises(lambda: ParallelTransformers(sts)(jnp.zeros((3, 2, 12, 12))), "(..., 12, 12, 2)", "(3, 2, 12, 12)")
    _raises(lambda: FCBody((12, 12, 2), rngs=nnx.Rngs(0))(jnp.zeros((3, 2, 12, 12))), "FCBody", "(3, 2, 12, 12)")
    body = ConvBody((28, 28, 1), rngs=nnx.Rngs(0))
    _raises(lambda: body(jnp.zeros((3, 1, 28, 28))), "ConvBody", "(..., 28, 28, 1)", "(3, 1, 28, 28)")


def test_module_rejects_integer_images():
    st = SpatialTransformer((8, 8, 1), rngs=nnx.Rngs(0))
    _raises(lambda: st(jnp.zeros((2, 8, 8, 1), jnp.uint8)), "SpatialTransformer", "uint8", "float")


# ---------------------------------------------------------------------------
# 4. Argument types: sizes, align_corners, rngs.
# ---------------------------------------------------------------------------

BAD_SIZES = [(14.5, 14), ("14", 14), (True, 14), (-1, 14), 14]


@pytest.mark.parametrize("size", BAD_SIZES, ids=repr)
def test_non_integer_sizes_raise(size):
    theta = jnp.eye(2, 3)
    _raises(lambda: affine_grid(theta, size), "affine_grid", "size", repr(size))
    _raises(lambda: warp(jnp.zeros((28, 28, 1)), theta, size), "size", repr(size))
    _raises(lambda: SpatialTransformer((28, 28, 1), output_size=size, rngs=nnx.Rngs(0)), "output_size", repr(size))
    _raises(lambda: SpatialTransformer((size[0], 28, 1) if isinstance(size, tuple) else size, rngs=nnx.Rngs(0)),
            "input_shape")


def test_integer_like_sizes_are_accepted():
    theta = jnp.eye(2, 3)
    assert affine_grid(theta, (np.int64(4), jnp.int32(5))).shape == (4, 5, 2)
    st = SpatialTransformer(np.array([8, 8, 1]), output_size=[np.int32(4), 4], rngs=nnx.Rngs(0))
    assert st.output_size == (4, 4) and st.input_shape == (8, 8, 1)


@pytest.mark.parametrize("value", ["False", 0, None, 1.0])
def test_align_corners_must_be_bool(value):
    theta, image = jnp.eye(2, 3), jnp.zeros((4, 4, 1))
    _raises(lambda: grid_sample(image, affine_grid(theta, (2, 2)), align_corners=value), "align_corners", repr(value))
    _raises(lambda: affine_grid(theta, (2, 2), align_corners=value), "align_corners", repr(value))
    _raises(lambda: stn_jax.tps_grid(jnp.zeros(32), (2, 2), align_corners=value), "align_corners", repr(value))
    _raises(lambda: warp(image, theta, align_corners=value), "align_corners", repr(value))
    _raises(lambda: SpatialTransformer((4, 4, 1), align_corners=value, rngs=nnx.Rngs(0)), "align_corners",
            repr(value))


def test_align_corners_numpy_bool_is_accepted():
    assert affine_grid(jnp.eye(2, 3), (2, 2), align_corners=np.bool_(True)).shape == (2, 2, 2)


@pytest.mark.parametrize("cls,args", [(SpatialTransformer, ((8, 8, 1),)), (FCBody, ((8, 8, 1),)),
                                      (ConvBody, ((28, 28, 1),))])
def test_rngs_must_be_nnx_rngs(cls, args):
    _raises(lambda: cls(*args, rngs=0), cls.__name__, "rngs", "nnx.Rngs", "0")


def test_bad_mode_padding_and_dtype_in_modules_and_warp():
    _raises(lambda: SpatialTransformer((8, 8, 1), mode="bicubic", rngs=nnx.Rngs(0)), "mode", "bicubic")
    _raises(lambda: SpatialTransformer((8, 8, 1), padding_mode="wrap", rngs=nnx.Rngs(0)), "padding_mode", "wrap")
    _raises(lambda: warp(jnp.zeros((4, 4, 1)), jnp.eye(2, 3), mode="cubic"), "mode", "cubic")
    _raises(lambda: warp(jnp.zeros((4, 4, 1), jnp.int32), jnp.eye(2, 3)), "image", "int32")
    _raises(lambda: warp(jnp.zeros((4, 4)), jnp.eye(2, 3)), "image", "(4, 4)")
