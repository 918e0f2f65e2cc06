"""The model registry: `PaperModel` (what every model is), `ModelSpec` (how to build one), `MODELS`, `register`
and `create_model` (see `stn_jax.paper.models` for the interface).

The model families (`stn_jax.paper.models.mnist`, ``.svhn``, ``.cub``, ``.coloc``) register their models here;
`stn_jax.paper.models` imports them, so its `MODELS` lists every model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx

from stn_jax import transforms
from stn_jax.layers import LocalisationParam, TransformerSequential, count_params
from stn_jax.paper.registry import Registry

__all__ = [
    "MODELS", "ModelSpec", "PaperModel", "abstract_model", "check_transform", "create_model", "describe",
    "merge_options", "model_options", "module_params", "preflight", "register", "solve_width",
    "transforms_with_dims",
]


class PaperModel(TransformerSequential):
    """A registry model: `TransformerSequential` plus the name, transform and summary it was built with."""

    def __init__(self, layers, *, model_name: str, display_name: str, transform: str | None, width: int | None,
                 input_shape: tuple[int, ...], num_classes: int, summary: str):
        super().__init__(layers)
        self.model_name, self.display_name, self.transform = model_name, display_name, transform
        self.width, self.input_shape, self.num_classes, self.summary = width, input_shape, num_classes, summary


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one model and what the paper reports for it.

    Attributes:
      name: registry key (``--config.model.name``).
      build: ``build(input_shape, num_classes, transform, rngs, **options) -> PaperModel``.
      options: every option ``build`` takes, with its default (nested mappings for sub-networks).
      fixed_transforms: transforms it accepts by name (``()``: none, unless ``any_transform``).
      display: the paper's name; ``{t}`` becomes the transform's short name.
      tasks: the data tasks it is meant for (configs and studies pair models with these).
      paper: the paper's reported error (%) per ``(task, transform)`` ("" for no transform).
      input_ndim: spatial dimensions of its input (2 images, 3 volumes).
      any_transform: it also accepts every transform of ``stn_jax.TRANSFORMS`` with ``input_ndim``
        spatial dimensions, including ones registered after the model (see `transforms`).
    """

    name: str
    build: Callable[..., PaperModel]
    options: Mapping[str, Any]
    fixed_transforms: tuple[str, ...]
    display: str
    tasks: tuple[str, ...]
    paper: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    input_ndim: int = 2
    any_transform: bool = False
    preflight: Callable[[Mapping[str, Any]], None] | None = None

    @property
    def transforms(self) -> tuple[str, ...]:
        """The transforms it accepts now (``()``: it has no transformer)."""
        extra = transforms_with_dims(self.input_ndim) if self.any_transform else ()
        return self.fixed_transforms + tuple(t for t in extra if t not in self.fixed_transforms)

    def display_name(self, transform: str | None) -> str:
        short = transforms.get_transform(transform).short_name if transform else ""
        return self.display.replace("{t}", short).strip()


MODELS: Registry[ModelSpec] = Registry("model")


def register(spec: ModelSpec) -> ModelSpec:
    return MODELS.register(spec.name, spec)


def transforms_with_dims(spatial_dims: int) -> tuple[str, ...]:
    """The registered transforms of images (2) or volumes (3), in registry order."""
    return tuple(name for name, t in transforms.TRANSFORMS.items() if t.spatial_dims == spatial_dims)


def model_options(name: str) -> dict[str, Any]:
    """The options model ``name`` accepts, with their defaults (a deep copy)."""
    return _copy(MODELS.get(name).options)


def _copy(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in options.items()}


