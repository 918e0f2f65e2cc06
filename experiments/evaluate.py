"""Evaluates the latest checkpoint of a run and prints ``test_error=<float> test_loss=<float>``.

    python -m experiments.evaluate --workdir workdirs/quickstart
    python -m experiments.evaluate --workdir workdirs/quickstart \\
        --config.data.test_npz=my_digits.npz   # images (N, H, W[, C]) uint8 or [0, 1] floats, labels (N,)
    python -m experiments.evaluate --config configs/quickstart.py --workdir workdirs/quickstart

Without ``--config`` the run's own ``W/config.json`` is the config
(`experiments/workdir_config.py`); ``--config.<key>=<value>`` overrides apply to
either. Each setting that differs from the run's ``config.json`` is announced as
a warning (another ``data.max_angle`` is another test set); another model or
data task is refused. ``test_npz`` works for every image task (labels ``(N, 5)``
for SVHN's five digit positions); co-localisation, scored by boxes, refuses it.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from experiments.cli import config_from_workdir, run

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:args]); default: the run's "
                                "config.json.", lock_config=False,
                                accept_new_attributes=True)  # keys are checked by stn_jax.paper.config.resolve
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from stn_jax.paper.config import resolve
    from stn_jax.paper.evaluation import evaluate_checkpoint
    from stn_jax.paper.objectives import create_objective

    result = evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    print(create_objective(resolve(FLAGS.config).objective).result_line(result))


if __name__ == "__main__":
    run(main, config_from_workdir(sys.argv))
