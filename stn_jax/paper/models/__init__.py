"""The paper's MNIST-family models (distorted MNIST, MNIST addition, 3-D) and their registry.

``create_model(name, transform=..., input_shape=..., num_classes=..., rngs=...,
**options)`` builds a model by name (`MODEL_NAMES`):

=================  ===========================================================
``fcn``            FC -> ReLU -> FC -> ReLU -> FC (paper 2.1)
``cnn``            conv 9x9 -> ReLU -> max-pool 2 -> conv 7x7 -> ReLU -> max-pool 2 -> FC
``st_fcn``         spatial transformer (FC localisation) [-> avg-pool 2] -> FCN
``st_cnn``         spatial transformer (conv localisation) [-> avg-pool 2] -> CNN
``add_fcn``        FCN on the two-channel addition input (paper 2.4)
``add_cnn``        CNN on the addition input
``add_st_fcn``     one transformer warping both channels [-> avg-pool 2] -> FCN
``add_2st_fcn``    two parallel transformers, each seeing and warping both
                   channels, outputs concatenated to 4 channels [-> avg-pool 2] -> FCN
``st3d``           3-D affine transformer on a volume -> depth sum -> [avg-pool 2] -> CNN
=================  ===========================================================

Every model is a `stn_jax.layers.TransformerSequential`:
``model(x)`` returns logits ``(B, num_classes)``; ``model(x, return_aux=True)``
returns ``(logits, aux)`` with ``aux["theta"]`` (list of ``(B, num_params)``),
``aux["warped"]`` (list of transformer outputs) and ``aux["identity_penalty"]``.

Widths are derived from a parameter budget (`PARAM_BUDGET`, option
``param_budget``): every model of one experiment (one input shape) has that
many parameters to within `BUDGET_TOLERANCE`; the transformer models get a
narrower classifier because their localisation networks use part of the
budget. ``python -m stn_jax.models`` prints the table of docs/models.md.
See docs/models.md for every decision and deviation from the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stn_jax import transforms
from stn_jax.layers import (
    DepthReduce,
    Flatten,
    LocalisationParam,
    ParallelTransformers,
    Pool,
    SpatialTransformer,
    TransformerSequential,
    count_params,
    pool,
    pooled_size,
)

__all__ = [
    "MODEL_NAMES", "PARAM_BUDGET", "BUDGET_TOLERANCE", "TRANSFORMS_2D", "PAPER_TRANSFORMS", "FCNClassifier",
    "CNNClassifier", "STNClassifier", "create_model", "model_options", "describe", "param_table",
]

PARAM_BUDGET = 400_000
"""Parameters per model (all models of one experiment), [U]: the digest recalls ~400k for distorted MNIST."""

BUDGET_TOLERANCE = 0.05
"""Every model is within this relative distance of its budget (the derived widths are integers)."""

TRANSFORMS_2D = ("affine", "attention", "projective", "tps")
PAPER_TRANSFORMS = ("affine", "projective", "tps")
TRANSFORM_ABBREVIATIONS = {"affine": "Aff", "attention": "Att", "projective": "Proj", "tps": "TPS", "affine3d": "Aff3D"}


# ----------------------------------------------------------------------------
# Classification networks (three weight layers each).
# ----------------------------------------------------------------------------


class FCNClassifier(nnx.Module):
    """flatten -> FC(width) -> ReLU -> FC(width) -> ReLU -> FC(num_classes)."""

    def __init__(self, input_shape: Sequence[int], width: int, num_classes: int, *, rngs: nnx.Rngs):
        input_shape = tuple(int(s) for s in input_shape)
        self.input_shape, self.width = input_shape, int(width)
        self.flatten = Flatten(len(input_shape))
        n = math.prod(input_shape)
        self.fc1 = nnx.Linear(n, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    @staticmethod
    def num_params(input_shape: Sequence[int], width: int, num_classes: int) -> int:
        n = math.prod(input_shape)
        return n * width + width + width * width + width + width * num_classes + num_classes

    @staticmethod
    def describe(input_shape, width, num_classes) -> str:
        return f"FC {width} > ReLU > FC {width} > ReLU > FC {num_classes}"

    def __call__(self, x):
        x = jax.nn.relu(self.fc1(self.flatten(x)))
        x = jax.nn.relu(self.fc2(x))
        return self.out(x)


class CNNClassifier(nnx.Module):
    """conv 9x9 (valid) -> ReLU -> max-pool 2 -> conv 7x7 (valid) -> ReLU -> max-pool 2 -> FC(num_classes).

    Both convs have ``width`` filters. The max-pools use ceil mode (an
    incomplete last window is kept), which makes the paper's RTS shapes work
    (42 -> avg-pool 21 -> conv 13 -> pool 7 -> conv 1 -> pool 1); see docs/models.md.
    """

    KERNELS = (9, 7)

    def __init__(self, input_shape: Sequence[int], width: int, num_classes: int, *, rngs: nnx.Rngs):
        input_shape = tuple(int(s) for s in input_shape)
        feat = self.feature_shape(input_shape, width)
        self.input_shape, self.width = input_shape, int(width)
        self.conv1 = nnx.Conv(input_shape[-1], width, (9, 9), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (7, 7), padding="VALID", rngs=rngs)
        self.flatten = Flatten(3)
        self.out = nnx.Linear(math.prod(feat), num_classes, rngs=rngs)

    @classmethod
    def feature_shape(cls, input_shape: Sequence[int], width: int) -> tuple[int, int, int]:
        if len(input_shape) != 3:
            raise ValueError(f"CNNClassifier: input_shape must be (H, W, C), got {tuple(input_shape)}")
        size = list(input_shape[:2])
        for k in cls.KERNELS:
            size = [n - k + 1 for n in size]
            if min(size) < 1:
                raise ValueError(
                    f"CNNClassifier: input {tuple(input_shape)} is too small for conv 9x9 > pool 2 > conv 7x7 "
                    f"> pool 2 (it needs at least 21x21 after any pooling before it)")
            size = [pooled_size(n, 2, True) for n in size]
        return (size[0], size[1], int(width))

    @classmethod
    def num_params(cls, input_shape: Sequence[int], width: int, num_classes: int) -> int:
        c = input_shape[-1]
        feat = cls.feature_shape(input_shape, width)
        return (81 * c * width + width) + (49 * width * width + width) + (math.prod(feat) * num_classes + num_classes)

    @classmethod
    def describe(cls, input_shape, width, num_classes) -> str:
        h, w, _ = cls.feature_shape(input_shape, width)
        return (f"conv {width}@9x9 > ReLU > max-pool 2 (ceil) > conv {width}@7x7 > ReLU > max-pool 2 (ceil) "
                f"> [{h}x{w}x{width}] > FC {num_classes}")

    def __call__(self, x):
        x = pool(jax.nn.relu(self.conv1(x)), 2, kind="max", ceil=True)
        x = pool(jax.nn.relu(self.conv2(x)), 2, kind="max", ceil=True)
        return self.out(self.flatten(x))


CLASSIFIERS = {"fcn": FCNClassifier, "cnn": CNNClassifier}


class STNClassifier(TransformerSequential):
    """A registry model: `TransformerSequential` plus the name, transform and widths it was built with."""

    def __init__(self, layers, *, model_name: str, display_name: str, transform: str | None, width: int,
                 input_shape: tuple[int, ...], num_classes: int, summary: str):
        super().__init__(layers)
        self.model_name, self.display_name, self.transform = model_name, display_name, transform
        self.width, self.input_shape, self.num_classes, self.summary = width, input_shape, num_classes, summary

    def __call__(self, x, *, return_aux: bool = False):
        return super().__call__(x, return_aux=return_aux)


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    family: str                      # "mnist", "addition", "3d"
    display: str                     # display name; "{t}" is replaced by the transform's abbreviation
    transforms: tuple[str, ...]      # () for models without a transformer
    classifier: str                  # "fcn", "cnn" or "option" (st3d: the `classifier` option)
    localisation: str | None = None  # "fc" or "conv"
    num_transformers: int = 0


_SPECS: dict[str, _Spec] = {
    "fcn": _Spec("mnist", "FCN", (), "fcn"),
    "cnn": _Spec("mnist", "CNN", (), "cnn"),
    "st_fcn": _Spec("mnist", "ST-FCN {t}", TRANSFORMS_2D, "fcn", "fc", 1),
    "st_cnn": _Spec("mnist", "ST-CNN {t}", TRANSFORMS_2D, "cnn", "conv", 1),
    "add_fcn": _Spec("addition", "FCN", (), "fcn"),
    "add_cnn": _Spec("addition", "CNN", (), "cnn"),
    "add_st_fcn": _Spec("addition", "ST-FCN {t}", TRANSFORMS_2D, "fcn", "fc", 1),
    "add_2st_fcn": _Spec("addition", "{n}xST-FCN {t}", TRANSFORMS_2D, "fcn", "fc", 2),
    "st3d": _Spec("3d", "ST3D-{c}", ("affine3d",), "option", "conv3d", 1),
}

MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)

_COMMON_OPTIONS = dict(param_budget=PARAM_BUDGET, width=None)
_ST_OPTIONS = dict(align_corners=False, mode="bilinear", padding_mode="zeros", pad_value=0.0, bound=None,
                   head_init_std=0.0, output_size=None, post_pool=None)
_LOC_OPTIONS = {
    "fc": dict(loc_hidden=(32, 32, 32)),
    "conv": dict(loc_channels=(20, 20), loc_kernel=5, loc_fc=(20,), loc_downsample="max"),
    "conv3d": dict(loc_channels=(8, 8), loc_kernel=3, loc_fc=(32,), loc_downsample="max"),
}


def model_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults (``post_pool=None``: automatic, see docs)."""
    spec = _spec(name)
    opts = dict(_COMMON_OPTIONS)
    if spec.num_transformers:
        opts.update(_ST_OPTIONS)
        opts.update(_LOC_OPTIONS[spec.localisation])
    if spec.num_transformers > 1:
        opts["num_transformers"] = spec.num_transformers
    if spec.family == "3d":
        opts.update(depth_reduce="sum", classifier="cnn")
    return opts


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
    return _SPECS[name]


