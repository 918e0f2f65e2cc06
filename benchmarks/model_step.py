"""Training-step time of experiment configs, measured in one process: the cost of a transformer over its base model.

    python benchmarks/model_step.py --configs "svhn.py:cnn,64" "svhn.py:st_multi,64" --batch 128
    python benchmarks/model_step.py --configs "cub.py:efficientnet_lite0,cnn224" \\
        "cub.py:efficientnet_lite0,st2_448" --batch 8 --set model.options.pretrained=

Each config (``configs/<file>:<args>``, resolved as a run would be) is built with the
trainer's own set-up and step (`stn_jax.paper.train_state.build`,
`stn_jax.paper.train.make_train_step`: forward, loss, backward, SGD update) and fed
one fixed random batch of the config's input shape and label format (the input pipeline is
measured separately). Systems run in interleaved rounds after a warm-up (compile) call;
the table gives the median seconds per step and each config's ratio to the first.
Paper claims checked with it (docs/benchmarks.md): ST-CNN Multi is 6 % slower than the
CNN on SVHN (paper Sect. 4.2); a 448 px input with 224 px crops costs each part network
what the 224 px baseline does (paper Sect. 4.3).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stn_jax.paper import train  # noqa: E402
from stn_jax.paper.config import resolve  # noqa: E402
from stn_jax.paper.data import TASKS, cub, svhn  # noqa: E402
from stn_jax.paper.train_state import build  # noqa: E402


def load_config(spec: str, overrides: list[str]):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_bench_config", ROOT / "configs" / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def example_batch(dataset_spec: dict, batch: int, num_classes: int, rng: np.random.Generator) -> dict:
    """A random batch shaped like the data set's (float images in [0, 1], labels in range)."""
    out = {}
    for key, spec in dataset_spec.items():
        shape = (batch,) + tuple(spec.shape)
        if np.issubdtype(spec.dtype, np.integer):
            out[key] = rng.integers(0, num_classes, shape).astype(spec.dtype)
        else:
            out[key] = rng.random(shape, np.float32)
    return out


def step_fn(spec: str, batch: int, overrides: list[str]):
    config = load_config(spec, overrides)
    config.batch_size = batch
    config = resolve(config)
    # The data set's shapes without reading any data, from the task's options and the modules' constants.
    task = TASKS.get(config.data.task)
    size = config.data.get("image_size")
    if task.family in ("svhn", "cub"):
        shape = (size, size, 3)
        num_classes = svhn.NUM_CLASSES if task.family == "svhn" else cub.NUM_CLASSES_ALL
        element = {"image": jax.ShapeDtypeStruct(shape, np.float32),
                   "label": jax.ShapeDtypeStruct((svhn.MAX_DIGITS,) if task.family == "svhn" else (), np.int32)}
    else:
        from stn_jax.paper.data.mnist_tasks import MNIST_TASKS

        mt = MNIST_TASKS[config.data.task]
        shape, num_classes = mt.image_shape(dict(config.data)), mt.num_classes
        element = {"image": jax.ShapeDtypeStruct(shape, np.float32), "label": jax.ShapeDtypeStruct((), np.int32)}
    s = build(config, shape, num_classes)
    step = jax.jit(train.make_train_step(s), donate_argnums=0)
    data = jax.device_put(example_batch(element, batch, num_classes, np.random.default_rng(0)))
    holder = {"state": s.state}

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="configs/<file>:<args>, the first is the base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every config, key=value")
    args = parser.parse_args()
    runs = {}
    for spec in args.configs:
        start = time.perf_counter()
        runs[spec] = step_fn(spec, args.batch, args.set)
        runs[spec]()  # compile and warm up
        print(f"# {spec}: built and compiled in {time.perf_counter() - start:.1f} s", flush=True)
    times = {spec: [] for spec in runs}
    for _ in range(args.rounds):
        for spec, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.reps):
                run()
            times[spec].append((time.perf_counter() - start) / args.reps)
    base = statistics.median(times[args.configs[0]])
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"\n{platform.machine()} {platform.processor() or ''}, {device}, "
          f"jax {jax.__version__}, batch {args.batch}, {args.rounds} rounds x {args.reps} steps, medians\n")
    print("| config | s / step | ratio to the first |")
    print("|---|---:|---:|")
    for spec, ts in times.items():
        m = statistics.median(ts)
        print(f"| `{spec}` | {m:.3f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
