"""Fits a linear probe on a CUB config's frozen pretrained backbone and prints ``test_error=... test_loss=...``.

    python -m experiments.linear_probe --config configs/cub.py:efficientnet_lite0,cnn224 --workdir workdirs/probe \\
        --config.data.source=../shared/data/cub_200_2011_sample/CUB_200_2011 --config.data.classes=1-30

The anchor for fine-tuning (`stn_jax.paper.probe`): eval-mode features of the
centre crops, softmax regression with its L2 penalty chosen by 5-fold
cross-validation on the training set. The workdir receives ``config.json``,
``features.npz`` (reused when the command is run again), ``metrics.jsonl``
(the chosen penalty, the cross-validated accuracies and the test result) and
``head.npz``, the fitted classifier on the raw features, from which a CUB model
can start (``--config.model.options.head_init=<workdir>/head.npz``). About
two minutes for CUB classes 1-30 with EfficientNet-Lite0 on a 2-core CPU. The
training keys of the config (steps, optimiser) are not used, except by:

``--recipe_steps 452,904`` also trains the recipe's own classifier alone on the
frozen features (`stn_jax.paper.probe.recipe_classifier`: dropout, the config's
optimiser and ``batch_size``), for each budget, from a random classifier and
from the probe's, ``--recipe_seeds`` seeds each, with ``--recipe_decays``
rate drops spread evenly over the budget (as ``experiments.reproduce
--decays``); each result is a line of ``metrics.jsonl`` with
``"recipe_classifier"`` set. A second anchor: what fine-tuning would reach if
the backbone did not move (seconds per budget).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.cli import run

config_flags.DEFINE_config_file("config", None, "A CUB CNN config file (path.py[:args]).", lock_config=False,
                                accept_new_attributes=True)
flags.DEFINE_string("workdir", None, "Directory for the features and the result.")
flags.DEFINE_list("recipe_steps", [], "Budgets (steps) at which to train the recipe's classifier alone.")
flags.DEFINE_integer("recipe_decays", 1, "Rate drops spread evenly over each recipe budget.")
flags.DEFINE_integer("recipe_seeds", 3, "Seeds per recipe budget and start.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from stn_jax.paper import probe
    from stn_jax.paper.config import resolve
    from stn_jax.paper.train_state import setup
    from stn_jax.paper.workdir import prepare_workdir, versions

    config = resolve(FLAGS.config)
    if config.model.name != "cub_cnn":
        raise ValueError(f"the linear probe takes a CUB CNN config (configs/cub.py:<backbone>,cnn224), got model "
                         f"{config.model.name!r}")
    workdir = prepare_workdir(FLAGS.workdir)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    (workdir / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    s = setup(config, cache_dir=str(workdir / "data"))
    ds = s.dataset
    cached = workdir / "features.npz"
    start = time.time()
    if cached.exists():
        with np.load(cached) as f:
            train_x, test_x = f["train"], f["test"]
    else:
        batch = config.eval_batch_size
        train_x = probe.backbone_features(s, lambda i: ds.train_examples(i)["image"], ds.train_size, batch)
        test_x = probe.backbone_features(s, lambda i: ds.test_examples(i)["image"], ds.test_size, batch)
        np.savez(cached, train=train_x, test=test_x)
    train_y = ds.train_labels()
    test_y = ds.test_examples(np.arange(ds.test_size))["label"] if ds.test_size else np.zeros(0, np.int32)
    l2, scores = probe.choose_l2(train_x, train_y, ds.num_classes, seed=config.seed)
    fitted = probe.fit(train_x, train_y, ds.num_classes, l2)
    fitted.save_head(workdir / "head.npz", ds.class_ids)
    result = fitted.evaluate(test_x, test_y)
    records = [{"step": 0, "l2": l2, "cv_accuracy": {str(k): v for k, v in scores.items()},
                "test_error": result["error"], "test_loss": result["loss"], "seconds": round(time.time() - start, 1)}]
    print(f"test_error={result['error']:.4f} test_loss={result['loss']:.4f}")
    for steps in map(int, FLAGS.recipe_steps):
        every = max(steps // (FLAGS.recipe_decays + 1), 1)
        optimizer = config.optimizer.copy_and_resolve_references()
        optimizer.decay_boundaries = tuple(every * k for k in range(1, FLAGS.recipe_decays + 1))
        for name, head in (("random", None), ("probe", fitted.raw_head())):
            errors = []
            for seed in range(FLAGS.recipe_seeds):
                kernel, bias = probe.recipe_classifier(train_x, train_y, ds.num_classes, optimizer, steps=steps,
                                                       batch_size=config.batch_size, seed=seed, start=head,
                                                       dropout=config.model.options.dropout)
                errors.append(probe.head_error(kernel, bias, test_x, test_y))
                records.append({"step": steps, "recipe_classifier": True, "start": name, "seed": seed,
                                "batch_size": config.batch_size, "decay_boundaries": optimizer.decay_boundaries,
                                "learning_rate": optimizer.learning_rate, "test_error": errors[-1]})
            print(f"recipe classifier alone, {steps} steps of {config.batch_size}, from {name}: test accuracy "
                  f"{', '.join(f'{100 * (1 - e):.2f}' for e in errors)} % (mean {100 * (1 - np.mean(errors)):.2f})")
    with open(Path(workdir) / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    run(main)
