"""The train state and the one function that builds everything a run needs (`setup`).

`setup(config)` returns a `Setup`: the data set, the model split into its
graph and state, the objective, the optimiser and the initial `TrainState`.
Training (`stn_jax.paper.train`), evaluation and the benchmarks all start
from it, so they build the same model the same way.

State layout (a pytree; what a checkpoint holds):

* ``params``: ``{"loc": ..., "main": ...}``, the localisation networks'
  parameters (`stn_jax.layers.LocalisationParam`) and all other parameters,
  two groups so the optimiser can give them different learning rates;
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
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


def make_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
    """The paper's step schedules: ``learning_rate * decay_factor ** (step // decay_every)``, or, when
    ``decay_boundaries`` lists steps, ``decay_factor`` once more at each of them (CUB: 10k, 20k, 25k)."""
    boundaries = tuple(int(b) for b in (opt.get("decay_boundaries") or ()))
    if boundaries:
        return optax.piecewise_constant_schedule(opt.learning_rate, {b: opt.decay_factor for b in boundaries})
    return optax.exponential_decay(opt.learning_rate, transition_steps=opt.decay_every,
                                   decay_rate=opt.decay_factor, staircase=True)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``opt.name`` over ``{"loc": ..., "main": ...}``, the localisation group at ``loc_lr_multiplier`` x.

    ``"sgd"`` (the paper's): SGD with ``momentum`` (0: plain) and ``nesterov``; ``"adam"``: Adam with
    optax's defaults (b1 0.9, b2 0.999, eps 1e-8), for short budgets. ``weight_decay`` adds
    ``weight_decay * w`` to the gradient (L2) in both.
    """
    schedule = make_schedule(opt)

    def group(multiplier: float):
        parts = [optax.add_decayed_weights(opt.weight_decay)] if opt.weight_decay else []
        rate = lambda step: multiplier * schedule(step)  # noqa: E731
        if opt.name == "adam":
            return optax.chain(*parts, optax.adam(rate))
        return optax.chain(*parts, optax.sgd(rate, momentum=opt.momentum or None, nesterov=opt.nesterov))

    return optax.multi_transform({"loc": group(opt.loc_lr_multiplier), "main": group(1.0)},
                                 {"loc": "loc", "main": "main"})


@dataclasses.dataclass
class Setup:
    """A run's pieces. ``merge(state, train=...)`` gives the model in training or evaluation mode."""

    config: ml_collections.ConfigDict
    dataset: Any
    objective: Objective
    graphdef_train: Any
    graphdef_eval: Any
    rng_state: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState

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
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef_train, params, rng_state, model_state = split_model(model)
    tx = make_optimizer(config.optimizer)
    state = TrainState(step=jnp.int32(0), params=params, model_state=model_state, opt_state=tx.init(params),
                       first_nonfinite_step=jnp.int32(-1))
    return Setup(config, dataset, create_objective(config.objective), graphdef_train, graphdef_eval, rng_state, tx,
                 make_schedule(config.optimizer), state)


def setup(config: ml_collections.ConfigDict, *, cache_dir: str | None = None, process_index: int | None = None,
          process_count: int | None = None) -> Setup:
    """`build` for the config's data set, sharded for this process (training and evaluation start here)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    dataset = make_dataset(config.data, seed=config.seed, global_batch_size=config.batch_size,
                           process_index=process_index, process_count=process_count,
                           cache_dir=cache_dir or config.data.get("cache_dir") or None)
    return build(config, dataset.image_shape, dataset.num_classes, dataset)
