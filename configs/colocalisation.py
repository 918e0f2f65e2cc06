"""Co-localisation without labels (paper Appendix A.2): ``get_config("t|tc[,class][,tiny]")``.

    python -m experiments.train --config configs/colocalisation.py:t --workdir workdirs/coloc_t8 \\
        --config.data.source=../shared/data/mnist --config.data.digit_class=8
    python -m experiments.evaluate --config configs/colocalisation.py:t --workdir workdirs/coloc_t8 \\
        --config.data.source=../shared/data/mnist --config.data.digit_class=8
    # -> localised=<fraction> mean_iou=<float>

* ``t``: a 28x28 digit at a uniform random place in an 84x84 image; ``tc``: plus
  sixteen 6x6 crops of training digits [P];
* ``class`` (optional, 0-9): the digit class, the same as ``--config.data.digit_class``
  (default 8, the class of the paper's Fig. 4);
* ``tiny`` (last): a few steps on a small set, to check the set-up end to end.

A run: 100 fixed images of one class (data task ``coloc_set``, the transductive set-up
of the paper: training and the metric use the same images), the ``coloc_st`` model
(attention ST -> 28x28 crop -> frozen distorted-MNIST CNN -> descriptor) and the
``triplet`` objective (hinge over image pairs, margin 1, no labels). The encoder is
``--config.model.options.encoder=<workdir of a configs/distorted_mnist.py:r,cnn run>``,
or empty (default): a CNN trained on R for 600 steps of batch 64 on first use and cached
(``<data.cache_dir or $STN_JAX_CACHE or ~/.cache/stn_jax>/coloc_encoder_<hash>``; 7.5 minutes
on the shared 2-core CPU, 7.8% test error; said in the log). docs/coloc.md: method,
assumptions, measurements.

Training [U] (the paper gives none of it): SGD momentum 0.9, lr 0.05, no decay; each step
all 100 images in a random order; 300 steps. Descriptors are L2-normalised and the random
patch has a scale U[0.25, 0.5] [U]; the localisation network's FC layers have 128 units
(the paper's "about 100k parameters"; its listed FC 8 is ``localisation.fc=(8, 8)``). The
metric is the fraction of the 100 images whose predicted box (the crop: centre (t_x, t_y),
half side s) has IoU > 0.5 with the digit's 28x28 frame.

Paper result: T 100% for every class; TC 75-93% depending on the class (per-class
table not available); class 8 localised by SGD step 180 (Fig. 4).
Measured (docs/coloc.md: every class x {T, TC} x 3 seeds, 300 steps, 35-60 s a run on the
2-core CPU once the encoder exists): **no image localised in any of the 60 runs**. On T, 6 runs
centre every crop on its digit but grow it past the image (s = 1.14-1.17), 24 collapse onto
empty corners (s = 0.1); on TC every run ends with the largest crop (s = 1.2) in a corner.
The paper's result is not reproduced.
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config, model_config, training_config

VARIANTS = {"t": 0, "tc": 16}  # number of clutter crops [P]


def parse_arg(arg: str) -> tuple[str, int, bool]:
    """``"t"``, ``"tc,3"``, ``"t,tiny"`` -> ``(variant, digit_class, tiny)``; bad choices raise listing the choices."""
    parts = [p.strip() for p in (arg or "t").split(",") if p.strip()]
    tiny = bool(parts) and parts[-1] == "tiny"
    if tiny:
        parts = parts[:-1]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"config argument must be 't|tc[,class][,tiny]' (e.g. 'tc,3'), got {arg!r}")
    variant = parts[0]
    if variant not in VARIANTS:
        raise ValueError(f"unknown co-localisation variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    digit = 8
    if len(parts) == 2:
        if not parts[1].isdigit() or not 0 <= int(parts[1]) <= 9:
            raise ValueError(f"the digit class must be 0-9, got {parts[1]!r}")
        digit = int(parts[1])
    return variant, digit, tiny


def get_config(arg: str = "t") -> ml_collections.ConfigDict:
    variant, digit, tiny = parse_arg(arg)
    c = training_config()
    c.batch_size = 100                # [U] every step sees the 100 images (a new random order and random patches)
    c.eval_batch_size = 100           # the whole set in one batch
    c.total_steps = 300               # [U] the paper's Fig. 4 shows localisation by step 180
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    c.optimizer.learning_rate = 0.05  # [U] (0.01 learns no image-dependent translation in 300 steps)
    c.optimizer.decay_boundaries = ()  # [U] no decay
    # [P] margin 1; [U] random patches of scale U[0.25, 0.5] inside the image; descriptors L2-normalised
    # (without it the empty crop is the loss's minimum; docs/coloc.md has the measurements).
    c.objective = ml_collections.ConfigDict({"name": "triplet", "alpha": 1.0, "patch_scale": "range",
                                             "patch_min_scale": 0.25, "patch_max_scale": 0.5, "normalize": True})
    # [P] one class, 100 images, T (no clutter) or TC (16 crops of 6x6).
    c.data = data_config("coloc_set", num_clutter=VARIANTS[variant], digit_class=digit, test_size=100)
    c.data.source = ml_collections.FieldReference("tfds")
    c.data.cache_dir = ml_collections.FieldReference("")
    c.model = model_config("coloc_st", "attention")
    # The automatic encoder reads the same MNIST and caches next to the data (overrides of data.* follow).
    c.model.options.encoder = ""
    c.model.options.encoder_source = c.data.get_ref("source")
    c.model.options.encoder_cache = c.data.get_ref("cache_dir")
    # The localisation network: the paper's layers with FC widths 128 [U] (100,627 parameters, the paper's
    # "about 100k"; its listed FC 8 gives 5,947 and learns no image-dependent crop here), and its start.
    c.model.options.localisation = ml_collections.ConfigDict(
        {"channels": 8, "kernel_size": 9, "stride": 4, "pool": 2, "fc": (128, 128)})
    c.model.options.init_scale = 0.5      # [U] centred crop of half the image side
    c.model.options.bound = ml_collections.ConfigDict({"scale": (0.1, 1.2), "translation": 0.67})  # [U]
    if tiny:
        c.total_steps = 20
        c.log_every = 5
        c.eval_every = 10
        c.checkpoint_every = 10
        c.data.test_size = 16
        c.batch_size = 16
        c.eval_batch_size = 16
        c.model.options.encoder_steps = 50
    return c
