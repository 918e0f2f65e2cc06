"""How fine-tuning moves a CUB CNN's pretrained features: the measurements behind its BatchNorm and rate defaults.

    python -m experiments.cub_feature_drift --config configs/cub.py:efficientnet_lite0,cnn224 \\
        --config.data.source=../shared/data/cub_200_2011_sample/CUB_200_2011 --config.data.classes=1-30 \\
        --config.batch_size=8 --config.optimizer.learning_rate=0.01 --steps 40

Prints, for the config as given (override ``model.options.batch_norm``, the rates, the batch size):

1. the BatchNorm gains ``|scale| / sqrt(running variance + eps)`` of the pretrained backbone
   (median, 90th and 99th percentile, maximum): with frozen statistics a weight update's effect on a
   channel is multiplied by its gain, where batch statistics would renormalise it;
2. the cosine between the pooled features the backbone gives to 64 training images (centre crops,
   drop-connect off) with batch statistics on batches of ``batch_size``, with batch statistics on one
   batch of 64, and with its running statistics: what a ``batch_norm=train`` model learns on versus
   what it is tested on, split into the batch's noise (``batch_size`` vs 64) and the data's
   difference from ImageNet (64 vs running);
3. every 5 of ``--steps`` training steps (the run's own train step): the loss, the gradient norm, the
   mean cosine of the backbone's evaluation-mode features of 33 test images to the pretrained ones,
   and the fraction of the features that are constant over those images (dead or saturated ReLU6);
   ``--variance_floor`` first raises the running variances (a test of whether near-dead channels,
   whose gains are the largest, cause what happens).

Nothing is written. About a minute plus 2-3 s a step for EfficientNet-Lite0 on a 2-core CPU.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.cli import run

config_flags.DEFINE_config_file("config", None, "A CUB CNN config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)
flags.DEFINE_integer("steps", 40, "Training steps to follow.")
flags.DEFINE_float("variance_floor", 0.0, "Raise every running variance to at least this before training "
                   "(bounds the gains of near-dead channels; 0: the pretrained statistics as they are).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS
BIG_BATCH = 64  # training images whose features with batch statistics are compared (fewer if there are fewer)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, F)`` arrays."""
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv) -> None:
    del argv
    from flax import nnx

    from stn_jax.paper.config import resolve
    from stn_jax.paper.train import make_train_step
    from stn_jax.paper.train_state import setup

    config = resolve(FLAGS.config)
    if config.model.name != "cub_cnn":
        raise ValueError(f"takes a CUB CNN config (configs/cub.py:<backbone>,cnn224), got {config.model.name!r}")
    s = setup(config)
    ds = s.dataset

    evaluation = s.merge(s.state.params, s.state.model_state, train=False)
    gains = np.concatenate([np.abs(np.asarray(m.scale[...])) / np.sqrt(np.asarray(m.var[...]) + m.epsilon)
                            for _, m in nnx.iter_modules(evaluation) if isinstance(m, nnx.BatchNorm)])
    p50, p90, p99 = np.percentile(gains, [50, 90, 99])
    print(f"BatchNorm gains over {gains.size} channels: median {p50:.2f}, 90% {p90:.2f}, 99% {p99:.2f}, "
          f"max {gains.max():.1f}")

    def features(model, images):
        return np.asarray(nnx.jit(lambda m, x: m.backbone(m.preprocess(x)).features)(model, images))

    big_batch = min(BIG_BATCH, ds.train_size)
    images = ds.train_examples(np.random.default_rng(config.seed).permutation(ds.train_size)[:big_batch])["image"]
    training = s.merge(s.state.params, s.state.model_state, train=True)
    training.set_attributes(nnx.BatchNorm, use_running_average=False)  # batch statistics, whatever the mode
    training.set_attributes(nnx.Dropout, deterministic=True)  # no drop-connect: BatchNorm is the only difference
    small = np.concatenate([features(training, images[k:k + config.batch_size])
                            for k in range(0, big_batch - config.batch_size + 1, config.batch_size)])
    big, running = features(training, images), features(evaluation, images)
    for name, a, b in ((f"batches of {config.batch_size} vs running statistics", small, running[:len(small)]),
                       (f"batches of {config.batch_size} vs one batch of {big_batch}", small, big[:len(small)]),
                       (f"one batch of {big_batch} vs running statistics", big, running)):
        cos = cosine(a, b)
        print(f"features with {name}: cosine mean {cos.mean():.3f}, min {cos.min():.3f}")

    test = ds.test_examples(np.arange(0, ds.test_size, max(ds.test_size // 33, 1))[:33])["image"]
    start = features(evaluation, test)
    state = s.state
    if FLAGS.variance_floor > 0:
        floored = jax.tree_util.tree_map_with_path(
            lambda path, v: jax.numpy.maximum(v, FLAGS.variance_floor) if "var" in jax.tree_util.keystr(path) else v,
            state.model_state)
        state = state.replace(model_state=floored)
        now = features(s.merge(state.params, state.model_state, train=False), test)
        print(f"running variances floored at {FLAGS.variance_floor:g}: cosine to the pretrained features "
              f"{cosine(now, start).mean():.3f}")
    step_fn = jax.jit(make_train_step(s))
    for i in range(FLAGS.steps):
        state, metrics = step_fn(state, ds.train_batch(i))
        if (i + 1) % 5 == 0 or i + 1 == FLAGS.steps:
            now = features(s.merge(state.params, state.model_state, train=False), test)
            print(f"step {i + 1}: loss {float(metrics['loss']):.3f}, gradient norm {float(metrics['grad_norm']):.1f}, "
                  f"cosine to the pretrained features {cosine(now, start).mean():.3f}, constant features "
                  f"{np.mean(now.std(0) < 1e-6):.3f}", flush=True)


if __name__ == "__main__":
    run(main)
