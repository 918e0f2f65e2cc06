"""MNIST addition (paper Appendix A.1, Table 4; digest 2.4): ``get_config("model[,transform][,tiny]")``.

    python -m experiments.train --config configs/mnist_addition.py:add_2st_fcn,tps --workdir workdirs/add_2st_tps

Two independently RTS-distorted digits in the two channels of a 42x42x2 input;
the label is their sum (19 classes).

* model (`stn_jax.models`): ``add_fcn``, ``add_cnn``, ``add_st_fcn`` (one
  transformer), ``add_2st_fcn`` (two transformers in parallel, each seeing and
  warping both channels, outputs concatenated to 4 channels);
* transform (ST models only): ``affine``, ``projective``, ``tps``;
* ``tiny`` (last): 60 steps of batch 32 and a 500-example test set.

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

from configs.common import finish, model_config, split_tiny, training_config
from configs.distorted_mnist import parse_arg
from stn_jax.data import default_config

MODELS = ("add_fcn", "add_cnn", "add_st_fcn", "add_2st_fcn")
ST_MODELS = ("add_st_fcn", "add_2st_fcn")
TRANSFORMS = ("affine", "projective", "tps")


def get_config(arg: str = "add_2st_fcn,tps") -> ml_collections.ConfigDict:
    arg, tiny = split_tiny(arg)
    _, model, transform = parse_arg(f"addition,{arg}", tasks=("addition",), models=MODELS,
                                    st_models=ST_MODELS, transforms=TRANSFORMS)
    c = training_config()
    c.model = model_config(model, transform)
    c.data = default_config("addition")  # 42x42x2, RTS per channel, labels 0..18
    return finish(c, tiny)