def _check_transform(name: str, spec: _Spec, transform: str | None) -> str | None:
    if transform in ("", "none"):
        transform = None
    if not spec.transforms:
        if transform is not None:
            raise ValueError(f"model {name!r} has no spatial transformer, so transform must be None, got "
                             f"{transform!r}; models with a transformer: "
                             f"{[n for n, s in _SPECS.items() if s.transforms]}")
        return None
    if transform is None and len(spec.transforms) == 1:
        return spec.transforms[0]
    if transform not in spec.transforms:
        if transform is not None and transform not in transforms.TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r} for model {name!r}; choose one of {list(spec.transforms)}")
        raise ValueError(f"model {name!r} needs transform to be one of {list(spec.transforms)}, got {transform!r}")
    return transform


def _solve_width(count: Callable[[int], int], target: int, what: str) -> int:
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


def _loc_spec(kind: str, o: dict) -> dict:
    if kind == "fc":
        return {"kind": "fc", "hidden": tuple(o["loc_hidden"])}
    spec = {"kind": "conv", "channels": tuple(o["loc_channels"]), "kernel_size": int(o["loc_kernel"]),
            "fc": tuple(o["loc_fc"]), "downsample": o["loc_downsample"]}
    if kind == "conv3d":
        spec.update(padding="SAME", pool_after=(True,) * len(spec["channels"]))
    return spec


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def create_model(name: str, *, transform: str | None = None, input_shape: Sequence[int], num_classes: int,
                 rngs: nnx.Rngs, **options) -> STNClassifier:
    """Builds the model ``name`` (one of `MODEL_NAMES`).

    Args:
      name: ``"fcn"``, ``"cnn"``, ``"st_fcn"``, ``"st_cnn"`` (distorted MNIST; any ``(H, W, C)``),
        ``"add_fcn"``, ``"add_cnn"``, ``"add_st_fcn"``, ``"add_2st_fcn"`` (addition; ``(H, W, 2)``),
        ``"st3d"`` (``(D, H, W, C)`` volumes).
      transform: for the ``st_*`` and ``add_*st_*`` models one of `TRANSFORMS_2D` (the paper
        uses affine, projective and tps); ``None`` for the others; ``st3d`` takes ``None`` or ``"affine3d"``.
      input_shape: per-example input shape, channels last.
      num_classes: 10 for MNIST, 19 for addition.
      rngs: `nnx.Rngs` for the initialisation.
      **options: see `model_options(name)`:
        * ``param_budget`` (default `PARAM_BUDGET`) and ``width`` (``None``: derived from the budget):
          units of each FCN hidden layer / filters of each CNN conv;
        * transformer models: ``align_corners``, ``mode``, ``padding_mode``, ``pad_value``, ``bound``,
          ``head_init_std``, ``output_size`` (the transformer's; default the input's), ``post_pool``
          (2x2 average pool after the transformer: ``None`` = automatic, on when the transformer's
          output is at least 42 pixels high and wide, i.e. RTS, TC, addition and 3-D; or 1 / 2),
          localisation sizes ``loc_hidden`` (FC) or ``loc_channels``, ``loc_kernel``, ``loc_fc``,
          ``loc_downsample`` (conv);
        * ``add_2st_fcn``: ``num_transformers`` (default 2);
        * ``st3d``: ``depth_reduce`` (``"sum"``, ``"mean"``, ``"max"``) and ``classifier``
          (``"cnn"`` or ``"fcn"``).

    Raises:
      ValueError: unknown name, transform or option, or an impossible combination; the message lists
        the valid choices.
    """
    spec = _spec(name)
    transform = _check_transform(name, spec, transform)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {sorted(valid)}")
    o = {**valid, **options}
    input_shape = tuple(int(s) for s in input_shape)
    ndim = 3 if spec.family == "3d" else 2
    if len(input_shape) != ndim + 1 or min(input_shape) < 1:
        layout = "(D, H, W, C)" if ndim == 3 else "(H, W, C)"
        raise ValueError(f"model {name!r} takes inputs of shape {layout} (channels last), got {input_shape}")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")

    classifier_kind = o["classifier"] if spec.classifier == "option" else spec.classifier
    if classifier_kind not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, got {classifier_kind!r}")
    classifier_cls = CLASSIFIERS[classifier_kind]

    layers: list = []
    parts: list[str] = []
    loc_params = 0
    shape = input_shape
    n_st = int(o.get("num_transformers", spec.num_transformers))
    if spec.num_transformers:
        if n_st < 1:
            raise ValueError(f"num_transformers must be at least 1, got {n_st}")
        sts = [SpatialTransformer(input_shape, transform, output_size=o["output_size"],
                                  localisation=_loc_spec(spec.localisation, o), align_corners=o["align_corners"],
                                  mode=o["mode"], padding_mode=o["padding_mode"], pad_value=o["pad_value"],
                                  bound=o["bound"], head_init_std=o["head_init_std"], rngs=rngs)
               for _ in range(n_st)]
        loc_params = sum(count_params(st) for st in sts)
        out = sts[0].output_size
        shape = tuple(out) + (input_shape[-1] * n_st,)
        loc = " > ".join(_describe_body(sts[0].body)) + f" > FC {sts[0].num_params}"
        if n_st == 1:
            layers.append(sts[0])
            parts.append(f"ST {transform} to {_shape_str(out)} (loc: {loc})")
        else:
            layers.append(ParallelTransformers(sts, concat=True))
            parts.append(f"{n_st} parallel ST {transform} to {_shape_str(out)}, channels concatenated "
                         f"to {shape[-1]} (each loc: {loc})")
        if spec.family == "3d":
            layers.append(DepthReduce(o["depth_reduce"]))
            shape = shape[1:]
            parts.append(f"{o['depth_reduce']} over depth")
        post_pool = o["post_pool"]
        if post_pool is None:
            post_pool = 2 if min(shape[:2]) >= 42 else 1
        if post_pool not in (1, 2):
            raise ValueError(f"post_pool must be None (automatic), 1 or 2, got {post_pool!r}")
        if post_pool == 2:
            p = Pool(2, "avg")
            layers.append(p)
            shape = p.output_shape(shape)
            parts.append("avg-pool 2")
    elif spec.family == "3d":  # pragma: no cover - every 3-D model has a transformer
        raise AssertionError

    budget = int(o["param_budget"])
    width = o["width"]
    display = spec.display.format(t=TRANSFORM_ABBREVIATIONS.get(transform, ""), n=n_st,
                                  c=classifier_kind.upper()).strip()
    try:
        if width is None:
            width = _solve_width(lambda w: classifier_cls.num_params(shape, w, num_classes), budget - loc_params,
                                 f"model {name!r}")
        width = int(width)
        if width < 1:
            raise ValueError(f"width must be a positive int, got {width}")
        classifier = classifier_cls(shape, width, num_classes, rngs=rngs)
    except ValueError as e:
        raise ValueError(f"model {name!r} ({display}) on input {input_shape}: {e}") from None
    layers.append(classifier)
    parts.append(classifier_cls.describe(shape, width, num_classes))
    summary = f"{display} on {_shape_str(input_shape)}: " + " -> ".join(parts)
    return STNClassifier(layers, model_name=name, display_name=display, transform=transform, width=width,
                         input_shape=input_shape, num_classes=num_classes, summary=summary)


