"""Training settings shared by every experiment family (paper Appendix A.4 [S]) and the config-argument parser.

Each family's ``get_config`` starts from `training_config`, sets its model,
data and budget, and takes an optional trailing ``tiny`` argument
(`split_tiny`) that shrinks the run to a one-minute check
(`shrink_for_local_run`). A family file that takes arguments lists every one
it accepts (without ``tiny``) in its ``VARIANTS``
(``python -m experiments.show_config`` shows what each builds). Values carry
the provenance tags [P], [S], [R], [U] defined in `stn_jax.paper` ([U]: the
paper does not state it).

Configs are data: they set what their experiment changes. The run completes
them with every default of the model, data task and objective
(`stn_jax.paper.config.resolve`; ``config.json`` in the workdir records the
result), and the choices a config argument accepts (tasks, models,
transforms) come from the registries. Config files are loaded by path from the
repository root (``--config configs/<family>.py:<args>``) and import this
module as ``configs.common``.
"""

from __future__ import annotations

import ml_collections

from stn_jax.paper.data import TASKS
from stn_jax.paper.models import MODELS


def training_config() -> ml_collections.ConfigDict:
    """The top-level keys every config has; families override the model, data and budget."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256                # A.4 [S]
    c.total_steps = 150_000           # A.4 [S]: 150k iterations
    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    c.eval_batch_size = 1_000

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.01  # A.4 [S]
    c.optimizer.decay_boundaries = (50_000, 100_000)  # A.4 [S]: x0.1 every 50k iterations
    c.optimizer.decay_factor = 0.1
    c.optimizer.warmup_steps = 0      # [U]: none stated (a linear ramp to the rate over this many steps)
    c.optimizer.momentum = 0.9        # [U]: the paper says SGD; momentum not stated
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 0.0    # A.4 [S]: none mentioned for MNIST
    c.optimizer.loc_lr_multiplier = 1.0  # [U] for MNIST (SVHN, A.5 [S]: 0.1)

    # The paper's softmax classification; identity_penalty (optional pull of theta towards the
    # identity, docs/models.md) is 0 in the paper.
    c.objective = ml_collections.ConfigDict({"name": "classification", "identity_penalty": 0.0})
    c.model = model_config("cnn", "")
    c.data = ml_collections.ConfigDict({"task": "rts"})
    return c


def model_config(name: str, transform: str, **options) -> ml_collections.ConfigDict:
    """``name``, ``transform`` ("" for none) and the options this config changes (the rest are the model's defaults)."""
    return ml_collections.ConfigDict({"name": name, "transform": transform, "options": dict(options)})


def data_config(task: str, **options) -> ml_collections.ConfigDict:
    """``task`` and the data options this config changes (the rest are the task's defaults, docs/data.md)."""
    return ml_collections.ConfigDict({"task": task, **options})


def split_tiny(arg: str) -> tuple[str, bool]:
    """``"rts,st_cnn,affine,tiny"`` -> ``("rts,st_cnn,affine", True)``."""
    parts = [p.strip() for p in (arg or "").split(",")]
    tiny = parts[-1] == "tiny"
    return ",".join(parts[:-1] if tiny else parts), tiny


def family_choices(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The registered data tasks of ``family`` and the models meant for them."""
    tasks = tuple(name for name, t in TASKS.items() if t.family == family)
    models = tuple(name for name, m in MODELS.items() if set(m.tasks) & set(tasks))
    return tasks, models


def model_variants(models: tuple[str, ...]) -> tuple[str, ...]:
    """The model part of every config argument `parse_model_arg` accepts for ``models``: ``"model,transform"``
    for each transform of a model with several, ``"model"`` for one with none or one."""
    out: list[str] = []
    for model in models:
        transforms = MODELS.get(model).transforms
        out += [f"{model},{t}" for t in transforms] if len(transforms) > 1 else [model]
    return tuple(out)


def parse_model_arg(model: str, transform: str, models: tuple[str, ...]) -> tuple[str, str]:
    """Checks ``model`` (one of ``models``) and its ``transform`` against the model registry."""
    if model not in models:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(models)}")
    spec = MODELS.get(model)
    transform = "" if transform == "none" else transform
    if spec.transforms and len(spec.transforms) > 1 and transform not in spec.transforms:
        raise ValueError(f"model {model!r} needs a transform; choose one of {', '.join(spec.transforms)}, "
                         f"got {transform or '(none)'!r}")
    if not spec.transforms and transform:
        with_st = ", ".join(m for m in models if MODELS.get(m).transforms)
        raise ValueError(f"model {model!r} has no transformer: omit the transform or write 'none' "
                         f"(transforms apply to {with_st}), got {transform!r}")
    return model, transform


def shrink_for_local_run(c: ml_collections.ConfigDict, steps: int = 60) -> ml_collections.ConfigDict:
    """The ``tiny`` variant: a few small steps and a small test set, to check a setup end to end."""
    c.batch_size = 32
    c.total_steps = steps
    c.log_every = 10
    c.eval_every = steps
    c.checkpoint_every = steps // 2
    c.eval_batch_size = 256
    c.optimizer.decay_boundaries = (max(steps // 2, 1),)
    c.data.test_size = 512
    return c
