"""3-D MNIST (paper Appendix A.3, Fig. 5): ``get_config("st3d[,tiny]")``.

    python -m experiments.train --config configs/mnist_3d.py --workdir workdirs/mnist3d

A digit extruded into depth and placed at random in a 60x60x60 volume; a 3-D
affine transformer, then the depth axis of its output is flattened (sum;
``--config.model.options.depth_reduce=max``) and a 2-D CNN classifies it.
``--config.data.rotate_3d=True`` also rotates the digit in 3-D (off by default:
the paper does not say so).

The paper reports no number for this experiment (a figure only) and gives no
architecture or schedule [U]: we use distorted MNIST's schedule with batch 64
[U] (a 60^3 float32 volume is 864 kB) and 30k steps [U]. Wall time, measured on
the 2-core CPU of docs/benchmarks.md with ``python -m experiments.train
--config configs/mnist_3d.py:st3d,tiny --workdir /tmp/w3d
--config.data.source=../shared/data/mnist``: about 13 examples/s, i.e. about 40
hours for 30k steps of batch 64, so a full run wants a GPU; ``tiny`` (20 steps
of batch 8) took 33 s in all.
"""

from __future__ import annotations

import ml_collections

from configs.common import (
    data_config,
    family_choices,
    model_config,
    model_variants,
    shrink_for_local_run,
    split_tiny,
    training_config,
)

_, MODELS = family_choices("mnist3d")
VARIANTS = model_variants(MODELS)  # every argument but tiny


def get_config(arg: str = "st3d") -> ml_collections.ConfigDict:
    arg, tiny = split_tiny(arg)
    model = arg or "st3d"
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    c = training_config()
    c.batch_size = 64                 # [U] volumes are 864 kB each as float32
    c.total_steps = 30_000            # [U]
    c.optimizer.decay_boundaries = (10_000, 20_000)  # [U] the same three-stage schedule, scaled to 30k steps
    c.eval_batch_size = 100
    c.model = model_config(model, "affine3d")
    c.data = data_config("mnist3d")
    if tiny:
        shrink_for_local_run(c, steps=20)
        c.batch_size = 8
        c.eval_batch_size = 48
        c.data.test_size = 48
    return c