def _describe_body(body) -> list[str]:
    from stn_jax.layers import ConvBody, FCBody

    if isinstance(body, FCBody):
        return [f"FC {layer.out_features} > ReLU" for layer in body.layers]
    if isinstance(body, ConvBody):
        nd = body.spatial_dims
        k = "x".join(["{}"] * nd)
        out = [f"{body.downsample}-pool 2"] if body.downsample else []
        for conv, p in zip(body.convs, body.pool_after):
            ks = k.format(*conv.kernel_size)
            pad = "" if conv.padding == "VALID" else f" {conv.padding.lower()}"
            out.append(f"conv {conv.out_features}@{ks}{pad} > ReLU" + (" > max-pool 2" if p else ""))
        out += [f"FC {layer.out_features} > ReLU" for layer in body.fcs]
        return out
    return [type(body).__name__]


# ----------------------------------------------------------------------------
# Description and the docs table.
# ----------------------------------------------------------------------------


def abstract_model(name: str, transform: str | None, input_shape, num_classes: int, **options) -> STNClassifier:
    """The model with abstract (shape-only) parameters: no compute, for counting and describing.

    Results without options other than ``param_budget`` are cached; treat them as read-only.
    """
    if set(options) <= {"param_budget"}:
        return _cached_abstract_model(name, transform, tuple(input_shape), int(num_classes),
                                      int(options.get("param_budget", PARAM_BUDGET)))
    return _abstract_model(name, transform, input_shape, num_classes, **options)


