"""stn_jax.conv: patches / unpatches (native and XLA lowerings) and the patch-matrix convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads

from stn_jax import _native, conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _windows_reference(x: np.ndarray, kernel, strides) -> np.ndarray:
    """im2col by explicit loops, the definition in `conv.patches`'s docstring."""
    b, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, strides
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((b, oh, ow, kh * kw * c), x.dtype)
    for y in range(oh):
        for xx in range(ow):
            for i in range(kh):
                for j in range(kw):
                    out[:, y, xx, (i * kw + j) * c:(i * kw + j + 1) * c] = x[:, y * sh + i, xx * sw + j, :]
    return out


GEOMETRIES = [((3, 3), (1, 1), (2, 7, 6, 3)), ((3, 2), (2, 1), (3, 9, 8, 4)), ((1, 1), (1, 1), (1, 4, 5, 2)),
              ((5, 4), (3, 2), (2, 11, 9, 1)), ((2, 2), (2, 2), (1, 2, 2, 5))]


@pytest.mark.parametrize("kernel,strides,shape", GEOMETRIES)
def test_patches_match_the_loop_definition_on_both_lowerings(kernel, strides, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = _windows_reference(x, kernel, strides)
    np.testing.assert_array_equal(np.asarray(conv.patches(x, kernel, strides)), want)  # native on CPU
    np.testing.assert_array_equal(np.asarray(conv._patches_xla(jnp.asarray(x), kernel=kernel, strides=strides)), want)


@pytest.mark.parametrize("kernel,strides,shape", GEOMETRIES)
def test_unpatches_is_the_transpose_of_patches(kernel, strides, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    p_shape = _windows_reference(x, kernel, strides).shape
    p = rng.standard_normal(p_shape).astype(np.float32)
    u = conv.unpatches(p, shape[1:], kernel, strides)
    # <patches(x), p> = <x, unpatches(p)>, in float64 from the float32 arrays.
    lhs = np.vdot(np.asarray(conv.patches(x, kernel, strides), np.float64), p.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), np.asarray(u, np.float64))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    # Native and XLA lowerings agree, and the native one is bit-identical from run to run.
    u_xla = conv._unpatches_xla(jnp.asarray(p), kernel=kernel, strides=strides, image_shape=shape[1:])
    np.testing.assert_allclose(np.asarray(u), np.asarray(u_xla), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(conv.unpatches(p, shape[1:], kernel, strides)))


def test_native_kernels_are_what_the_cpu_runs():
    if not _native.available():
        pytest.skip("the native kernels did not build here (no C++ compiler?); the XLA lowering is tested above")
    x = jnp.ones((2, 6, 6, 3))
    text = jax.jit(lambda x: conv.unpatches(conv.patches(x, 3), (6, 6, 3), 3)).lower(x).as_text()
    assert "stn_patches_f32" in text and "stn_unpatches_f32" in text


def test_patches_differentiate_and_vmap():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 5, 2)), jnp.float32)
    f = lambda x: conv.patches(x, (3, 2), (2, 1))
    check_grads(f, (x,), order=2, modes=("fwd", "rev"), eps=1.0, atol=1e-4, rtol=1e-4)  # linear: any eps is exact
    g = lambda p: conv.unpatches(p, (6, 5, 2), (3, 2), (2, 1))
    check_grads(g, (f(x),), order=2, modes=("fwd", "rev"), eps=1.0, atol=1e-4, rtol=1e-4)
    stacked = jnp.stack([x, 2 * x, -x])
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(stacked)), np.stack([np.asarray(f(v)) for v in stacked]))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=1, out_axes=1)(stacked)),
                                  np.stack([np.asarray(f(stacked[:, i])) for i in range(2)], 1))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        conv.patches(jnp.ones((4, 4, 1)), 3)
    with pytest.raises(ValueError, match="does not fit"):
        conv.patches(jnp.ones((1, 4, 4, 1)), 5)
    with pytest.raises(ValueError, match="positive int"):
        conv.patches(jnp.ones((1, 4, 4, 1)), (3, 0))
    with pytest.raises(ValueError, match="do not match"):
        conv.unpatches(jnp.ones((1, 2, 2, 9)), (5, 5, 1), 3)


