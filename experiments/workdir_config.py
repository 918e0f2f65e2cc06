"""A config file that reads a training run's recorded config: ``--config experiments/workdir_config.py:W``.

``python -m experiments.evaluate --workdir W`` without ``--config`` uses it
(`experiments.cli.config_from_workdir`): the config ``W/config.json`` holds
(resolved, widths solved), to which ``--config.<key>=<value>`` overrides apply
as to any config file.
"""

from __future__ import annotations

import ml_collections

from stn_jax.paper.workdir import read_config


def get_config(workdir: str) -> ml_collections.ConfigDict:
    try:
        return read_config(workdir)
    except FileNotFoundError as e:  # config_flags reports a ValueError in one line; an OSError later, prefixed
        raise ValueError(str(e)) from None
