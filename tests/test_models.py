"""Tests of the Flax NNX spatial-transformer layers and the paper's MNIST-family models.

Compilation dominates the cost on CPU, so: the models trained here are narrow
(``width=8``: shapes repeat across models and initialisers compile once);
parameters come from ``rbg`` keys (cheaper to compile than threefry); modules
run under one `nnx.jit` per call site instead of op by op; shapes and
parameter counts are checked on abstract models (`nnx.eval_shape`); and XLA's
optimisations are switched off while this module runs
(``jax_disable_most_optimizations``, restored afterwards): the programs are
tiny, compiling them is what costs.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import model_tables
from stn_jax import TRANSFORMS
from stn_jax.layers import (
    Bound,
    ConvBody,
    LocalisationParam,
    ParallelTransformers,
    Pool,
    SpatialTransformer,
    TransformerSequential,
    count_params,
    pool,
)
from stn_jax.paper import models
from stn_jax.paper.data import TASKS
from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
from stn_jax.paper.models import MODELS
from stn_jax.paper.models.classifiers import CNNClassifier
from stn_jax.paper.models.mnist import BUDGET_TOLERANCE, PARAM_BUDGET

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _family_models() -> list[tuple[str, tuple[int, ...], int, tuple[int, ...]]]:
    """Every registered model of the MNIST families: ``(name, small input, classes, its task's input)``.

    Small inputs are 28x28 (the cheapest size every classifier takes) with the task's channels; 3-D models
    get a 12^3 volume (with the FCN classifier, see `TRAIN_PARAMS`).
    """
    out = []
    for name, spec in MODELS.items():
        tasks = [t for t in spec.tasks if t in MNIST_TASKS]
        if not tasks:
            continue
        task = MNIST_TASKS[tasks[0]]
        shape = tuple(task.image_shape(dict(TASKS.get(tasks[0]).defaults)))
        small = (12, 12, 12, shape[-1]) if spec.input_ndim == 3 else (28, 28, shape[-1])
        out.append((name, small, task.num_classes, shape))
    return out


# (name, transform, input shape, num_classes, options) for every registered MNIST-family model and every
# transform it accepts (from the registries). The default run trains every model name and every transform
# once: the k-th model with a choice of transforms trains its (k mod n)-th transform; the other combinations
# (the same code paths with another transform) are marked slow to keep this file near a minute on two
# cores: `pytest -m slow` or `make test-all` trains them too. 3-D models train on a 12^3 volume with the FCN
# classifier here; their default CNN classifier is checked at 60^3 on the abstract model.
def _train_params() -> list:
    params, k = [], 0
    for name, shape, num_classes, full in _family_models():
        spec = MODELS.get(name)
        options = {}
        if spec.input_ndim == 3:
            options["classifier"] = "fcn"
        elif spec.transforms and min(full[:2]) >= 42:
            options["post_pool"] = 2  # what the model does on its task's input (e.g. addition's 42x42)
        if len(spec.transforms) <= 1:
            params.append(pytest.param(name, spec.transforms[0] if spec.transforms else None, shape, num_classes,
                                       options, id=f"{name}-{spec.transforms[0] if spec.transforms else None}"))
            continue
        fast = spec.transforms[k % len(spec.transforms)]
        k += 1
        params += [pytest.param(name, t, shape, num_classes, options, id=f"{name}-{t}",
                                marks=[] if t == fast else [pytest.mark.slow]) for t in spec.transforms]
    return params


TRAIN_PARAMS = _train_params()


pytestmark = pytest.mark.usefixtures("cheap_compilation")


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@nnx.jit
def _apply(module, x):
    return module(x)


@nnx.jit
def _apply_aux(model, x):
    return model(x, return_aux=True)


def _n_transformers(name: str) -> int:
    """Transformers in a model, from its registry options (``num_transformers``; 1 for any other ST model)."""
    spec = MODELS.get(name)
    return int(spec.options.get("num_transformers", 1)) if spec.transforms else 0


def _images(shape, batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch,) + tuple(shape)), jnp.float32)


# ----------------------------------------------------------------------------
# Every model trains (issue: "every model above trains for a few steps in a test").
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,transform,shape,num_classes,options", TRAIN_PARAMS)
def test_model_trains(name, transform, shape, num_classes, options):
    """3 SGD steps under one nnx.jit compilation: output shapes, aux, finite loss, loc-net gradients."""
    model = models.create_model(name, transform=transform, input_shape=shape, num_classes=num_classes,
                                rngs=_rngs(0), width=8, **options)
    n_st = _n_transformers(name)
    loc_leaves = jax.tree.leaves(nnx.state(model, LocalisationParam))
    assert (len(loc_leaves) > 0) == (n_st > 0)
    # The loc-net group is part of nnx.Param, so the optimiser updates it.
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == len(
        jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LocalisationParam))))) + len(loc_leaves)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)

        def loss_fn(model):
            logits, aux = model(x, return_aux=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, aux)

        (loss, (logits, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, logits, aux, nnx.state(grads, LocalisationParam)

    rng = np.random.default_rng(1)
    for i in range(3):
        x = jnp.asarray(rng.uniform(size=(4,) + shape), jnp.float32)
        y = jnp.asarray(rng.integers(0, num_classes, 4), jnp.int32)
        loss, logits, aux, loc_grads = step(model, optimizer, x, y)
        assert np.isfinite(float(loss))
        assert logits.shape == (4, num_classes)
        assert len(aux["theta"]) == len(aux["warped"]) == n_st
        assert aux["identity_penalty"].shape == ()
        if i == 0:
            # Identity initialisation: theta is exactly the identity, the penalty 0.
            assert float(aux["identity_penalty"]) == 0.0
            if n_st:
                # The regression head receives a gradient at once (the body only after
                # the head's kernel has left zero).
                head = [np.abs(np.asarray(g)).sum() for p, g in jax.tree_util.tree_leaves_with_path(loc_grads)
                        if "head" in jax.tree_util.keystr(p)]
                assert head and all(h > 0 for h in head)
        for theta, warped in zip(aux["theta"], aux["warped"]):
            p = TRANSFORMS[transform or "affine3d"].num_params
            assert theta.shape == (4, p)
            assert warped.shape == (4,) + shape
    assert len(traces) == 1, "nnx.jit compiled the step more than once"
    if n_st:
        norms = [float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(loc_grads)]
        assert all(n > 0 for n in norms), f"localisation parameters without gradient at step 3: {norms}"
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), "some parameters did not change in 3 SGD steps"


# ----------------------------------------------------------------------------
# Shapes and parameter counts on abstract models (no compilation).
# ----------------------------------------------------------------------------

# The paper's models of each family at every input shape of the family's tasks (the docs tables' cells):
# distorted MNIST at 28, 42 (RTS) and 60 (TC), addition at 42x42x2, 3-D at 60^3.
SHAPE_CASES = [(n, t, shape, nc) for family in model_tables.FAMILIES
               for _, shape, nc in model_tables.experiments(family) for n, t in model_tables.paper_models(family)]


def test_output_shapes_at_paper_sizes():
    """Every model at 28, 42 and 60 pixels (RTS ceil-mode pooling included), addition and 3-D."""
    assert {(n, s) for n, _, s, _ in SHAPE_CASES} >= {("st_cnn", (42, 42, 1)), ("fcn", (60, 60, 1)),
                                                      ("add_2st_fcn", (42, 42, 2)), ("st3d", (60, 60, 60, 1))}
    for name, transform, shape, nc in SHAPE_CASES:
        model = models.abstract_model(name, transform, shape, nc)
        x = jax.ShapeDtypeStruct((3,) + shape, jnp.float32)
        logits, aux = nnx.eval_shape(lambda m, x: m(x, return_aux=True), model, x)
        assert logits.shape == (3, nc), (name, transform, shape)
        n_st = _n_transformers(name)
        assert [t.shape for t in aux["theta"]] == [(3, TRANSFORMS[transform or "affine"].num_params)] * n_st
        assert [w.shape for w in aux["warped"]] == [(3,) + shape] * n_st


def test_param_counts_within_budget():
    """All models of one experiment have the budget's parameter count to within the stated tolerance."""
    for name, transform, shape, nc in SHAPE_CASES:
        model = models.abstract_model(name, transform, shape, nc)
        total = count_params(model)
        assert abs(total - PARAM_BUDGET) <= BUDGET_TOLERANCE * PARAM_BUDGET, (name, shape, total)
        loc = count_params(model, LocalisationParam)
        assert (loc > 0) == (transform is not None)
        assert model.summary.startswith(model.display_name)


def test_docs_table_is_current():
    """docs/models.md holds what `python -m experiments.model_tables` prints (numbers are never typed by hand)."""
    generated = model_tables.generated_docs()
    assert generated.startswith(model_tables.BEGIN) and generated.endswith(model_tables.END)
    assert generated in DOCS.read_text(), \
        "docs/models.md is out of date: run `python -m experiments.model_tables --write docs/models.md`"
    assert re.search(r"^\| `ST-CNN TPS` \| `st_cnn`, `tps` \| [\d,]+ ", generated, re.MULTILINE)
    for name, transform in model_tables.paper_models("mnist"):  # a row per model of the family
        registry = f"`{name}`" + (f", `{transform}`" if transform else "")
        assert f"| {registry} |" in generated


@pytest.mark.slow
def test_large_docs_table_is_current():
    """The SVHN and CUB block of docs/models.md is what `model_tables --large` prints (slow: CUB's backbones)."""
    block = f"{model_tables.LARGE_BEGIN}\n\n{model_tables.large_table()}\n\n{model_tables.END}"
    assert block in DOCS.read_text(), \
        "docs/models.md is out of date: run `python -m experiments.model_tables --large --write docs/models.md`"
    assert "| CNN | `svhn_cnn` | 64x64x3 | 23,380,695 | 0 |" in block  # the A.5 layer list, counted by hand


def test_rts_shape_arithmetic():
    assert CNNClassifier.feature_shape((21, 21, 1), 4) == (1, 1, 4)  # 21 -> 13 -> 7 -> 1 -> 1 (ceil)
    assert CNNClassifier.feature_shape((28, 28, 1), 4) == (2, 2, 4)
    assert CNNClassifier.feature_shape((30, 30, 1), 4) == (3, 3, 4)
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    assert pool(x, 2, kind="max", ceil=True).shape == (2, 3, 3, 1)
    assert pool(x, 2, kind="max").shape == (2, 2, 2, 1)
    np.testing.assert_allclose(pool(x, 2, kind="avg", ceil=True)[0, 2, 2, 0], x[0, 4, 4, 0])
    with pytest.raises(ValueError, match="too small"):
        CNNClassifier.feature_shape((20, 20, 1), 4)


@pytest.mark.parametrize("shape,window,spatial_dims,ceil", [
    ((2, 7, 5, 3), 2, 2, True), ((2, 9, 9, 3), 3, 2, False), ((2, 9, 8, 3), 3, 2, True), ((1, 5, 6, 7, 2), 2, 3, True)])
def test_max_pool_matches_reduce_window_and_routes_the_gradient_to_the_maxima(shape, window, spatial_dims, ceil):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    sizes = shape[1:1 + spatial_dims]
    outs = [-(-n // window) if ceil else n // window for n in sizes]
    kept = x[(slice(None),) + tuple(slice(0, min(n, o * window)) for n, o in zip(sizes, outs))]
    padded = jnp.pad(kept, [(0, 0)] + [(0, o * window - min(n, o * window)) for n, o in zip(sizes, outs)] + [(0, 0)],
                     constant_values=-jnp.inf)
    dims = (1,) + (window,) * spatial_dims + (1,)
    want = jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, dims, dims, "VALID")
    np.testing.assert_array_equal(pool(x, window, kind="max", spatial_dims=spatial_dims, ceil=ceil), want)
    # Distinct values: the gradient is 1 at each window's maximum and 0 elsewhere.
    grad = jax.grad(lambda x: jnp.sum(pool(x, window, kind="max", spatial_dims=spatial_dims, ceil=ceil)))(x)
    assert set(np.unique(np.asarray(grad)).tolist()) <= {0.0, 1.0} and float(grad.sum()) == want.size
    picked = (grad * x)[(slice(None),) + tuple(slice(0, min(n, o * window)) for n, o in zip(sizes, outs))]
    picked = jnp.pad(picked, [(0, 0)] + [(0, o * window - min(n, o * window)) for n, o in zip(sizes, outs)] + [(0, 0)])
    np.testing.assert_array_equal(jax.lax.reduce_window(picked, 0.0, jax.lax.add, dims, dims, "VALID"), want)
    # A 2x2 window of equal values shares its gradient evenly.
    tie = jax.grad(lambda x: jnp.sum(pool(x, 2, kind="max")))(jnp.ones((1, 2, 2, 1)))
    np.testing.assert_array_equal(tie, np.full((1, 2, 2, 1), 0.25))


# ----------------------------------------------------------------------------
# The spatial transformer.
# ----------------------------------------------------------------------------


def test_identity_at_init():
    """Same input and output size: every transform returns its input at initialisation."""
    shape = (9, 11, 3)
    cases = [("affine", False), ("attention", False), ("projective", False), ("tps", False), ("affine", True)]
    sts = [SpatialTransformer(shape, t, align_corners=ac, rngs=_rngs(0)) for t, ac in cases]
    x = _images(shape)
    for (transform, ac), (warped, theta) in zip(cases, _apply(_Both(sts), x)):
        np.testing.assert_allclose(warped, x, atol=2e-6, err_msg=f"{transform}, align_corners={ac}")
        np.testing.assert_array_equal(theta, np.broadcast_to(TRANSFORMS[transform].identity, theta.shape))
    shape = (6, 7, 5, 2)
    loc = {"kind": "conv", "channels": (2,), "kernel_size": 3, "fc": (4,), "padding": "SAME"}
    st = SpatialTransformer(shape, "affine3d", localisation=loc, rngs=_rngs(0))
    x = _images(shape)
    warped, theta = _apply(st, x)
    np.testing.assert_allclose(warped, x, atol=2e-6)
    np.testing.assert_array_equal(theta, np.broadcast_to(TRANSFORMS["affine3d"].identity, theta.shape))


class _Both(nnx.Module):
    """Applies every module of a list to the same input (one compilation for several modules)."""

    def __init__(self, modules):
        self.modules = nnx.List(modules)

    def __call__(self, x):
        return [m(x) for m in self.modules]


def test_output_size_down_and_oversampling():
    x = _images((8, 8, 1))
    down = SpatialTransformer((8, 8, 1), "affine", output_size=(4, 4), rngs=_rngs(0))
    up = SpatialTransformer((8, 8, 1), "affine", output_size=(16, 12), rngs=_rngs(0))
    (small, _), (big, _) = _apply(_Both([down, up]), x)
    # align_corners=False: the identity at half size samples between 2x2 pixels: a 2x2 average pool.
    np.testing.assert_allclose(small, pool(x, 2, kind="avg"), atol=1e-6)
    assert big.shape == (2, 16, 12, 1)


def test_attention_moves_only_by_scale_and_translation():
    st = SpatialTransformer((10, 10, 1), "attention", rngs=_rngs(0))
    head = st.head.linear
    head.kernel.set_value(jnp.asarray(np.random.default_rng(1).normal(size=head.kernel.shape) * 0.05, jnp.float32))
    head.bias.set_value(jnp.array([0.7, 0.1, -0.2]))
    x = _images((10, 10, 1), batch=3)

    @nnx.jit
    def run(st, x):
        theta = st.localise(x)
        grid = st.grid(theta)
        base = st.grid(jnp.broadcast_to(jnp.array([1.0, 0.0, 0.0]), theta.shape))
        return theta, grid, base, st(x)[0], st.sample(x, grid)

    theta, grid, base, warped, sampled = run(st, x)
    s, tx, ty = (theta[:, i, None, None] for i in range(3))
    # x_s depends on x_t only and y_s on y_t only, with one common scale: no rotation, shear or anisotropy.
    np.testing.assert_allclose(grid[..., 0], s * base[..., 0] + tx, atol=1e-6)
    np.testing.assert_allclose(grid[..., 1], s * base[..., 1] + ty, atol=1e-6)
    assert not np.allclose(theta[:, 0], 1.0)
    np.testing.assert_allclose(warped, sampled, atol=1e-6)


def test_bounded_attention_stays_in_range():
    bound = {"scale": (0.5, 1.5), "translation": 0.25}
    st = SpatialTransformer((10, 10, 1), "attention", bound=bound, rngs=_rngs(0))
    tps = SpatialTransformer((10, 10, 1), "tps", bound={"offset": 0.1}, rngs=_rngs(0))
    x = _images((10, 10, 1), batch=8)
    warped, theta = _apply(st, x)
    np.testing.assert_allclose(theta, np.broadcast_to([1.0, 0.0, 0.0], theta.shape), atol=1e-6)  # identity at init
    np.testing.assert_allclose(warped, x, atol=1e-5)
    head = st.head.linear
    head.kernel.set_value(jnp.asarray(np.random.default_rng(2).normal(size=head.kernel.shape) * 1e3, jnp.float32))
    tps.head.linear.bias.set_value(jnp.full((32,), 50.0))
    (_, theta), (_, tps_theta) = _apply(_Both([st, tps]), x * 10)
    assert float(np.abs(theta[:, 1:]).max()) > 0.2  # saturated: far from the identity, still in range
    assert np.all((theta[:, 0] >= 0.5) & (theta[:, 0] <= 1.5))
    assert np.all(np.abs(theta[:, 1:]) <= 0.25)
    assert np.all(np.abs(tps_theta) <= 0.1)  # TPS offsets are bounded the same way
    with pytest.raises(ValueError, match="attention"):
        SpatialTransformer((10, 10, 1), "affine", bound={"scale": (0.5, 2)}, rngs=_rngs(0))
    with pytest.raises(ValueError, match="low < 1 < high"):
        Bound.create({"scale": (1.0, 2.0)}).check("attention")
    with pytest.raises(ValueError, match="unknown bound keys"):
        Bound.create({"rotation": 1.0})


def test_pad_value_reads_background_outside():
    b = 0.3
    x = _images((12, 12, 2))
    sts = []
    for pad_value in (b, 0.0, (0.1, 0.9)):
        st = SpatialTransformer((12, 12, 2), "attention", pad_value=pad_value, rngs=_rngs(0))
        st.head.linear.bias.set_value(jnp.array([3.0, 0.0, 0.0]))  # zoom out 3x: the border reads outside
        sts.append(st)
    outs = _apply(_Both(sts), x)
    for (warped, _), expected in zip(outs, (b, 0.0, np.array([0.1, 0.9]))):
        np.testing.assert_allclose(warped[:, 0, :], np.broadcast_to(expected, warped[:, 0, :].shape), atol=1e-6)
        np.testing.assert_allclose(warped[:, :, -1], np.broadcast_to(expected, warped[:, :, -1].shape), atol=1e-6)
        centre = warped[:, 5:7, 5:7]
        assert np.all((centre >= 0) & (centre <= 1))


def test_identity_penalty():
    # The shapes of test_model_trains: the initialisers are compiled already.
    model = models.create_model("st_fcn", transform="affine", input_shape=(28, 28, 1), num_classes=10,
                                rngs=_rngs(0), width=8)
    plain = models.create_model("fcn", input_shape=(28, 28, 1), num_classes=10, rngs=_rngs(0), width=8)
    x = _images((28, 28, 1))
    _, aux = _apply_aux(model, x)
    assert float(aux["identity_penalty"]) == 0.0
    st = model.layers[0]
    st.head.linear.bias.set_value(st.head.linear.bias.get_value() + jnp.array([0.1, 0, 0, 0, 0, -0.2]))
    _, aux = _apply_aux(model, x)
    np.testing.assert_allclose(aux["identity_penalty"], 0.1 ** 2 + 0.2 ** 2, rtol=1e-5)
    _, aux = _apply_aux(plain, x)
    assert aux["theta"] == [] and aux["warped"] == []
    assert float(aux["identity_penalty"]) == 0.0


def test_localisation_group_and_custom_body():
    class Body(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(25, 7, rngs=rngs)

        def __call__(self, x):
            return jax.nn.relu(self.linear(x.reshape(x.shape[0], -1)))

    st = SpatialTransformer((5, 5, 1), "projective", localisation=Body(_rngs(0)), rngs=_rngs(1))
    assert type(st.body.linear.kernel) is LocalisationParam
    assert st.head.linear.kernel.shape == (7, 8)
    net = TransformerSequential([st, Pool(5, "avg"), nnx.Linear(1, 3, rngs=_rngs(2))])
    graphdef, loc, main, rest = nnx.split(net, LocalisationParam, nnx.Param, ...)
    assert len(jax.tree.leaves(loc)) == 4 and len(jax.tree.leaves(main)) == 2
    assert len(jax.tree.leaves(rest)) == 0
    # optax labels from variable types: a learning rate 0 for the localisation networks.
    labels = nnx.map_state(lambda path, v: "loc" if isinstance(v, LocalisationParam) else "main",
                           nnx.state(net, nnx.Param))
    tx = optax.multi_transform({"loc": optax.sgd(0.0), "main": optax.sgd(1e-2)}, labels)
    optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
    before = jax.tree.map(np.asarray, (nnx.state(net, LocalisationParam), nnx.state(net, nnx.Param)))

    @nnx.jit
    def step(net, optimizer, x):
        grads = nnx.grad(lambda m: (m(x) ** 2).sum())(net)
        optimizer.update(net, grads)

    step(net, optimizer, _images((5, 5, 1)))
    after = jax.tree.map(np.asarray, (nnx.state(net, LocalisationParam), nnx.state(net, nnx.Param)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1])))


def test_series_and_parallel_transformers():
    """Transformers on deeper feature maps (in series) and in parallel; all parameters are recorded."""
    rngs = _rngs(0)
    conv = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=rngs)
    st1 = SpatialTransformer((12, 12, 4), "affine", rngs=rngs)
    par = ParallelTransformers([SpatialTransformer((6, 6, 4), t, output_size=(4, 4),
                                                   localisation={"kind": "fc", "hidden": (8,)}, rngs=rngs)
                                for t in ("attention", "tps")])
    net = TransformerSequential([conv, st1, Pool(2, "max"), par, Pool(4, "avg"), nnx.Linear(8, 3, rngs=rngs)])
    x = _images((12, 12, 1))

    @nnx.jit
    def run(net, x):
        out, aux = net(x, return_aux=True)
        separate = ParallelTransformers(list(net.layers[3].transformers), concat=False)
        return out, aux, conv(x), separate(pool(aux["warped"][0], 2))

    out, aux, features, (outs, thetas) = run(net, x)
    assert out.shape == (2, 1, 1, 3)
    assert [t.shape for t in aux["theta"]] == [(2, 6), (2, 3), (2, 32)]
    assert [w.shape for w in aux["warped"]] == [(2, 12, 12, 4), (2, 4, 4, 4), (2, 4, 4, 4)]
    np.testing.assert_allclose(aux["warped"][0], features, atol=1e-5)  # identity at init, on feature maps
    assert float(aux["identity_penalty"]) == 0.0
    assert len(net.transformers) == 3 and len(jax.tree.leaves(nnx.state(net, LocalisationParam))) == 8 + 4 + 4
    assert isinstance(outs, list) and len(outs) == len(thetas) == 2
    np.testing.assert_allclose(outs[0], aux["warped"][1], atol=1e-6)


