"""Prints the fully resolved config a run would use, and its model's parameters per group, without training.

    python -m experiments.show_config configs/distorted_mnist.py:rts,st_cnn,tps
    python -m experiments.show_config configs/cub.py:efficientnet_lite0,st2_448 --config.data.classes=1-30
    python -m experiments.show_config --config configs/svhn.py:st_multi,64 --config.model.options.width_multiplier=0.5

The config file and its arguments come first (or as ``--config``); ``--config.<key>=<value>`` overrides apply as
for ``experiments.train``. The output (`stn_jax.paper.resolved`) is the config ``config.json`` would hold (every
default filled, the classifier width solved from the parameter budget), then the model, its input and its
parameters per optimiser group (``main``, ``backbone``, ``loc``) with their learning-rate multipliers, counted on an
abstract model: no data is read and nothing is trained or downloaded (pretrained models are counted on random
weights of the same shapes, as the output says). Training prints the same text at its start.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from experiments.cli import positional_config, run

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)  # keys are checked by stn_jax.paper.config.resolve
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from stn_jax.paper.resolved import resolved_run

    print(resolved_run(FLAGS.config).text())


if __name__ == "__main__":
    run(main, positional_config(sys.argv))
