"""Trains (and evaluates) one experiment from a config file.

    python -m experiments.train --config configs/distorted_mnist.py:rts,st_cnn,affine --workdir workdirs/rts
    python -m experiments.train --config configs/quickstart.py --workdir workdirs/quickstart \\
        --config.data.source=../shared/data/mnist --config.total_steps=500

It starts by printing the resolved config and the model's parameters per group (the text of
``experiments.show_config``), which ``W/config.json`` records. Started again with the same workdir, a run resumes
from its latest checkpoint.
Several processes (hosts) form one run when each is given
``--coordinator_address``, ``--num_processes`` and its ``--process_id``
(on GPU/TPU clusters that set the usual environment, ``--distributed`` alone).
"""

from __future__ import annotations

import jax
from absl import flags
from ml_collections import config_flags

from experiments.cli import run

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)  # keys are checked by stn_jax.paper.config.resolve
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster environments).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """Joins the processes of a multi-process run (no-op for a single process)."""
    if FLAGS.coordinator_address or FLAGS.distributed:
        # CPU devices need gloo for cross-process collectives; it does not affect GPU/TPU backends. (Asking
        # for the backend here would initialise it, which must happen after jax.distributed.initialize.)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def main(argv) -> None:
    del argv
    initialize_distributed()
    from stn_jax.paper import train  # after distributed initialisation
    from stn_jax.paper.config import resolve
    from stn_jax.paper.objectives import create_objective

    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(create_objective(resolve(FLAGS.config).objective).result_line(result))


if __name__ == "__main__":
    run(main)