# ----------------------------------------------------------------------------
# JAX/Flax transformations and checkpoints.
# ----------------------------------------------------------------------------


def test_vmap_over_inputs_and_over_an_ensemble():
    kw = dict(transform="affine", input_shape=(28, 28, 1), num_classes=10, width=8)
    model = models.create_model("st_fcn", rngs=_rngs(0), **kw)
    xs = _images((28, 28, 1), batch=6).reshape(2, 3, 28, 28, 1)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=0, out_axes=0)
    def ensemble(rngs):
        return models.create_model("st_fcn", rngs=rngs, **kw)

    @nnx.jit
    def run(model, xs):
        members = ensemble(_rngs(0))
        per_input = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(model, xs)
        looped = jnp.stack([model(xs[0]), model(xs[1])])
        per_member = nnx.vmap(lambda m, x: m(x, return_aux=True), in_axes=(0, None))(members, xs[0])
        return per_input, looped, per_member

    per_input, looped, (logits, aux) = run(model, xs)
    np.testing.assert_allclose(per_input, looped, atol=1e-5)
    assert logits.shape == (2, 3, 10) and aux["theta"][0].shape == (2, 3, 6)
    assert not np.allclose(logits[0], logits[1])


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    kw = dict(transform="tps", input_shape=(28, 28, 1), num_classes=10, width=8)
    model = models.create_model("st_cnn", rngs=_rngs(0), **kw)
    st = model.layers[0]
    st.head.linear.bias.set_value(jnp.linspace(-0.1, 0.1, 32))  # something other than the initial values
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(model))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: models.create_model("st_cnn", rngs=_rngs(1), **kw))
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract_state))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(nnx.state(restored, LocalisationParam))) == len(
        jax.tree.leaves(nnx.state(model, LocalisationParam))) > 0
    x = _images((28, 28, 1))
    a, b = _apply(_Both([model, restored]), x)
    np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------
