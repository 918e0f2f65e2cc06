"""Training settings shared by every experiment family (paper digest section 2.1, A.4 [S]).

Each family's ``get_config`` starts from `training_config`, sets its data and
model, and takes an optional trailing ``tiny`` argument (`split_tiny`) that
shrinks the run for a laptop (`shrink_for_local_run`). Values the paper does
not state are marked [U] (our assumption) and [S] (second-hand, "to verify").

Config files are loaded by path from the repository root
(``--config configs/<family>.py:<args>``); they import this module as
``configs.common``.
"""

from __future__ import annotations

import ml_collections


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
    c.identity_penalty = 0.0          # optional pull of theta towards the identity (landscape B10); paper: none

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.01  # A.4 [S]
    c.optimizer.decay_every = 50_000  # A.4 [S]: x0.1 every 50k iterations
    c.optimizer.decay_factor = 0.1
    c.optimizer.momentum = 0.9        # [U]: the paper says SGD; momentum not stated
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 0.0    # A.4 [S]: none mentioned for MNIST
    c.optimizer.loc_lr_multiplier = 1.0  # [U] for MNIST (SVHN, A.5 [S]: 0.1)

    c.model = model_config("cnn", "")
    return c


# Options whose default is None, typed so that `--config.model.options.<key>=...` can set them.
_NONE_TYPES = {"width": int, "output_size": tuple, "post_pool": int, "bound": dict}


def model_config(name: str, transform: str) -> ml_collections.ConfigDict:
    """``name``, ``transform`` ("" for none) and every option of `stn_jax.models.create_model` with its default.

    Listing the options makes them overridable (``--config.model.options.param_budget=100000``) and a
    misspelt one an error that lists the valid keys. ``None`` defaults stay ``None`` until set.
    """
    from stn_jax.models import model_options

    m = ml_collections.ConfigDict()
    m.name = name
    m.transform = transform
    m.options = ml_collections.ConfigDict()
    for key, value in model_options(name).items():
        m.options[key] = ml_collections.config_dict.placeholder(_NONE_TYPES[key]) if value is None else value
    return m


def split_tiny(arg: str) -> tuple[str, bool]:
    """``"rts,st_cnn,affine,tiny"`` -> ``("rts,st_cnn,affine", True)``."""
    parts = [p.strip() for p in (arg or "").split(",")]
    tiny = parts[-1] == "tiny"
    return ",".join(parts[:-1] if tiny else parts), tiny


def finish(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
    """Adds the evaluation-only data key and applies the ``tiny`` variant."""
    c.data.test_npz = ""  # experiments.evaluate: score a .npz of `images` and `labels` instead of the test split
    return shrink_for_local_run(c) if tiny else c


def shrink_for_local_run(c: ml_collections.ConfigDict, steps: int = 60) -> ml_collections.ConfigDict:
    """The ``tiny`` variant: a few small steps and a small test set, to check a setup end to end."""
    c.batch_size = 32
    c.total_steps = steps
    c.log_every = 10
    c.eval_every = steps
    c.checkpoint_every = steps // 2
    c.eval_batch_size = 250
    c.optimizer.decay_every = max(steps // 2, 1)
    c.data.test_size = 500
    return c
