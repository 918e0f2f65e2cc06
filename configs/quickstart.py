"""Quickstart: ST-CNN (affine) on RTS-distorted MNIST, a useful model in under 10 minutes on a 2-core CPU.

    python -m experiments.train --config configs/quickstart.py --workdir workdirs/quickstart
    python -m experiments.train --config configs/quickstart.py --workdir workdirs/quickstart \\
        --config.data.source=../shared/data/mnist     # offline: a folder with the four MNIST IDX files

The model, data and optimiser are `configs/distorted_mnist.py:rts,st_cnn,affine`
(the paper's Table 1 cell, 0.5% error after 150k steps of batch 256); only the
budget differs, so that it runs on a laptop: 3,000 steps of batch 64 (3.2 epochs)
with the learning rate divided by 10 after 2,000 steps, test evaluations every
1,000 steps. MNIST comes through tensorflow-datasets (downloaded once into
``~/tensorflow_datasets``) unless ``data.source`` names an IDX folder.

It writes to the workdir: checkpoints, ``metrics.jsonl``, TensorBoard events
(``tensorboard --logdir workdirs/quickstart``), and ``images/transformer_step*.png``:
test digits with the transformer's sampling grid drawn on them beside what it
outputs. Expected: about 6 minutes on a 2-core x86 CPU (docs/benchmarks.md) and a
test error near 3% (docs/results.md has the measured run).
"""

from __future__ import annotations

import ml_collections

from configs import distorted_mnist


def get_config() -> ml_collections.ConfigDict:
    c = distorted_mnist.get_config("rts,st_cnn,affine")
    c.batch_size = 64                 # budget (paper: 256)
    c.total_steps = 3_000             # budget (paper: 150k)
    c.optimizer.decay_boundaries = (2_000,)  # budget: the paper's x0.1 step, scaled to the short run
    c.log_every = 50
    c.eval_every = 1_000
    c.checkpoint_every = 1_000
    return c