# Errors list the valid choices.
# ----------------------------------------------------------------------------


def test_errors_list_the_choices():
    kw = dict(input_shape=(28, 28, 1), num_classes=10, rngs=_rngs(0))
    with pytest.raises(ValueError, match=re.escape(f"unknown model 'resnet'; choose one of {', '.join(MODELS)}")):
        models.create_model("resnet", **kw)
    image_transforms = models.transforms_with_dims(2)
    assert set(image_transforms) >= {"affine", "attention", "projective", "tps"}
    with pytest.raises(ValueError, match=re.escape(f"needs transform to be one of {list(image_transforms)}, "
                                                   f"got 'similarity'")):
        models.create_model("st_cnn", transform="similarity", **kw)
    with pytest.raises(ValueError, match=r"transform must be None.*'st_fcn'"):
        models.create_model("cnn", transform="affine", **kw)
    with pytest.raises(ValueError, match=re.escape(f"one of {list(image_transforms)}, got None")):
        models.create_model("st_cnn", **kw)
    with pytest.raises(ValueError, match=r"\['affine3d'\]"):
        models.create_model("st3d", transform="tps", input_shape=(12, 12, 12, 1), num_classes=10, rngs=_rngs(0))
    with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
        models.create_model("st3d", **kw)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['loc_channels'\].*valid options.*'localisation'"):
        models.create_model("st_fcn", transform="affine", loc_channels=(4,), **kw)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['localisation.channels'\].*valid options under "
                                         r"localisation: \['hidden', 'kind'\]"):
        models.create_model("st_fcn", transform="affine", localisation={"channels": (4,)}, **kw)
    with pytest.raises(ValueError, match="too small"):
        models.create_model("cnn", input_shape=(16, 16, 1), num_classes=10, rngs=_rngs(0))
    with pytest.raises(ValueError, match="raise param_budget"):
        models.create_model("st_fcn", transform="affine", param_budget=1000, **kw)
    with pytest.raises(ValueError, match=r"choose one of \['affine', 'affine3d', 'attention'"):
        SpatialTransformer((8, 8, 1), "rotation", rngs=_rngs(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        SpatialTransformer((8, 8, 1), "affine", mode="bicubic", rngs=_rngs(0))
    with pytest.raises(ValueError, match=r"localisation must be .*\('fc', 'conv'\)"):
        SpatialTransformer((8, 8, 1), "affine", localisation="rnn", rngs=_rngs(0))
    paper = {"fcn", "cnn", "st_fcn", "st_cnn", "add_fcn", "add_cnn", "add_st_fcn", "add_2st_fcn", "st3d"}
    assert {name for name, *_ in _family_models()} == paper <= set(MODELS.names())
    assert set(MODELS.names()) == set(MODELS) and len(MODELS.names()) == len(MODELS)
    small = nnx.eval_shape(lambda: models.create_model("st3d", input_shape=(12, 12, 12, 1), num_classes=10,
                                                       rngs=_rngs(0), classifier="fcn", width=4, depth_reduce="max"))
    assert small.display_name == "ST3D-FCN"
    with pytest.raises(ValueError, match="too small"):
        ConvBody((8, 8, 1), rngs=_rngs(0))