def _abstract_model(name, transform, input_shape, num_classes, **options) -> STNClassifier:
    return nnx.eval_shape(lambda: create_model(name, transform=transform, input_shape=input_shape,
                                               num_classes=num_classes, rngs=nnx.Rngs(0), **options))


@functools.lru_cache(maxsize=None)
def _cached_abstract_model(name, transform, input_shape, num_classes, budget) -> STNClassifier:
    return _abstract_model(name, transform, input_shape, num_classes, param_budget=budget)


def describe(name: str, transform: str | None, input_shape, num_classes: int, **options) -> str:
    """One line: the architecture, the total parameter count and the localisation networks' share."""
    m = abstract_model(name, transform, input_shape, num_classes, **options)
    total, loc = count_params(m), count_params(m, LocalisationParam)
    return f"{m.summary}; {total:,} parameters ({loc:,} in localisation networks)"


EXPERIMENTS = {
    "mnist": [("R, P, E", (28, 28, 1)), ("RTS", (42, 42, 1)), ("TC", (60, 60, 1))],
    "addition": [("addition", (42, 42, 2))],
    "3d": [("3-D", (60, 60, 60, 1))],
}
_NUM_CLASSES = {"mnist": 10, "addition": 19, "3d": 10}


def paper_models(family: str) -> list[tuple[str, str | None]]:
    """The (name, transform) pairs of the paper's tables for a family."""
    out = []
    for name, spec in _SPECS.items():
        if spec.family != family:
            continue
        if not spec.transforms:
            out.append((name, None))
        elif family == "3d":
            out.append((name, spec.transforms[0]))
        else:
            out.extend((name, t) for t in PAPER_TRANSFORMS)
    return out


