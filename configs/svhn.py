"""SVHN multi-digit (paper Sect. 4.2, Table 2): ``get_config("model,size[,synthetic][,tiny]")``.

    python -m experiments.train --config configs/svhn.py:st_multi,64 --workdir workdirs/svhn64_st_multi \\
        --config.data.source=/path/to/svhn        # the format-1 folder: train/ test/ extra/ or their .tar.gz
    python -m experiments.train --config configs/svhn.py:cnn,128 --workdir workdirs/svhn128_cnn \\
        --config.data.source=/path/to/svhn
    python -m experiments.train --config configs/svhn.py:st_single,64,synthetic --workdir workdirs/synth64 \\
        --config.data.source=../shared/data/mnist   # offline stand-in: numbers composed from MNIST digits
    python -m experiments.train --config configs/svhn.py:st_single,64,tiny --workdir workdirs/svhn_tiny \\
        --config.data.source=../shared/data/mnist   # a check of the set-up end to end

* model: ``cnn`` (``svhn_cnn``), ``st_single`` (``svhn_st_single``, affine),
  ``st_multi`` (``svhn_st_multi``, affine) (`stn_jax.paper.models.svhn`);
* size: ``64`` (tight crops) or ``128`` (loose crops) [P];
* ``synthetic``: the data task ``svhn_synth`` (house numbers composed from MNIST
  digits; ``data.source`` an MNIST folder of the four IDX files, default
  ``"tfds"``) instead of ``svhn`` (the real format-1 data; ``data.source`` must
  be set);
* ``tiny`` (last): implies ``synthetic``; width multiplier 0.125, 60 steps of
  batch 32, a 512-number test set (`configs.common.shrink_for_local_run`).
  ``--config.model.options.width_multiplier=0.25`` etc. narrows any run.

Training (A.5 [S] unless tagged): SGD, batch 128, 400k iterations, learning
rate 0.01 multiplied by 0.1 every 80k, weight decay 5e-4, the localisation
networks at 0.1 x the learning rate; dropout 0.5 (in the models). Momentum 0.9
is our assumption [U] (configs/common.py; the paper says SGD). The objective
is ``sequence`` (five softmax classifiers; headline: sequence error).

Expected result, the paper's Table 2 (sequence error %) [P]:

    model            64px  128px
    CNN              4.0   5.6
    ST-CNN Single    3.7   3.9
    ST-CNN Multi     3.6   3.9

With this recipe at width 0.5 and batch 32 on ``cnn,64,synthetic`` the sequence
error falls from the marginal (98 %) to 68 % in 3,000 steps, 0.5 s a step on
the 2-core CPU (docs/models.md, "SVHN: learning with the paper's recipe"; the
models scale their initialisation for the dropout, without which this recipe
kills the network in its first steps).

Expected wall time: full-width models (23-72M parameters, `stn_jax.paper.models.svhn`)
take 6.3-6.5 s per batch-128 step on the 2-core CPU (docs/benchmarks.md): the
paper's 400k steps want an accelerator. The offline study (docs/results.md: all
six cells on ``synthetic`` at width 0.125, 1,200 steps of batch 32, Adam; 4-46
minutes a run on the shared 2-core CPU, 1.8 hours in all; CNN 67.1 % sequence
error at 64 px, every model 96-97 % at 128 px):

    python -m experiments.reproduce svhn --source ../shared/data/mnist --seeds 1 --steps 1200 \
        --batch_size 32 --decays 1 --evals 2 --set model.options.width_multiplier=0.125 \
        model.options.dropout=0.0 optimizer.name=adam optimizer.learning_rate=0.001 --workroot workdirs/svhn_study
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config, model_config, shrink_for_local_run, split_tiny, training_config

MODELS = {"cnn": ("svhn_cnn", ""), "st_single": ("svhn_st_single", "affine"),
          "st_multi": ("svhn_st_multi", "affine")}
SIZES = (64, 128)
TINY_WIDTH = 0.125    # [U] CPU width multiplier of the tiny variant
VARIANTS = tuple(f"{model},{size}{data}" for model in MODELS for size in SIZES for data in ("", ",synthetic"))


def parse_arg(arg: str) -> tuple[str, str, int, bool]:
    """``"model,size[,synthetic]"`` -> ``(model name, transform, size, synthetic)``; bad choices raise."""
    parts = [p.strip() for p in (arg or "").split(",")]
    synthetic = len(parts) == 3 and parts[2] == "synthetic"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not synthetic):
        raise ValueError(f"config argument must be 'model,size[,synthetic][,tiny]' (e.g. 'st_multi,64'), got {arg!r}")
    if parts[0] not in MODELS:
        raise ValueError(f"unknown model {parts[0]!r}; choose one of {', '.join(MODELS)}")
    if parts[1] not in tuple(str(s) for s in SIZES):
        raise ValueError(f"unknown size {parts[1]!r}; choose one of {', '.join(map(str, SIZES))}")
    name, transform = MODELS[parts[0]]
    return name, transform, int(parts[1]), synthetic


def get_config(arg: str = "st_multi,64") -> ml_collections.ConfigDict:
    arg, tiny = split_tiny(arg)
    name, transform, size, synthetic = parse_arg(arg)
    synthetic = synthetic or tiny
    c = training_config()
    c.batch_size = 128                     # A.5 [S]
    c.total_steps = 400_000                # A.5 [S]
    c.eval_every = 10_000
    c.checkpoint_every = 10_000
    c.optimizer.learning_rate = 0.01       # A.5 [S]
    c.optimizer.decay_boundaries = (80_000, 160_000, 240_000, 320_000)  # A.5 [S]: x0.1 every 80k
    c.optimizer.weight_decay = 5e-4        # A.5 [S]
    c.optimizer.loc_lr_multiplier = 0.1    # A.5 [S]: localisation networks at 1/10 of the learning rate
    c.objective = ml_collections.ConfigDict({"name": "sequence", "identity_penalty": 0.0})
    # Set even at its default (1.0) so that --config.model.options.width_multiplier=... can override it.
    c.model = model_config(name, transform, width_multiplier=TINY_WIDTH if tiny else 1.0)
    if synthetic:
        c.data = data_config("svhn_synth", image_size=size, source="tfds")
    else:
        c.data = data_config("svhn", image_size=size, source="")   # set --config.data.source
    if tiny:
        c = shrink_for_local_run(c)
    return c
