"""Throughput of the MNIST-family input pipeline, alone and next to a training step (docs/data.md).

For each task it reports, at the given batch size:

* ``pipeline``: examples/s of ``dataset.train_batch(step)`` called for
  consecutive steps (as the trainer does: the next batch is prefetched),
  NumPy arrays out;
* ``train step``: examples/s of the jitted training step alone (forward,
  backward, SGD update) of the task's reference model on a fixed batch —
  ST-CNN (affine) for R/RTS/P/E/TC, 2xST-FCN (affine) for addition, the 3-D
  ST model for 3-D MNIST; none for co-localisation (its loss is not
  classification) — via `stn_jax.paper.models` and `stn_jax.paper.train`; "n/a" when
  those modules are missing or fail (the reason is printed);
* ``loop``: examples/s of the two together, ``train_batch`` then the step,
  the training loop's steady state on this machine.

On a CPU the pipeline and the step share the cores, so ``loop`` is what a run
sees; the pipeline's cost is the difference. The first call of each (JAX
compilation) is excluded; times are means over ``--steps`` steps after
``--warmup``.

    python benchmarks/input_pipeline.py --source ../shared/data/mnist
    python benchmarks/input_pipeline.py --source ../shared/data/mnist --tasks rts,tc --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stn_jax.paper.data import TASKS, make_dataset  # noqa: E402

# The reference model whose training step the pipeline must keep up with, per task.
TRAIN_MODELS = {
    "r": ("st_cnn", "affine"), "rts": ("st_cnn", "affine"), "p": ("st_cnn", "affine"), "e": ("st_cnn", "affine"),
    "tc": ("st_cnn", "affine"), "addition": ("add_2st_fcn", "affine"), "mnist3d": ("st3d", "affine3d"),
}


def pipeline_rate(dataset, steps: int, warmup: int) -> tuple[float, float]:
    """(examples/s, seconds for the first batch incl. compilation) of consecutive train_batch calls."""
    start = time.perf_counter()
    dataset.train_batch(0)
    first = time.perf_counter() - start
    for s in range(1, warmup + 1):
        dataset.train_batch(s)
    start = time.perf_counter()
    for s in range(warmup + 1, warmup + 1 + steps):
        dataset.train_batch(s)
    elapsed = time.perf_counter() - start
    return steps * dataset.local_batch_size / elapsed, first


def _training_config():
    spec = importlib.util.spec_from_file_location("_common_config", ROOT / "configs" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.training_config()


def make_train_step(task: str, dataset):
    """``(step_fn, state)`` for the task's reference model, or raises (ImportError, ...) if unavailable.

    This is the place that depends on the model and trainer modules
    (`stn_jax.paper.models`, `stn_jax.paper.train`).
    """
    from stn_jax.paper import train as trainer
    from stn_jax.paper.config import resolve
    from stn_jax.paper.train_state import build

    name, transform = TRAIN_MODELS[task]
    config = _training_config()
    config.model.name, config.model.transform = name, transform
    config.data.task = task
    s = build(resolve(config), dataset.image_shape, dataset.num_classes, dataset)
    return jax.jit(trainer.make_train_step(s), donate_argnums=0), s.state


def train_rates(task: str, dataset, steps: int, warmup: int) -> tuple[float, float]:
    """(train step alone, pipeline + train step) in examples/s."""
    step, state = make_train_step(task, dataset)
    fixed = {k: jnp.asarray(v) for k, v in dataset.train_batch(0).items() if k in ("image", "label")}
    for _ in range(warmup + 1):
        state, metrics = step(state, fixed)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, fixed)
    jax.block_until_ready(metrics)
    alone = steps * dataset.local_batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    for s in range(steps):
        batch = dataset.train_batch(1000 + s)
        state, metrics = step(state, {"image": batch["image"], "label": batch["label"]})
    jax.block_until_ready(metrics)
    loop = steps * dataset.local_batch_size / (time.perf_counter() - start)
    return alone, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                        help="'tfds' or a folder of the four MNIST IDX files (default: ../shared/data/mnist)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-train-step", action="store_true", help="measure the pipeline only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# input pipeline, batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}), load average {load[0]:.1f} at start")
    print()
    print("| task | image | first batch (s) | pipeline (ex/s) | train step (ex/s) | loop (ex/s) | model |")
    print("|---|---|---:|---:|---:|---:|---|")
    results = []
    for task in args.tasks.split(","):
        dataset = make_dataset({"task": task, "source": args.source}, seed=0, global_batch_size=args.batch_size)
        rate, first = pipeline_rate(dataset, args.steps, args.warmup)
        row = {"task": task, "image_shape": list(dataset.image_shape), "first_batch_s": first, "pipeline": rate,
               "train_step": None, "loop": None, "model": None}
        if task in TRAIN_MODELS and not args.no_train_step:
            row["model"] = "/".join(TRAIN_MODELS[task])
            try:
                row["train_step"], row["loop"] = train_rates(task, dataset, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001 - report and go on: the models may not exist yet
                row["model"] += f" (n/a: {type(e).__name__}: {e})"
        results.append(row)
        fmt = lambda v: f"{v:,.0f}" if v else "n/a"
        print(f"| {task} | {'x'.join(map(str, dataset.image_shape))} | {first:.1f} | {fmt(rate)} | "
              f"{fmt(row['train_step'])} | {fmt(row['loop'])} | {row['model'] or '-'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "steps": args.steps,
                                               "load_average": load, "results": results}, indent=1))


if __name__ == "__main__":
    main()