CASES = [  # (input shape, kernel shape, strides, padding)
    ((4, 14, 14, 1), (9, 9, 1, 6), (1, 1), "VALID"),  # the paper's first CNN layer, scaled down
    ((3, 9, 9, 5), (7, 7, 5, 4), (1, 1), "VALID"),
    ((2, 10, 9, 3), (3, 3, 3, 4), (2, 1), "SAME"),
    ((2, 8, 8, 2), (3, 2, 2, 3), (1, 2), ((1, 2), (0, 1))),
]


def _sin_loss_value_and_grads(f, strides, padding, **options):
    """(x, w) -> value and (x, w) gradients of sum(sin(f(x, w))), f a convolution in NHWC / HWIO."""
    return jax.value_and_grad(
        lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, padding, dimension_numbers=NHWC, **options))), (0, 1))


def _assert_as_accurate_as_lax(x, w, strides, padding, **options):
    """Values and gradients of ``conv.conv_general_dilated`` are within 4x float32 lax's error of float64 lax."""
    ours = jax.jit(_sin_loss_value_and_grads(conv.conv_general_dilated, strides, padding, **options))(x, w)
    ref32 = jax.jit(_sin_loss_value_and_grads(lax.conv_general_dilated, strides, padding, **options))(x, w)
    with jax.enable_x64(True):  # the exact answer, up to float64 rounding
        exact = _sin_loss_value_and_grads(lax.conv_general_dilated, strides, padding, **options)(
            x.astype(np.float64), w.astype(np.float64))
    for a, b, e in zip(jax.tree.leaves(ours), jax.tree.leaves(ref32), jax.tree.leaves(exact)):
        e = np.asarray(e)
        err, err_lax = np.abs(np.asarray(a) - e).max(), np.abs(np.asarray(b) - e).max()
        scale = np.abs(e).max()
        assert err <= 4 * err_lax + 1e-6 * scale, (err, err_lax)
        assert err <= 1e-4 * scale


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_conv_is_as_accurate_as_lax_in_values_and_gradients(x_shape, w_shape, strides, padding):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    assert "stn_patches" in str(jax.make_jaxpr(
        lambda x, w: conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC))(x, w))
    _assert_as_accurate_as_lax(x, w, strides, padding)


@pytest.mark.parametrize("change", ["nchw", "dilation", "groups", "bfloat16", "too_big", "volume"])
def test_conv_falls_back_to_lax_where_the_patch_path_does_not_apply(change, monkeypatch):
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    kwargs = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=NHWC)
    if change == "nchw":
        x, kwargs["dimension_numbers"] = jnp.ones((2, 4, 8, 8)), ("NCHW", "HWIO", "NCHW")
    elif change == "dilation":
        kwargs["rhs_dilation"] = (2, 2)
    elif change == "groups":
        w, kwargs["feature_group_count"] = jnp.ones((3, 3, 2, 6)), 2
    elif change == "bfloat16":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    elif change == "too_big":
        monkeypatch.setattr(conv, "MAX_PATCH_BYTES", 2 * 6 * 6 * 36 * 4 - 1)
    else:
        x, w = jnp.ones((2, 5, 5, 5, 1)), jnp.ones((3, 3, 3, 1, 2))
        kwargs.update(window_strides=(1, 1, 1), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, **kwargs))(x, w))
    assert "stn_patches" not in jaxpr and "conv_general_dilated" in jaxpr
    np.testing.assert_array_equal(np.asarray(conv.conv_general_dilated(x, w, **kwargs)),
                                  np.asarray(lax.conv_general_dilated(x, w, **kwargs)))


