"""The train state and the one function that builds everything a run needs (`setup`).

`setup(config)` returns a `Setup`: the data set, the model split into its
graph and state, the objective, the optimiser, the initial `TrainState`, what
the model holds (`ModelInfo`: its parameters per group) and the config with the
width the model solved from its parameter budget (`with_solved_width`).
Training (`stn_jax.paper.train`), evaluation and the benchmarks all start
from it, so they build the same model the same way.

State layout (a pytree; what a checkpoint holds):

* ``params``: ``{"loc": ..., "main": ...}``, the localisation networks'
  parameters (`stn_jax.layers.LocalisationParam`) and all other parameters;
  the optimiser gives three groups their own learning rates (`GROUPS`:
  ``loc``, ``backbone``, ``main``, labelled by `param_labels`);
* ``model_state``: every other variable except random-number streams, e.g.
  BatchNorm statistics (`nnx.BatchStat`): updated by the training step, used
  by evaluation;
* ``opt_state``, ``step``, ``first_nonfinite_step`` (-1 while the loss is finite).

Randomness inside the model (dropout) comes from `nnx.Rngs` streams that
the step reseeds from ``fold_in(key(seed), step)``: it is a function of
(seed, step), so it needs no checkpointing and a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from stn_jax.layers import LocalisationParam
from stn_jax.paper import models
from stn_jax.paper.data import make_dataset
from stn_jax.paper.objectives import Objective, create_objective


@struct.dataclass
class TrainState:
    """Everything that changes during training (see the module docstring)."""

    step: jax.Array
    params: dict[str, Any]
    model_state: Any
    opt_state: Any
    first_nonfinite_step: jax.Array


GROUPS = ("main", "backbone", "loc")
"""The parameter groups, each with its own learning rate (``optimizer.<group>_lr_multiplier`` x the schedule):
``loc`` the localisation networks (`LocalisationParam`), ``backbone`` the pretrained backbones a model names
in ``backbone_attributes`` (e.g. the CUB models' ``backbone`` / ``parts``), ``main`` everything else (the
new layers: classifiers, part-feature fusion; the whole network of a model without a backbone)."""


def make_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
    """The paper's step schedule: ``learning_rate``, multiplied by ``decay_factor`` at each step of
    ``decay_boundaries`` (e.g. MNIST (50k, 100k), CUB (10k, 20k, 25k); ``()``: constant); with
    ``warmup_steps`` > 0 [U] the rate first rises linearly, ``rate * (step + 1) / warmup_steps`` for the
    first ``warmup_steps`` steps (step 0 takes ``rate / warmup_steps``)."""
    steps = optax.piecewise_constant_schedule(opt.learning_rate,
                                              {int(b): opt.decay_factor for b in opt.decay_boundaries})
    warmup = int(opt.get("warmup_steps", 0))
    if warmup <= 0:
        return steps
    return lambda step: steps(step) * jnp.minimum(1.0, (step + 1) / warmup)


def group_multipliers(opt: ml_collections.ConfigDict) -> dict[str, float]:
    """Each group's learning-rate multiplier (`GROUPS`)."""
    return {"main": 1.0, "backbone": float(opt.backbone_lr_multiplier), "loc": float(opt.loc_lr_multiplier)}