def _merge(name: str, defaults: Mapping[str, Any], given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``given`` over ``defaults``, recursively; unknown keys raise listing the valid ones."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {[where + k for k in unknown]} for model {name!r}; valid options"
                         f"{' under ' + where.rstrip('.') if where else ''}: {sorted(defaults)}")
    out = _copy(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], Mapping) and isinstance(value, Mapping):
            out[key] = _merge(name, defaults[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def merge_options(spec: ModelSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the model's defaults (nested ones in part); unknown keys raise listing the valid ones."""
    return _merge(spec.name, spec.options, options)


def preflight(name: str, options: Mapping[str, Any]) -> None:
    """Checks the files model ``name`` will read (e.g. pretrained weights) before a run builds anything else;
    a one-line error naming the file and what is wrong with it."""
    spec = MODELS.get(name)
    if spec.preflight is not None:
        spec.preflight(merge_options(spec, options))


def check_transform(spec: ModelSpec, transform: str | None) -> str | None:
    """The transform ``spec`` will use (``None``: none); ``ValueError`` listing the accepted ones."""
    if transform in ("", "none"):
        transform = None
    if not spec.transforms:
        if transform is not None:
            raise ValueError(f"model {spec.name!r} has no spatial transformer, so transform must be None, got "
                             f"{transform!r}; models with a transformer: "
                             f"{[n for n, s in MODELS.items() if s.transforms]}")
        return None
    if transform is None and len(spec.transforms) == 1:
        return spec.transforms[0]
    if transform not in spec.transforms:
        raise ValueError(f"model {spec.name!r} needs transform to be one of {list(spec.transforms)}, "
                         f"got {transform!r}")
    return transform


def create_model(name: str, *, transform: str | None = None, input_shape: Sequence[int], num_classes: int,
                 rngs: nnx.Rngs, **options) -> PaperModel:
    """Builds the registered model ``name``.

    Args:
      name: a key of `MODELS`.
      transform: one of the model's ``transforms`` (``None`` for models without a transformer;
        optional when the model accepts exactly one).
      input_shape: per-example input shape, channels last (``(H, W, C)``; ``(D, H, W, C)`` for volumes).
      num_classes: number of classes of the task.
      rngs: `nnx.Rngs` for the initialisation.
      **options: `model_options(name)`; nested options (e.g. ``localisation``) may be given in part.

    Raises:
      ValueError: unknown name, transform or option, or an impossible combination; the message lists
        the valid choices.
    """
    spec = MODELS.get(name)
    transform = check_transform(spec, transform)
    o = merge_options(spec, options)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != spec.input_ndim + 1 or min(input_shape) < 1:
        layout = "(D, H, W, C)" if spec.input_ndim == 3 else "(H, W, C)"
        raise ValueError(f"model {name!r} takes inputs of shape {layout} (channels last), got {input_shape}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__} {rngs!r}")
    try:
        return spec.build(input_shape, num_classes, transform, rngs, **o)
    except ValueError as e:
        raise ValueError(f"model {name!r} ({spec.display_name(transform)}) on input {input_shape}: {e}") from None


def solve_width(count: Callable[[int], int], target: int, what: str) -> int:
    """The integer width whose parameter count is closest to ``target`` (``count`` increases with width)."""
    if count(1) > target:
        raise ValueError(f"{what}: the parameter budget leaves {target:,} parameters for the classifier, "
                         f"fewer than its narrowest version needs ({count(1):,}); raise param_budget or set width")
    hi = 2
    while count(hi) < target:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:  # count(lo) < target <= count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return lo if target - count(lo) <= count(hi) - target else hi


@functools.lru_cache(maxsize=4096)
def module_params(cls: type, *args) -> int:
    """Parameters of ``cls(*args, rngs=...)``, counted on an abstract instance (`nnx.eval_shape`: no compute)."""
    return count_params(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0))))


def abstract_model(name: str, transform: str | None, input_shape: Sequence[int], num_classes: int,
                   **options) -> PaperModel:
    """The model with abstract (shape-only) parameters: for counting and describing, no compute."""
    return nnx.eval_shape(lambda: create_model(name, transform=transform, input_shape=input_shape,
                                               num_classes=num_classes, rngs=nnx.Rngs(0), **options))


def describe(name: str, transform: str | None, input_shape: Sequence[int], num_classes: int, **options) -> str:
    """One line: the architecture, the total parameter count and the localisation networks' share."""
    m = abstract_model(name, transform, input_shape, num_classes, **options)
    total, loc = count_params(m), count_params(m, LocalisationParam)
    return f"{m.summary}; {total:,} parameters ({loc:,} in localisation networks)"