def test_other_platforms_lower_to_their_own_convolution():
    x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
    f = jax.value_and_grad(lambda x, w: jnp.sum(conv.conv_general_dilated(x, w, (1, 1), "VALID",
                                                                          dimension_numbers=NHWC)), (0, 1))
    text = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "stn_patches" not in text and "stn_unpatches" not in text and "convolution" in text


def test_flax_conv_with_the_patch_path_equals_flax_conv():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 12, 12, 2)), jnp.float32)
    plain = nnx.Conv(2, 5, (5, 5), padding="VALID", rngs=nnx.Rngs(0))
    ours = nnx.Conv(2, 5, (5, 5), padding="VALID", conv_general_dilated=conv.conv_general_dilated, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


DEPTHWISE_CASES = [  # (input shape, kernel shape, strides, padding): EfficientNet's 3x3 / 5x5, stride 1 / 2, TF-SAME
    ((2, 9, 9, 6), (3, 3, 1, 6), (1, 1), "SAME"),
    ((2, 10, 10, 4), (5, 5, 1, 4), (2, 2), "SAME"),
    ((3, 8, 7, 3), (3, 2, 1, 3), (2, 1), "VALID"),
    ((1, 7, 7, 2), (3, 3, 1, 2), (1, 2), ((2, 0), (1, 1))),
]


def _lowered(f, *args, platform: str) -> str:
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", DEPTHWISE_CASES)
def test_depthwise_conv_is_as_accurate_as_lax_in_values_and_gradients(x_shape, w_shape, strides, padding):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    groups = x_shape[-1]
    f = _sin_loss_value_and_grads(conv.conv_general_dilated, strides, padding, feature_group_count=groups)
    assert "convolution" not in _lowered(f, x, w, platform="cpu")  # the per-tap form, forward and backward
    assert "convolution" in _lowered(f, x, w, platform="cuda")
    _assert_as_accurate_as_lax(x, w, strides, padding, feature_group_count=groups)


def test_depthwise_conv_has_second_derivatives():
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):  # the per-tap form is dtype-generic; float64 makes the finite differences sharp
        x = jnp.asarray(rng.standard_normal((1, 6, 6, 2)))
        w = jnp.asarray(rng.standard_normal((3, 3, 1, 2)))
        check_grads(lambda x, w: jnp.sin(conv._depthwise_conv(x, w, (2, 1), "SAME")), (x, w), order=2,
                    modes=("fwd", "rev"))


@pytest.mark.parametrize("change", ["multiplier", "one_channel", "bfloat16", "nchw"])
def test_grouped_convs_that_are_not_depthwise_use_lax(change):
    x, w, groups = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 8)), 4  # channel multiplier 2
    dims = NHWC
    if change == "one_channel":
        x, w, groups = jnp.ones((2, 8, 8, 1)), jnp.ones((3, 3, 1, 1)), 1  # an ordinary convolution: patch path
    elif change == "bfloat16":
        x, w = x.astype(jnp.bfloat16), jnp.ones((3, 3, 1, 4), jnp.bfloat16)
    elif change == "nchw":
        x, w, dims = jnp.ones((2, 4, 8, 8)), jnp.ones((3, 3, 1, 4)), ("NCHW", "HWIO", "NCHW")
    f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims,  # noqa: E731
                                               feature_group_count=groups)
    text = _lowered(f, x, w, platform="cpu")
    assert ("convolution" in text) == (change != "one_channel")
    np.testing.assert_allclose(np.asarray(f(x, w), np.float32), np.asarray(lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=groups), np.float32), rtol=1e-6)


def test_flax_depthwise_conv_with_the_tap_path_equals_flax_conv():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 11, 11, 3)), jnp.float32)
    kw = dict(strides=2, padding="SAME", feature_group_count=3, use_bias=False)
    plain = nnx.Conv(3, 3, (5, 5), **kw, rngs=nnx.Rngs(0))
    ours = nnx.Conv(3, 3, (5, 5), conv_general_dilated=conv.conv_general_dilated, **kw, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
