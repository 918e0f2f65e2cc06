"""Evaluates the latest checkpoint of a run and prints ``test_error=<float> test_loss=<float>``.

    python -m experiments.evaluate --config configs/quickstart.py --workdir workdirs/quickstart
    python -m experiments.evaluate --config configs/quickstart.py --workdir workdirs/quickstart \\
        --config.data.test_npz=my_digits.npz   # images (N, H, W[, C]) uint8 or [0, 1] floats, labels (N,)

Use the same config (and overrides) as for training, so that the model matches: each setting that differs
from the run's ``config.json`` is announced as a warning. ``test_npz`` works for every image task (labels
``(N, 5)`` for SVHN's five digit positions); co-localisation, scored by boxes, refuses it.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from experiments.cli import run

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)  # keys are checked by stn_jax.paper.config.resolve
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from stn_jax.paper import train
    from stn_jax.paper.config import resolve
    from stn_jax.paper.objectives import create_objective

    result = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    print(create_objective(resolve(FLAGS.config).objective).result_line(result))


if __name__ == "__main__":
    run(main)
