"""MNIST addition (paper Appendix A.1, Table 4): ``get_config("model[,transform][,tiny]")``.

    python -m experiments.train --config configs/mnist_addition.py:add_2st_fcn,tps --workdir workdirs/add_2st_tps

Two independently RTS-distorted digits in the two channels of a 42x42x2 input;
the label is their sum (19 classes).

* model (`stn_jax.paper.models`): ``add_fcn``, ``add_cnn``, ``add_st_fcn`` (one
  transformer), ``add_2st_fcn`` (two transformers in parallel, each seeing and
  warping both channels, outputs concatenated to 4 channels);
* transform (ST models only): ``affine``, ``projective``, ``tps``;
* ``tiny`` (last): 60 steps of batch 32 and a 512-example test set.

Training: the paper gives no schedule for A.1 [U]; we use distorted MNIST's
(A.4 [S]: SGD, batch 256, 150k iterations, lr 0.01 divided by 10 every 50k,
momentum 0.9 [U]) and its ~400k parameter budget [U].

Expected result (Table 4, error %): FCN 47.7, CNN 14.7, ST-FCN Aff/Proj/TPS
22.6/18.5/19.1, 2xST-FCN Aff/Proj/TPS 9.0/5.9/5.8. Wall time, measured on the
2-core CPU of docs/benchmarks.md by the study's 3,000-step runs (batch 64,
docs/results.md): the 2xST-FCN trains at about 2,200 examples/s (about 0.12 s
per batch-256 step, 5 hours for 150k steps), the FCN at 5,400, the CNN at about
50 (its convolutions on 42x42, like distorted MNIST's CNN: about 9 days for
150k steps here); ``tiny`` takes about 30 s.
"""

from __future__ import annotations

import ml_collections

from configs.common import (
    data_config,
    family_choices,
    model_config,
    model_variants,
    parse_model_arg,
    shrink_for_local_run,
    split_tiny,
    training_config,
)

_, MODELS = family_choices("addition")
VARIANTS = model_variants(MODELS)  # every argument but tiny


def get_config(arg: str = "add_2st_fcn,tps") -> ml_collections.ConfigDict:
    arg, tiny = split_tiny(arg)
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) not in (1, 2) or not all(parts):
        raise ValueError(f"config argument must be 'model[,transform][,tiny]' (e.g. 'add_2st_fcn,tps'), got {arg!r}")
    model, transform = parse_model_arg(parts[0], parts[1] if len(parts) == 2 else "", MODELS)
    c = training_config()
    c.model = model_config(model, transform)
    c.data = data_config("addition")  # 42x42x2, RTS per channel, labels 0..18
    return shrink_for_local_run(c) if tiny else c
