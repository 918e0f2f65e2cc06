"""Training-step time of the CUB backbones against their PyTorch references, in one process.

    python benchmarks/backbone_step.py                       # both backbones, batch 8, 224 px
    python benchmarks/backbone_step.py --backbones efficientnet_lite0 --batch 16 --rounds 5

A step is forward, cross-entropy on a 30-way classifier, backward and an SGD
(momentum 0.9) update, in training mode (batch statistics), on one fixed random
batch. JAX: `stn_jax.paper.models.backbones.create_backbone` under `nnx.jit`
(random weights). PyTorch: ``efficientnet-lite-pytorch==0.1.0``'s
``EfficientNet.from_name("efficientnet-lite0")`` and ``pretrainedmodels==0.7.4``'s
``BNInception`` (its one file, loaded by path as tests/test_backbones.py does),
``torch.set_num_threads`` = the CPU count. Systems run in interleaved rounds, a
warm-up call before each timed block; medians are reported with the ratio JAX / PyTorch.
The Table 3 rows built from these backbones are timed by benchmarks/model_step.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import time_block  # noqa: E402

from stn_jax.paper.models.backbones import create_backbone  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the JAX rows still run
    torch = None

NUM_CLASSES = 30


def jax_step(name: str, batch: int, size: int):
    model = create_backbone(name, NUM_CLASSES, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x).logits, y).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    return lambda: jax.block_until_ready(step(model, optimizer, x, y))


def torch_reference(name: str):
    """The PyTorch module for ``name`` with a 30-way classifier, or ``None`` where the reference is absent."""
    if torch is None:
        return None
    if name == "efficientnet_lite0":
        if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            return None
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name("efficientnet-lite0", num_classes=NUM_CLASSES)
    spec = importlib.util.find_spec("pretrainedmodels")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "bninception.py"
    file_spec = importlib.util.spec_from_file_location("_pretrainedmodels_bninception", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)  # the package's __init__ imports torchvision: load the one file
    model = module.BNInception(num_classes=NUM_CLASSES)

    def forward(x):  # its own forward average-pools 7x7: the global mean, as ours, at any size
        return model.last_linear(model.features(x).mean((2, 3)))

    model.forward = forward
    return model


def torch_step(module, batch: int, size: int):
    torch.manual_seed(0)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "inception_bn"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)

    systems = {}
    for name in args.backbones:
        systems[(name, "jax")] = jax_step(name, args.batch, args.size)
        reference = torch_reference(name)
        if reference is not None:
            systems[(name, "torch")] = torch_step(reference, args.batch, args.size)
    times = {key: [] for key in systems}
    for _ in range(args.rounds):
        for key, fn in systems.items():
            times[key].append(time_block(fn, args.reps))

    print(f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else "")
          + f"; batch {args.batch}, {args.size} px, median of {args.rounds} rounds x {args.reps}\n")
    print("| backbone | JAX s / step | PyTorch s / step | ratio |\n|---|---:|---:|---:|")
    for name in args.backbones:
        ours = statistics.median(times[(name, "jax")])
        ref = statistics.median(times[(name, "torch")]) if (name, "torch") in times else None
        print(f"| {name} | {ours:.3f} | " + (f"{ref:.3f} | {ours / ref:.2f} |" if ref else "- | - |"))


if __name__ == "__main__":
    main()
