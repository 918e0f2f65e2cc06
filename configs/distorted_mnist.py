"""Distorted MNIST (paper Sect. 4.1, Table 1): ``get_config("task,model[,transform][,tiny]")``.

    python -m experiments.train --config configs/distorted_mnist.py:rts,st_cnn,tps --workdir workdirs/rts_st_cnn_tps
    python -m experiments.train --config configs/distorted_mnist.py:tc,cnn --workdir workdirs/tc_cnn \\
        --config.data.source=../shared/data/mnist          # offline: the four MNIST IDX files

* task: ``r`` (rotated), ``rts`` (rotated, translated, scaled; 42x42), ``p``
  (projective), ``e`` (elastic), ``tc`` (translated + cluttered; 60x60);
* model: ``fcn``, ``cnn``, ``st_fcn``, ``st_cnn`` (`stn_jax.paper.models`; about
  400k parameters each, docs/models.md);
* transform (ST models only): ``affine``, ``projective``, ``tps``; omit it (or
  write ``none``) for ``fcn`` and ``cnn``;
* ``tiny`` (last): 60 steps of batch 32 and a 512-digit class-balanced test set, to check a
  set-up end to end (about a minute on a 2-core CPU).

Training is the paper's (A.4 [S]): SGD, batch 256, 150k iterations, learning
rate 0.01 divided by 10 every 50k; momentum 0.9 is our assumption [U]
(configs/common.py). Deviations: none in this file; the data's and the models'
assumptions are listed in docs/data.md and docs/models.md.

Expected result: the paper's Table 1 (test error %; TC from the text):

    model         R    RTS  P    E    | TC
    FCN           2.1  5.2  3.1  3.2  | 13.2
    CNN           1.2  0.8  1.5  1.4  |  3.5
    ST-FCN Aff    1.2  0.8  1.5  2.7  |  2.0 (transform not stated)
    ST-CNN Aff    0.7  0.5  0.8  1.2  |  1.7 (transform not stated)
    ST-CNN TPS    0.7  0.5  0.8  1.1  |

Expected wall time for the full 150k steps of batch 256, measured on the
2-core CPU of docs/benchmarks.md: the RTS ST-CNN step takes 0.11 s (about 4.5
hours per run) but the plain CNN on 42x42 takes 1.1 s (about 2 days), so full
runs want a GPU (docs/results.md estimates 15-30 minutes per run there, not
measured). ``--config.total_steps=N`` shortens any run; our measured results at
500 and 3,000 steps are in docs/results.md.
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

TASKS, MODELS = family_choices("mnist")
VARIANTS = tuple(f"{task},{model}" for task in TASKS for model in model_variants(MODELS))  # every argument but tiny


def parse_arg(arg: str) -> tuple[str, str, str]:
    """``"task,model[,transform]"`` -> ``(task, model, transform or "")``; bad choices raise listing the valid ones."""
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"config argument must be 'task,model,transform[,tiny]' (e.g. 'rts,st_cnn,affine'; "
                         f"'rts,cnn' for models without a transformer), got {arg!r}")
    task, model = parts[0], parts[1]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    model, transform = parse_model_arg(model, parts[2] if len(parts) == 3 else "", MODELS)
    return task, model, transform


def get_config(arg: str = "rts,st_cnn,affine") -> ml_collections.ConfigDict:
    arg, tiny = split_tiny(arg)
    task, model, transform = parse_arg(arg)
    c = training_config()
    c.model = model_config(model, transform)
    c.data = data_config(task)     # every option and its default: docs/data.md
    return shrink_for_local_run(c) if tiny else c