def param_table(budget: int = PARAM_BUDGET) -> str:
    """The markdown tables of docs/models.md: parameter counts per model and experiment."""
    lines = [f"Budget {budget:,} parameters per model; tolerance {BUDGET_TOLERANCE:.0%}. "
             "Cells: total parameters (classifier width; parameters in localisation networks).", ""]
    worst = 0.0
    for family, title in (("mnist", "Distorted MNIST (10 classes)"), ("addition", "MNIST addition (19 classes)"),
                          ("3d", "3-D MNIST (10 classes)")):
        exps = EXPERIMENTS[family]
        lines += [f"#### {title}", "",
                  "| model | registry | " + " | ".join(f"{e} ({_shape_str(s)})" for e, s in exps) + " |",
                  "|---|---|" + "---:|" * len(exps)]
        for name, transform in paper_models(family):
            cells = []
            display = None
            for _, shape in exps:
                m = abstract_model(name, transform, shape, _NUM_CLASSES[family], param_budget=budget)
                total, loc = count_params(m), count_params(m, LocalisationParam)
                worst = max(worst, abs(total - budget) / budget)
                display = m.display_name
                cells.append(f"{total:,} ({m.width}; {loc:,})")
            reg = f"`{name}`" + (f", `{transform}`" if transform else "")
            lines.append(f"| `{display}` | {reg} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Largest distance from the budget: {worst:.2%}.")
    return "\n".join(lines)


