"""Flax NNX spatial-transformer layers.

* `SpatialTransformer`: localisation network + grid generator + sampler for any
  transform registered in `stn_jax.TRANSFORMS` (``affine``, ``attention``,
  ``projective``, ``tps``, ``affine3d``). ``st(x)`` returns ``(warped, theta)``.
* Localisation bodies `FCBody` and `ConvBody` (or any `nnx.Module` mapping
  ``x`` to ``(..., features)``), ending in `RegressionHead`, a linear layer
  initialised to the identity transform (zero kernel, bias = the transform's
  identity parameters, or their pre-image under a `Bound`).
* `ParallelTransformers`: several transformers on one input, outputs
  concatenated on channels or returned separately.
* `TransformerSequential`: layers applied in order, transformers anywhere among
  them (in series, at any depth); it collects every transformer's parameters
  and outputs for logging and the identity penalty.
* Helpers: `pool`, `Pool`, `DepthReduce`, `Flatten`, `identity_penalty`,
  `as_localisation`.

Parameter groups
----------------
Every parameter of a localisation network (body and regression head) is a
`LocalisationParam`, a subclass of `nnx.Param`, so::

    nnx.state(model, LocalisationParam)          # the localisation networks only
    nnx.state(model, nnx.All(nnx.Param, nnx.Not(LocalisationParam)))  # everything else
    graphdef, loc, main, rest = nnx.split(model, LocalisationParam, nnx.Param, ...)
    nnx.Optimizer(model, tx, wrt=nnx.Param)      # still updates both groups

and an optimiser can give the localisation networks their own learning rate
(the paper's SVHN and CUB models use a smaller one), e.g. with
``optax.multi_transform`` over the two groups of ``nnx.split``. A body passed in
as a module has its `nnx.Param` variables converted to `LocalisationParam`
when the transformer is built (`as_localisation`).

Training robustness (docs/models.md)
------------------------------------
``pad_value`` pads with the data's background instead of zeros (sample
``x - pad_value`` with zero padding, add ``pad_value`` back); ``bound`` squashes
parameters into a range (attention scale through a sigmoid, translations and
TPS offsets through ``tanh``); `identity_penalty` measures the distance of the
parameters from the identity; ``head_init_std`` replaces the zero regression
kernel with a small random one (the identity is then exact only on average).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax import sampler, transforms
from stn_jax.conv import conv_general_dilated
from stn_jax.coords import PADDING_MODES, as_size, check_bool

__all__ = [
    "LocalisationParam", "as_localisation", "Bound", "FCBody", "ConvBody", "RegressionHead",
    "SpatialTransformer", "ParallelTransformers", "TransformerSequential", "Pool", "DepthReduce",
    "Flatten", "pool", "tree_maximum", "identity_penalty", "LOCALISATION_KINDS", "count_params",
]


class LocalisationParam(nnx.Param):
    """Parameters of localisation networks: a sub-group of `nnx.Param` (see the module docstring)."""


def as_localisation(module: nnx.Module) -> nnx.Module:
    """Converts every plain `nnx.Param` of ``module`` (recursively) into a `LocalisationParam`, in place.

    Variables of other types (including subclasses of `nnx.Param`) are left as
    they are. Returns ``module``.
    """
    found = [(path, v) for path, v in nnx.iter_graph(module) if type(v) is nnx.Param]
    for path, var in found:
        parent = module
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        new = LocalisationParam(var.get_value())
        if isinstance(path[-1], int) or isinstance(parent, (nnx.List, nnx.Dict)):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return module


def _check_rngs(rngs: Any, name: str) -> None:
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"{name}: rngs must be an nnx.Rngs (e.g. rngs=nnx.Rngs(0)), got {rngs!r}")


def _check_input(x: jax.Array, shape: tuple[int, ...], name: str, arg: str = "input") -> jax.Array:
    """``x`` as an array if its trailing axes are ``shape`` (channels last), else a ValueError naming both.

    Shapes are static, so under `jax.jit` this costs nothing at run time.
    """
    x = jnp.asarray(x)
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape):]) != tuple(shape):
        expected = "(..., " + ", ".join(str(n) for n in shape) + ")"
        raise ValueError(f"{name}: expected {arg} of shape {expected} (channels last), got {tuple(x.shape)}")
    return x


def count_params(module: nnx.Module, variable_filter=nnx.Param) -> int:
    """Number of scalars in ``module``'s variables of ``variable_filter`` (works on abstract modules)."""
    leaves = jax.tree.leaves(nnx.state(module, variable_filter))
    return int(sum(math.prod(np.shape(x)) for x in leaves))


