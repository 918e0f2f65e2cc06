"""Resolving a run's config: the trainer's keys, the model's, the data task's and the objective's.

Config files (``configs/*.py``) are data: they set what their experiment
changes and import no model or data code. `resolve(config)` completes a config
with every default from the registries (model options, data-task options,
objective options, the trainer's own keys), checks every key and value, and
returns the resolved copy that a run records in ``config.json``. Errors are one
line naming the key and the valid choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from stn_jax.paper import models
from stn_jax.paper.data import TASKS, resolve_options
from stn_jax.paper.objectives import create_objective


def trainer_defaults() -> dict[str, Any]:
    """The trainer's own keys with neutral defaults (the experiment configs set the paper's values)."""
    return {
        "seed": 0,
        "batch_size": 256,
        "total_steps": 1_000,
        "log_every": 100,
        "eval_every": 1_000,
        "checkpoint_every": 1_000,
        "keep_checkpoints": 3,
        "eval_batch_size": 1_000,
        "optimizer": {"name": "sgd", "learning_rate": 0.01, "decay_boundaries": (), "decay_factor": 0.1,
                      "warmup_steps": 0, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                      "loc_lr_multiplier": 1.0,
                      "backbone_lr_multiplier": 1.0},
        "model": {"name": None, "transform": "", "options": {}},
        "data": {"task": None},
        "objective": {"name": "classification"},
    }


OPTIMIZERS = ("sgd", "adam")  # config.optimizer.name (stn_jax.paper.train_state.make_optimizer)
_POSITIVE = ("batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "eval_batch_size")


def _check_keys(given: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key '{where}{unknown[0]}'; valid keys"
                         f"{' under ' + repr(where.rstrip('.')) if where != 'config.' else ''}: "
                         f"{', '.join(sorted(defaults))}")


def _check_type(value: Any, default: Any, key: str) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if not ok:
        raise ValueError(f"{key} must be {type(default).__name__}, got {value!r}")


def check_boundaries(value: Any) -> tuple[int, ...]:
    """``config.optimizer.decay_boundaries`` as a tuple of increasing positive step numbers (one-line error)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, str) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b == int(b)
                                         for b in value):
        raise ValueError(f"config.optimizer.decay_boundaries must be a tuple of step numbers, e.g. (1500,) or "
                         f"(10000, 20000), got {value!r}")
    steps = tuple(int(b) for b in value)
    if any(b < 1 for b in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"config.optimizer.decay_boundaries must be increasing positive steps, got {steps}")
    return steps


def resolve(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The complete, checked config (a new ConfigDict; ``config`` is not changed)."""
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    defaults = trainer_defaults()
    _check_keys(given, defaults, "config.")
    out: dict[str, Any] = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if isinstance(default, dict):
            value = dict(value or {})
            if key == "optimizer":
                _check_keys(value, default, "config.optimizer.")
                for k, d in default.items():
                    value.setdefault(k, d)
                    _check_type(value[k], d, f"config.optimizer.{k}")
                value["decay_boundaries"] = check_boundaries(value["decay_boundaries"])
                if value["warmup_steps"] < 0:
                    raise ValueError(f"config.optimizer.warmup_steps must be 0 (none) or positive, "
                                     f"got {value['warmup_steps']}")
                if value["name"] not in OPTIMIZERS:
                    raise ValueError(f"config.optimizer.name must be one of {', '.join(OPTIMIZERS)}, "
                                     f"got {value['name']!r}")
            out[key] = value
        else:
            _check_type(value, default, f"config.{key}")
            out[key] = value
    for key in _POSITIVE:
        if out[key] < 1:
            raise ValueError(f"config.{key} must be at least 1, got {out[key]}")

    model = out["model"]
    _check_keys(model, defaults["model"], "config.model.")
    if not model.get("name"):
        raise ValueError(f"config.model.name is not set; choose one of {', '.join(models.MODELS.names())}")
    spec = models.MODELS.get(model["name"])
    options = dict(model.get("options") or {})
    model["transform"] = model.get("transform") or ""
    model["options"] = models.merge_options(spec, options)
    transform = models.check_transform(spec, model["transform"] or None)
    model["transform"] = transform or ""

    data = out["data"]
    if not data.get("task"):
        raise ValueError(f"config.data.task is not set; choose one of {', '.join(TASKS.names())}")
    out["data"] = resolve_options(data)

    objective = dict(out["objective"])
    create_objective(objective)  # checks the name and options
    cls_defaults = type(create_objective(objective)).defaults
    out["objective"] = {"name": objective["name"], **cls_defaults, **{k: v for k, v in objective.items()
                                                                      if k != "name"}}
    return ml_collections.ConfigDict(out)


def model_and_task(config: Mapping[str, Any] | ml_collections.ConfigDict) -> str:
    """``"st_cnn/affine on rts"``: what a run trains, for messages."""
    m, d = config["model"], config["data"]
    return f"{m['name']}{'/' + m['transform'] if m.get('transform') else ''} on {d['task']}"