def architecture_list() -> str:
    """One `describe` line per model of the paper's tables at the paper's input shapes (markdown list)."""
    lines = []
    for family, exps in EXPERIMENTS.items():
        for exp, shape in exps:
            for name, transform in paper_models(family):
                lines.append(f"- {describe(name, transform, shape, _NUM_CLASSES[family])}")
    return "\n".join(lines)


GENERATED_BEGIN = "<!-- BEGIN GENERATED by `python -m stn_jax.models` -->"
GENERATED_END = "<!-- END GENERATED -->"


def generated_docs() -> str:
    """The generated part of docs/models.md: `param_table` and `architecture_list`."""
    return (f"{GENERATED_BEGIN}\n\n{param_table()}\n\n#### Architectures at the paper's input sizes\n\n"
            f"{architecture_list()}\n\n{GENERATED_END}")


def _main(argv: Sequence[str]) -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Prints (or writes into a file) the model tables of docs/models.md.")
    parser.add_argument("--write", metavar="FILE", help="replace the generated block of FILE (e.g. docs/models.md)")
    args = parser.parse_args(argv)
    text = generated_docs()
    if not args.write:
        print(text)
        return
    path = Path(args.write)
    doc = path.read_text()
    if GENERATED_BEGIN not in doc or GENERATED_END not in doc:
        raise SystemExit(f"{path} has no generated block ({GENERATED_BEGIN} ... {GENERATED_END})")
    head, rest = doc.split(GENERATED_BEGIN, 1)
    tail = rest.split(GENERATED_END, 1)[1]
    path.write_text(head + text + tail)
    print(f"updated {path}")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