# ----------------------------------------------------------------------------
# Pooling and reshaping helpers.
# ----------------------------------------------------------------------------

POOL_KINDS = ("max", "avg")


def pool(x: jax.Array, window: int, *, kind: str = "max", spatial_dims: int = 2, ceil: bool = False) -> jax.Array:
    """Non-overlapping ``window``-wide pooling over the ``spatial_dims`` axes before the channel axis.

    ``ceil=False`` drops the incomplete last window (floor mode, output size
    ``n // window``); ``ceil=True`` keeps it (output ``ceil(n / window)``): a max
    pool takes the maximum of the pixels present, an average pool their mean.

    Windows never overlap, so neither ``reduce_window`` nor its slow
    ``select_and_scatter`` gradient is needed. Where the windows tile the input,
    a max pool is a tree of pairwise maxima over the ``window ** spatial_dims``
    strided views of ``x`` (forward and backward 2.6x faster on CPU than the
    reshape and max reduction used otherwise, which is faster where an incomplete
    window needs padding). Among tied maxima the gradient is shared (evenly by a
    reduction; by a pairwise maximum, evenly at each pair).
    """
    if kind not in POOL_KINDS:
        raise ValueError(f"pool kind must be one of {POOL_KINDS}, got {kind!r}")
    if window == 1:
        return x
    nb = x.ndim - spatial_dims - 1
    if nb < 0:
        raise ValueError(f"pool: expected (..., {spatial_dims} spatial axes, C), got shape {x.shape}")
    sizes = x.shape[nb:nb + spatial_dims]
    outs = [pooled_size(n, window, ceil) for n in sizes]
    if min(outs) < 1:
        raise ValueError(f"pool: spatial size {tuple(sizes)} is smaller than the window {window}")
    if all(n == 1 for n in sizes):  # a single pixel (ceil mode): its own max and mean
        return x
    x = x[(Ellipsis,) + tuple(slice(0, min(n, o * window)) for n, o in zip(sizes, outs)) + (slice(None),)]
    extra = [o * window - min(n, o * window) for n, o in zip(sizes, outs)]
    if kind == "max" and not any(extra):
        views = [x[(Ellipsis,) + tuple(slice(i, None, window) for i in offset) + (slice(None),)]
                 for offset in itertools.product(range(window), repeat=spatial_dims)]
        return tree_maximum(views)
    if any(extra):
        fill = -jnp.inf if kind == "max" else 0.0
        x = jnp.pad(x, [(0, 0)] * nb + [(0, e) for e in extra] + [(0, 0)], constant_values=fill)
    shape = x.shape[:nb] + sum(((o, window) for o in outs), ()) + x.shape[-1:]
    axes = tuple(nb + 2 * i + 1 for i in range(spatial_dims))
    if kind == "max":
        return x.reshape(shape).max(axis=axes)
    total = x.reshape(shape).sum(axis=axes)
    if not any(extra):
        return total / window ** spatial_dims
    count = np.ones((1,) * nb + tuple(outs) + (1,), np.float32)
    for i, (n, o) in enumerate(zip(sizes, outs)):
        last = n - (o - 1) * window  # pixels present in the last window along this axis
        idx = [slice(None)] * count.ndim
        idx[nb + i] = o - 1
        count[tuple(idx)] *= last / window
    return total / jnp.asarray(count * window ** spatial_dims, total.dtype)