def param_labels(params: dict[str, Any], backbone_attributes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The group (`GROUPS`) of every leaf of ``params`` (``{"loc": ..., "main": ...}``, `split_model`).

    A leaf of ``main`` is in ``backbone`` when its path starts with one of ``backbone_attributes``.
    """
    def main_label(path, _):
        first = path[0]
        name = getattr(first, "key", getattr(first, "name", getattr(first, "idx", None)))
        return "backbone" if name in backbone_attributes else "main"

    return {"loc": jax.tree.map(lambda _: "loc", params["loc"]),
            "main": jax.tree_util.tree_map_with_path(main_label, params["main"])}


def make_optimizer(opt: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
    """``opt.name`` over the parameter groups ``labels`` (`param_labels`), each at its multiplier x the schedule.

    ``"sgd"`` (the paper's): SGD with ``momentum`` (0: plain) and ``nesterov``; ``"adam"``: Adam with
    optax's defaults (b1 0.9, b2 0.999, eps 1e-8), for short budgets. ``weight_decay`` adds
    ``weight_decay * w`` to the gradient (L2) in every group.
    """
    schedule = make_schedule(opt)

    def group(multiplier: float):
        parts = [optax.add_decayed_weights(opt.weight_decay)] if opt.weight_decay else []
        rate = lambda step: multiplier * schedule(step)  # noqa: E731
        if opt.name == "adam":
            return optax.chain(*parts, optax.adam(rate))
        return optax.chain(*parts, optax.sgd(rate, momentum=opt.momentum or None, nesterov=opt.nesterov))

    return optax.multi_transform({g: group(m) for g, m in group_multipliers(opt).items()}, labels)


def learning_rates(opt: ml_collections.ConfigDict, groups: tuple[str, ...], step: jax.Array) -> dict[str, jax.Array]:
    """The metrics of each present group's rate at ``step``: ``learning_rate`` (``main``) and
    ``learning_rate_<group>`` for the others."""
    schedule, multipliers = make_schedule(opt), group_multipliers(opt)
    return {"learning_rate" if g == "main" else f"learning_rate_{g}": multipliers[g] * schedule(step)
            for g in groups}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model holds, counted on its variables (abstract ones too: `nnx.eval_shape`)."""

    summary: str
    """The architecture in one line (`stn_jax.paper.models.PaperModel.summary`; "" for a model without one)."""
    width: int | None
    """The classifier width it was given or solved from its parameter budget (None: it has no such width)."""
    parameters: dict[str, int]
    """Trainable parameters (scalars) of each group it has, in `GROUPS` order."""
    other_variables: int
    """Scalars of its variables that no optimiser updates: BatchNorm statistics, frozen weights."""


def model_info(model: nnx.Module) -> ModelInfo:
    """The `ModelInfo` of ``model``, its parameters grouped as the optimiser groups them (`param_labels`)."""
    _, params, _, rest = split_model(model)
    labels = param_labels(params, tuple(getattr(model, "backbone_attributes", ())))
    sizes = dict.fromkeys(GROUPS, 0)
    for label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
        sizes[label] += math.prod(np.shape(leaf))
    other = sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(rest))
    return ModelInfo(getattr(model, "summary", ""), getattr(model, "width", None),
                     {g: n for g, n in sizes.items() if n}, other)


def with_solved_width(config: ml_collections.ConfigDict, info: ModelInfo) -> ml_collections.ConfigDict:
    """``config`` with ``model.options.width`` set to the width the model solved where the config left it
    ``None`` (a copy; ``config`` itself is not changed)."""
    options = config.model.options
    if "width" not in options or options.width is not None or info.width is None:
        return config
    config = config.copy_and_resolve_references()
    config.model.options.width = int(info.width)
    return config


@dataclasses.dataclass
class Setup:
    """A run's pieces. ``merge(state, train=...)`` gives the model in training or evaluation mode.

    ``config`` is the resolved config with the width the model solved (`with_solved_width`); ``info``
    describes the model (`model_info`).
    """

    config: ml_collections.ConfigDict
    dataset: Any
    objective: Objective
    graphdef_train: Any
    graphdef_eval: Any
    rng_state: Any
    tx: optax.GradientTransformation
    groups: tuple[str, ...]
    state: TrainState
    info: ModelInfo

    def learning_rates(self, step: jax.Array) -> dict[str, jax.Array]:
        """``learning_rate`` (the ``main`` group) and ``learning_rate_<group>`` of the other groups present."""
        return learning_rates(self.config.optimizer, self.groups, step)

    def merge(self, params: dict, model_state: Any, *, train: bool, step: jax.Array | None = None):
        graphdef = self.graphdef_train if train else self.graphdef_eval
        # copy=True: the random-number streams are reseeded below inside a traced step, so the merged
        # model must own its variables (flax refuses to mutate a variable from an outer trace).
        model = nnx.merge(graphdef, params["loc"], params["main"], self.rng_state, model_state, copy=True)
        if train and step is not None and jax.tree.leaves(self.rng_state):
            key = jax.random.fold_in(jax.random.key(self.config.seed), step)
            nnx.reseed(model, policy="match_shape", dropout=key)  # stacked streams (vmapped parts) get a split
        return model


def split_model(model: nnx.Module):
    """``graphdef, params {"loc", "main"}, rng_state, model_state``."""
    graphdef, loc, main, rngs, rest = nnx.split(model, LocalisationParam, nnx.Param, nnx.RngState, ...)
    return graphdef, {"loc": loc, "main": main}, rngs, rest


def create_model(config: ml_collections.ConfigDict, image_shape, num_classes: int) -> models.PaperModel:
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed)
    return models.create_model(config.model.name, transform=config.model.transform or None,
                               input_shape=tuple(image_shape), num_classes=num_classes, rngs=rngs,
                               **config.model.options.to_dict())


def build(config: ml_collections.ConfigDict, image_shape, num_classes: int, dataset: Any = None) -> Setup:
    """Model, objective, optimiser and initial state of a resolved config (`stn_jax.paper.config.resolve`)
    for inputs of ``image_shape`` (per example) and ``num_classes``; the benchmarks use this directly."""
    model = create_model(config, image_shape, num_classes)
    info = model_info(model)
    config = with_solved_width(config, info)
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef_train, params, rng_state, model_state = split_model(model)
    labels = param_labels(params, tuple(getattr(model, "backbone_attributes", ())))
    tx = make_optimizer(config.optimizer, labels)
    state = TrainState(step=jnp.int32(0), params=params, model_state=model_state, opt_state=tx.init(params),
                       first_nonfinite_step=jnp.int32(-1))
    return Setup(config, dataset, create_objective(config.objective), graphdef_train, graphdef_eval, rng_state, tx,
                 tuple(info.parameters), state, info)


def setup(config: ml_collections.ConfigDict, *, cache_dir: str | None = None, process_index: int | None = None,
          process_count: int | None = None) -> Setup:
    """`build` for the config's data set, sharded for this process (training and evaluation start here)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    models.preflight(config.model.name, config.model.options.to_dict())  # weights files before any data cache
    dataset = make_dataset(config.data, seed=config.seed, global_batch_size=config.batch_size,
                           process_index=process_index, process_count=process_count,
                           cache_dir=cache_dir or config.data.get("cache_dir") or None)
    return build(config, dataset.image_shape, dataset.num_classes, dataset)