def tree_maximum(arrays: Sequence[jax.Array]) -> jax.Array:
    """Element-wise maximum of same-shaped arrays as a balanced tree of ``jnp.maximum``.

    XLA fuses the tree into one pass, and its gradient is element-wise (a tie at a
    pair splits the gradient evenly between the two), where ``reduce_window``'s
    gradient needs ``select_and_scatter``.
    """
    arrays = list(arrays)
    while len(arrays) > 1:
        arrays = [jnp.maximum(a, b) for a, b in zip(arrays[::2], arrays[1::2])] + arrays[len(arrays) & ~1:]
    return arrays[0]


def pooled_size(n: int, window: int, ceil: bool) -> int:
    return -(-n // window) if ceil else n // window


class Pool(nnx.Module):
    """`pool` as a layer (no parameters)."""

    def __init__(self, window: int = 2, kind: str = "avg", *, spatial_dims: int = 2, ceil: bool = False):
        if kind not in POOL_KINDS:
            raise ValueError(f"Pool kind must be one of {POOL_KINDS}, got {kind!r}")
        self.window, self.kind, self.spatial_dims, self.ceil = int(window), kind, int(spatial_dims), bool(ceil)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        sp = [pooled_size(n, self.window, self.ceil) for n in shape[:self.spatial_dims]]
        return tuple(sp) + tuple(shape[self.spatial_dims:])

    def __call__(self, x):
        return pool(x, self.window, kind=self.kind, spatial_dims=self.spatial_dims, ceil=self.ceil)


DEPTH_REDUCTIONS = ("sum", "mean", "max")


class DepthReduce(nnx.Module):
    """Flattens a volume ``(..., D, H, W, C)`` along depth into an image ``(..., H, W, C)`` (sum, mean or max)."""

    def __init__(self, kind: str = "sum"):
        if kind not in DEPTH_REDUCTIONS:
            raise ValueError(f"depth reduction must be one of {DEPTH_REDUCTIONS}, got {kind!r}")
        self.kind = kind

    def __call__(self, x):
        return {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[self.kind](x, axis=-4)


class Flatten(nnx.Module):
    """Flattens the last ``ndim`` axes (the per-example axes) into one."""

    def __init__(self, ndim: int):
        self.ndim = int(ndim)

    def __call__(self, x):
        # An explicit size, not -1: a reshape cannot infer -1 for an empty batch.
        return x.reshape(x.shape[:x.ndim - self.ndim] + (math.prod(x.shape[x.ndim - self.ndim:]),))


# ----------------------------------------------------------------------------
# Localisation networks.
# ----------------------------------------------------------------------------


class FCBody(nnx.Module):
    """Fully connected localisation body: flatten -> [Linear -> ReLU] x len(hidden).

    The paper's ST-FCN localisation network (paper Sect. 4.1 [S]) is three hidden
    layers of 32 units: ``hidden=(32, 32, 32)``.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32, 32, 32), *, rngs: nnx.Rngs):
        _check_rngs(rngs, "FCBody")
        input_shape = as_size(input_shape, "FCBody", arg="input_shape")
        hidden = as_size(hidden, "FCBody", arg="hidden")
        if not hidden:
            raise ValueError(f"FCBody: hidden must be a non-empty sequence of positive widths, got {hidden}")
        self.input_shape = input_shape
        self.flatten = Flatten(len(input_shape))
        sizes = (math.prod(input_shape),) + hidden
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out_features = hidden[-1]

    def __call__(self, x):
        x = self.flatten(_check_input(x, self.input_shape, "FCBody"))
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


class ConvBody(nnx.Module):
    """Convolutional localisation body for images or volumes.

    ``[pool downsample] -> for each conv: conv -> ReLU [-> max-pool 2] -> flatten -> [Linear -> ReLU] x len(fc)``.

    The defaults are the paper's ST-CNN localisation network (paper Sect. 4.1 [S],
    [R]): the input downsampled 2x, conv 20 filters 5x5 (valid), max-pool 2,
    conv 20 filters 5x5 (valid), FC 20. Pools here use floor mode. 2-D convs are
    computed as patches x kernel on CPU (`stn_jax.conv`).

    Args:
      input_shape: per-example ``(H, W, C)`` or ``(D, H, W, C)``.
      channels: filters per conv layer.
      kernel_size: one size for every conv (square / cubic kernels).
      fc: hidden fully connected widths after the convs (may be empty).
      downsample: ``"max"``, ``"avg"`` or ``None``: the 2x pooling of the input.
      pool_after: per conv, whether a 2x max-pool follows it.
      padding: ``"VALID"`` or ``"SAME"`` for the convs.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (20, 20), kernel_size: int = 5,
                 fc: Sequence[int] = (20,), downsample: str | None = "max",
                 pool_after: Sequence[bool] | None = None, padding: str = "VALID", *, rngs: nnx.Rngs):
        _check_rngs(rngs, "ConvBody")
        input_shape = as_size(input_shape, "ConvBody", arg="input_shape")
        channels = as_size(channels, "ConvBody", arg="channels")
        fc = as_size(fc, "ConvBody", arg="fc")
        try:
            kernel_size = operator.index(kernel_size)
        except TypeError:
            raise ValueError(f"ConvBody: kernel_size must be a positive int, got {kernel_size!r}") from None
        if kernel_size < 1:
            raise ValueError(f"ConvBody: kernel_size must be a positive int, got {kernel_size!r}")
        nd = len(input_shape) - 1
        if nd not in (2, 3):
            raise ValueError(f"ConvBody: input_shape must be (H, W, C) or (D, H, W, C), got {input_shape}")
        if downsample not in (None, "none", *POOL_KINDS):
            raise ValueError(f"ConvBody: downsample must be one of {(None, *POOL_KINDS)}, got {downsample!r}")
        if padding not in ("VALID", "SAME"):
            raise ValueError(f"ConvBody: padding must be 'VALID' or 'SAME', got {padding!r}")
        if not channels:
            raise ValueError("ConvBody: channels must name at least one conv layer")
        pool_after = (True,) + (False,) * (len(channels) - 1) if pool_after is None else tuple(map(bool, pool_after))
        if len(pool_after) != len(channels):
            raise ValueError(f"ConvBody: pool_after needs one flag per conv layer ({len(channels)}), got {pool_after}")
        self.input_shape, self.spatial_dims = input_shape, nd
        self.downsample = None if downsample in (None, "none") else downsample
        self.pool_after = pool_after
        size = list(input_shape[:nd])
        if self.downsample:
            size = [pooled_size(n, 2, False) for n in size]
        convs, cin = [], input_shape[-1]
        for c, p in zip(channels, pool_after):
            if padding == "VALID":
                size = [n - kernel_size + 1 for n in size]
            if min(size) < 1 or (p and min(size) < 2):
                raise ValueError(
                    f"ConvBody: input {input_shape} is too small for this localisation network "
                    f"(downsample={downsample}, channels={channels}, kernel {kernel_size}, padding {padding})")
            convs.append(nnx.Conv(cin, c, (kernel_size,) * nd, padding=padding,
                                  conv_general_dilated=conv_general_dilated, rngs=rngs))
            cin = c
            if p:
                size = [pooled_size(n, 2, False) for n in size]
        self.convs = nnx.List(convs)
        self.flatten = Flatten(nd + 1)
        sizes = (math.prod(size) * cin,) + fc
        self.fcs = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out_features = sizes[-1]
        self.feature_shape = tuple(size) + (cin,)

    def __call__(self, x):
        x = _check_input(x, self.input_shape, "ConvBody")
        if self.downsample:
            x = pool(x, 2, kind=self.downsample, spatial_dims=self.spatial_dims)
        for conv, p in zip(self.convs, self.pool_after):
            x = jax.nn.relu(conv(x))
            if p:
                x = pool(x, 2, kind="max", spatial_dims=self.spatial_dims)
        x = self.flatten(x)
        for layer in self.fcs:
            x = jax.nn.relu(layer(x))
        return x


LOCALISATION_KINDS = ("fc", "conv")


def make_localisation_body(spec: Any, input_shape: Sequence[int], *, rngs: nnx.Rngs) -> nnx.Module:
    """A localisation body from a spec.

    ``spec`` is ``"fc"`` / ``"conv"`` (the paper's defaults), a mapping with a
    ``"kind"`` key and the body's keyword arguments (e.g. ``{"kind": "fc",
    "hidden": (64, 32)}``), or an `nnx.Module` (returned as it is).
    """
    if isinstance(spec, nnx.Module):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping) or spec.get("kind") not in LOCALISATION_KINDS:
        raise ValueError(f"localisation must be an nnx.Module, one of {LOCALISATION_KINDS}, or a mapping "
                         f"with 'kind' in {LOCALISATION_KINDS} and the body's options; got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    cls = FCBody if spec["kind"] == "fc" else ConvBody
    try:
        return cls(input_shape, **kwargs, rngs=rngs)
    except TypeError as e:
        raise ValueError(f"bad options for the {spec['kind']!r} localisation body: {e}") from None


def _body_features(body: nnx.Module, input_shape: Sequence[int]) -> int:
    n = getattr(body, "out_features", None)
    if isinstance(n, int):
        return n
    out = jax.eval_shape(lambda x: body(x), jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
    if out.ndim != 2:
        raise ValueError(f"the localisation body must map (B, ...) inputs to (B, features), got {out.shape}")
    return int(out.shape[-1])


# ----------------------------------------------------------------------------
# Bounded parameterisations.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bound:
    """Optional squashing of the regressed parameters (reimplementations report transforms drifting off the image).

    Attributes:
      scale: ``(low, high)`` for the attention scale ``s = low + (high - low) * sigmoid(raw)``;
        ``low < 1 < high`` so that the identity is inside the range. Attention only.
      translation: ``t_max``: translations become ``t_max * tanh(raw)`` (normalised units).
        Affine, attention, projective and 3-D affine.
      offset: ``m``: TPS control-point offsets become ``m * tanh(raw)``. TPS only.

    The regression head's bias is initialised to the pre-image of the identity,
    so a bounded transformer still starts at the identity.
    """

    scale: tuple[float, float] | None = None
    translation: float | None = None
    offset: float | None = None

    @classmethod
    def create(cls, spec) -> Bound | None:
        if spec is None or isinstance(spec, Bound):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"bound must be None, a Bound or a mapping with keys scale/translation/offset, "
                             f"got {spec!r}")
        unknown = set(spec) - {"scale", "translation", "offset"}
        if unknown:
            raise ValueError(f"unknown bound keys {sorted(unknown)}; choose from ['offset', 'scale', 'translation']")
        scale = spec.get("scale")
        scale = None if scale is None else tuple(float(s) for s in scale)
        tr = spec.get("translation")
        off = spec.get("offset")
        return cls(scale, None if tr is None else float(tr), None if off is None else float(off))

    def check(self, transform: str) -> None:
        if self.scale is not None:
            if transform != "attention":
                raise ValueError(f"bound 'scale' applies to the attention transform only, not {transform!r}")
            if len(self.scale) != 2 or not self.scale[0] < 1.0 < self.scale[1]:
                raise ValueError(f"bound 'scale' must be (low, high) with low < 1 < high, got {self.scale}")
        if self.translation is not None:
            translating = sorted(t.name for t in transforms.TRANSFORMS.values() if t.translation_index)
            if transform not in translating:
                raise ValueError(f"bound 'translation' applies to {translating}, not {transform!r}")
            if not self.translation > 0:
                raise ValueError(f"bound 'translation' must be positive, got {self.translation}")
        if self.offset is not None:
            if transform != "tps":
                raise ValueError(f"bound 'offset' applies to the tps transform only, not {transform!r}")
            if not self.offset > 0:
                raise ValueError(f"bound 'offset' must be positive, got {self.offset}")

    def apply(self, raw: jax.Array, transform: str) -> jax.Array:
        """Raw regression outputs ``(..., n)`` -> transform parameters."""
        theta = raw
        if self.scale is not None:
            lo, hi = self.scale
            theta = theta.at[..., 0].set(lo + (hi - lo) * jax.nn.sigmoid(raw[..., 0]))
        if self.translation is not None:
            idx = np.asarray(transforms.get_transform(transform).translation_index)
            theta = theta.at[..., idx].set(self.translation * jnp.tanh(raw[..., idx]))
        if self.offset is not None:
            theta = self.offset * jnp.tanh(raw)
        return theta

    def inverse(self, theta: np.ndarray, transform: str) -> np.ndarray:
        """The raw outputs that `apply` maps to ``theta`` (used for the identity bias), float64."""
        raw = np.array(theta, np.float64)
        if self.scale is not None:
            lo, hi = self.scale
            u = (raw[..., 0] - lo) / (hi - lo)
            raw[..., 0] = np.log(u) - np.log1p(-u)
        if self.translation is not None:
            idx = np.asarray(transforms.get_transform(transform).translation_index)
            raw[..., idx] = np.arctanh(raw[..., idx] / self.translation)
        if self.offset is not None:
            raw = np.arctanh(raw / self.offset)
        return raw


# ----------------------------------------------------------------------------
# Regression head and the spatial transformer.
# ----------------------------------------------------------------------------


class RegressionHead(nnx.Module):
    """The localisation network's last layer: ``features -> raw parameters``, initialised to the identity.

    Kernel zero (or ``N(0, init_std^2)`` when ``init_std > 0``), bias ``bias``.
    """

    def __init__(self, in_features: int, bias: np.ndarray, *, init_std: float = 0.0, rngs: nnx.Rngs):
        _check_rngs(rngs, "RegressionHead")
        bias = np.asarray(bias, np.float32)
        kernel_init = (nnx.initializers.normal(init_std) if init_std > 0 else nnx.initializers.zeros_init())
        self.linear = nnx.Linear(in_features, bias.shape[0], kernel_init=kernel_init, rngs=rngs)
        self.linear.bias.set_value(jnp.asarray(bias))

    def __call__(self, features):
        return self.linear(features)


class SpatialTransformer(nnx.Module):
    """A spatial transformer: ``(warped, theta) = st(x)``.

    Args:
      input_shape: per-example input shape ``(H, W, C)`` (``(D, H, W, C)`` for ``"affine3d"``).
      transform: a name from `stn_jax.TRANSFORMS`.
      output_size: ``(H_out, W_out)`` (``(D_out, H_out, W_out)``); default the
        input's spatial size. Smaller downsamples, larger oversamples.
      localisation: the body: ``"fc"`` (`FCBody`, three hidden layers of 32),
        ``"conv"`` (`ConvBody`, the paper's ST-CNN localisation network), a
        mapping ``{"kind": ..., **options}``, or any `nnx.Module` mapping
        ``(B, *input_shape)`` to ``(B, features)`` (its parameters become
        `LocalisationParam`).
      align_corners: the pixel convention of grid and sampler (docs/conventions.md).
      mode, padding_mode: passed to the sampler (`stn_jax.grid_sample`).
      pad_value: the background value that points outside the input read with
        ``padding_mode="zeros"``: scalar or one value per channel.
      bound: `Bound` or a mapping (``{"scale": (0.5, 2.0)}``, ``{"translation": 1.0}``,
        ``{"offset": 0.5}``); ``None`` regresses the parameters directly.
      head_init_std: std of the regression kernel's initialisation (0: zeros, the paper's choice).
      rngs: `nnx.Rngs`.

    Call: ``st(x, loc_input=None)``: ``x`` is ``(B, *input_shape)`` (more leading
    axes are allowed with the built-in bodies); the localisation network sees
    ``loc_input`` when given (e.g. richer features of the same image) and ``x``
    otherwise. Returns ``warped (B, *output_size, C)`` and ``theta (B,
    num_params)``, the parameters in the transform registry's meaning (after
    any bound), ready for ``transform.make_grid``. An ``x`` whose trailing axes
    are not ``input_shape`` (e.g. a channels-first batch) or that is not
    floating-point raises ValueError naming both shapes (static: free under
    jit); a batch of 0 gives empty outputs.
    """

    def __init__(self, input_shape: Sequence[int], transform: str = "affine", *,
                 output_size: Sequence[int] | None = None, localisation: Any = "fc",
                 align_corners: bool = False, mode: str = "bilinear", padding_mode: str = "zeros",
                 pad_value: float | Sequence[float] = 0.0, bound: Bound | Mapping | None = None,
                 head_init_std: float = 0.0, loc_input_shape: Sequence[int] | None = None, rngs: nnx.Rngs):
        _check_rngs(rngs, "SpatialTransformer")
        t = transforms.get_transform(transform)
        nd = t.spatial_dims
        input_shape = as_size(input_shape, "SpatialTransformer", arg="input_shape")
        if len(input_shape) != nd + 1:
            layout = "(H, W, C)" if nd == 2 else "(D, H, W, C)"
            raise ValueError(f"SpatialTransformer({transform!r}): input_shape must be {layout}, got {input_shape}")
        output_size = (input_shape[:nd] if output_size is None
                       else as_size(output_size, "SpatialTransformer", n=nd, arg="output_size"))
        align_corners = check_bool(align_corners, "SpatialTransformer")
        modes = sampler.MODES_2D if nd == 2 else sampler.MODES_3D
        if mode not in modes:
            raise ValueError(f"SpatialTransformer: mode must be one of {modes}, got {mode!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"SpatialTransformer: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if np.ndim(pad_value) == 0:
            pad_value = float(pad_value)
        else:
            pad_value = tuple(float(v) for v in np.ravel(pad_value))
            if len(pad_value) not in (1, input_shape[-1]):
                raise ValueError(f"pad_value must be a scalar or one value per channel ({input_shape[-1]}), "
                                 f"got {len(pad_value)} values")
        bound = Bound.create(bound)
        if bound is not None:
            bound.check(transform)
        self.transform, self.input_shape, self.output_size = transform, input_shape, output_size
        self.num_params, self.spatial_dims = t.num_params, nd
        self.align_corners, self.mode, self.padding_mode = align_corners, mode, padding_mode
        self.pad_value, self.bound = pad_value, bound
        loc_shape = (input_shape if loc_input_shape is None
                     else as_size(loc_input_shape, "SpatialTransformer", arg="loc_input_shape"))
        # The shape loc_input must have: given, or the built-in body's (a module passed in
        # as the body may take anything, and checks its own input).
        self.loc_input_shape = (loc_shape if loc_input_shape is not None or not isinstance(localisation, nnx.Module)
                                else None)
        self.body = as_localisation(make_localisation_body(localisation, loc_shape, rngs=rngs))
        identity = np.asarray(t.identity, np.float64)
        bias = identity if bound is None else bound.inverse(identity, transform)
        self.head = as_localisation(RegressionHead(_body_features(self.body, loc_shape), bias,
                                                   init_std=float(head_init_std), rngs=rngs))

    @property
    def identity(self) -> np.ndarray:
        """The transform's identity parameters ``(num_params,)``."""
        return transforms.get_transform(self.transform).identity

    def localise(self, x: jax.Array) -> jax.Array:
        """``theta (..., num_params)`` for input (or localisation features) ``x``."""
        raw = self.head(self.body(x)).astype(jnp.float32)
        return raw if self.bound is None else self.bound.apply(raw, self.transform)

    def grid(self, theta: jax.Array) -> jax.Array:
        """The sampling grid ``(..., *output_size, spatial_dims)`` for ``theta``."""
        return transforms.get_transform(self.transform).make_grid(theta, self.output_size, self.align_corners)

    def sample(self, x: jax.Array, grid: jax.Array) -> jax.Array:
        """Samples ``x`` at ``grid`` with the transformer's sampler options and background value."""
        fn = sampler.grid_sample if self.spatial_dims == 2 else sampler.grid_sample_3d
        kwargs = dict(mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners)
        if not any(np.ravel(self.pad_value)):
            return fn(x, grid, **kwargs)
        value = jnp.asarray(self.pad_value, x.dtype)
        return fn(x - value, grid, **kwargs) + value

    def __call__(self, x: jax.Array, loc_input: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x = _check_input(x, self.input_shape, "SpatialTransformer", "x")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"SpatialTransformer: x must be a floating-point array (e.g. uint8 images / 255), "
                             f"got dtype {x.dtype}")
        if loc_input is not None and self.loc_input_shape is not None:
            loc_input = _check_input(loc_input, self.loc_input_shape, "SpatialTransformer", "loc_input")
        theta = self.localise(x if loc_input is None else loc_input)
        return self.sample(x, self.grid(theta)), theta


def identity_penalty(thetas: Sequence[jax.Array], identities: Sequence[np.ndarray]) -> jax.Array:
    """Mean over transformers and examples of the squared distance ``||theta - identity||^2``; 0.0 for none."""
    if len(thetas) == 0:
        return jnp.zeros((), jnp.float32)
    terms = [jnp.mean(jnp.sum((th.astype(jnp.float32) - jnp.asarray(idn, jnp.float32)) ** 2, -1))
             for th, idn in zip(thetas, identities)]
    return sum(terms) / len(terms)


class ParallelTransformers(nnx.Module):
    """Several transformers on one input (one per digit or part), e.g. the paper's 2xST-FCN.

    ``concat=True`` concatenates the outputs on channels (they must share the
    spatial output size); ``concat=False`` returns the list. Returns
    ``(outputs, thetas)`` with ``thetas`` a list, one per transformer.
    """

    def __init__(self, transformers: Sequence[SpatialTransformer], *, concat: bool = True):
        transformers = list(transformers)
        if not transformers or not all(isinstance(t, SpatialTransformer) for t in transformers):
            raise ValueError("ParallelTransformers needs a non-empty sequence of SpatialTransformer")
        if concat and len({t.output_size for t in transformers}) != 1:
            raise ValueError("ParallelTransformers(concat=True): the transformers' output sizes differ: "
                             f"{[t.output_size for t in transformers]}")
        self.transformers = nnx.List(transformers)
        self.concat = bool(concat)

    def __call__(self, x, loc_input=None):
        outs, thetas = [], []
        for t in self.transformers:
            out, theta = t(x, loc_input)
            outs.append(out)
            thetas.append(theta)
        return (jnp.concatenate(outs, -1) if self.concat else outs), thetas


class TransformerSequential(nnx.Module):
    """Layers in order, with transformers anywhere among them (in series, on deeper feature maps).

    Each layer is a callable module; a `SpatialTransformer` or
    `ParallelTransformers` layer passes on its (concatenated) output and has its
    parameters and outputs recorded. ``__call__(x, *, return_aux=False)``
    returns the last layer's output, or ``(output, aux)`` with ``aux`` a dict:

    * ``"theta"``: list of ``(B, num_params)`` transform parameters, one per transformer;
    * ``"warped"``: list of the transformers' outputs (for pictures);
    * ``"identity_penalty"``: `identity_penalty` over all of them (0.0 without transformers).
    """

    def __init__(self, layers: Sequence[Callable]):
        self.layers = nnx.List(list(layers))

    @property
    def transformers(self) -> list[SpatialTransformer]:
        out = []
        for layer in self.layers:
            if isinstance(layer, SpatialTransformer):
                out.append(layer)
            elif isinstance(layer, ParallelTransformers):
                out.extend(layer.transformers)
        return out

    def __call__(self, x, *, return_aux: bool = False):
        thetas, warped, identities = [], [], []
        for layer in self.layers:
            if isinstance(layer, SpatialTransformer):
                x, theta = layer(x)
                thetas.append(theta)
                warped.append(x)
                identities.append(layer.identity)
            elif isinstance(layer, ParallelTransformers):
                outs = []
                for t in layer.transformers:
                    out, theta = t(x)
                    outs.append(out)
                    thetas.append(theta)
                    identities.append(t.identity)
                warped.extend(outs)
                x = jnp.concatenate(outs, -1) if layer.concat else outs
            else:
                x = layer(x)
        if not return_aux:
            return x
        return x, {"theta": thetas, "warped": warped, "identity_penalty": identity_penalty(thetas, identities)}
