"""Images/s of the CNN and ST-CNN training steps (RTS, 42x42x1, batch 256) against the same models in PyTorch.

    python benchmarks/train_step.py                    # markdown table
    python benchmarks/train_step.py --batch 256 --rounds 5 --json out.json
    python benchmarks/train_step.py --device gpu       # JAX and PyTorch both on the first GPU

JAX: the trainer's own step (`stn_jax.paper.train.make_train_step`: forward, loss,
backward, SGD-momentum update, metrics) built from
``configs/distorted_mnist.py:rts,<model>[,affine]``, on random inputs (the
input pipeline is measured by benchmarks/input_pipeline.py). PyTorch: the same
architectures (widths read from our models, ceil-mode max-pools,
``affine_grid`` + ``grid_sample`` with ``align_corners=False``), the same
optimiser (SGD, momentum 0.9), ``torch.set_num_threads`` = the CPU count.
By default JAX runs on its default backend (the GPU where jaxlib has one) and
PyTorch on the CPU; ``--device gpu`` puts both on the first GPU (PyTorch through
CUDA with ``cudnn.benchmark``, synchronised before each time is taken),
``--device cpu`` both on the CPU.

Rows: ``cnn`` (the paper's CNN on 42x42), ``st_cnn`` (affine ST-CNN: the
transformer, a 2x2 average pool, then a CNN on 21x21), and ``classifier``
(that 21x21 CNN alone, fed pre-pooled inputs): the transformer's overhead is
``st_cnn / classifier - 1``. Systems run in interleaved rounds with a warm-up
call before each timed block; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import time_block  # noqa: E402

from configs import distorted_mnist  # noqa: E402
from stn_jax.paper import train  # noqa: E402
from stn_jax.paper.config import resolve  # noqa: E402
from stn_jax.paper.train_state import build  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the reference is optional
    torch = None


def jax_step(arg: str, input_shape, batch: int, width: int | None = None):
    c = distorted_mnist.get_config(arg)
    if width:
        c.model.options.width = width
    s = build(resolve(c), input_shape, 10)
    model = nnx.merge(s.graphdef_eval, s.state.params["loc"], s.state.params["main"], s.rng_state,
                      s.state.model_state)
    step = jax.jit(train.make_train_step(s), donate_argnums=0)
    state = s.state
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.random((batch, *input_shape), np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))}
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

    return run, model


class TorchCNN(torch.nn.Module if torch else object):
    def __init__(self, width: int, input_hw: int, channels: int = 1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, width, 9)
        self.conv2 = torch.nn.Conv2d(width, width, 7)
        n = input_hw - 8
        n = -(-n // 2) - 6
        n = -(-n // 2)
        self.fc = torch.nn.Linear(width * n * n, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, ceil_mode=True)
        return self.fc(x.flatten(1))


class TorchSTCNN(torch.nn.Module if torch else object):
    def __init__(self, width: int, input_hw: int):
        super().__init__()
        self.loc1 = torch.nn.Conv2d(1, 20, 5)
        self.loc2 = torch.nn.Conv2d(20, 20, 5)
        n = (input_hw // 2 - 4) // 2 - 4
        self.loc_fc = torch.nn.Linear(20 * n * n, 20)
        self.loc_out = torch.nn.Linear(20, 6)
        torch.nn.init.zeros_(self.loc_out.weight)
        self.loc_out.bias.data = torch.tensor([1.0, 0, 0, 0, 1, 0])
        self.classifier = TorchCNN(width, input_hw // 2)

    def forward(self, x):
        h = F.max_pool2d(x, 2)
        h = F.max_pool2d(F.relu(self.loc1(h)), 2)
        h = F.relu(self.loc2(h))
        theta = self.loc_out(F.relu(self.loc_fc(h.flatten(1)))).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.classifier(F.avg_pool2d(x, 2))


def torch_step(module, input_shape, batch: int, device: str = "cpu"):
    torch.manual_seed(0)
    module = module.to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, input_shape[2], input_shape[0], input_shape[1]).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        sync()  # CUDA runs asynchronously: wait for the step before the time is taken

    return run


def select_device(name: str | None) -> tuple[str, str]:
    """Applies ``--device``: JAX's default device and PyTorch's device, as ``(jax device, torch device)``."""
    if name is None:  # JAX's default backend, PyTorch on the CPU
        return str(jax.devices()[0]), "cpu"
    device = jax.devices(name)[0]  # raises if JAX has no such backend
    jax.config.update("jax_default_device", device)
    if name == "gpu" and torch is not None:
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu: this PyTorch build sees no CUDA device "
                             "(torch.cuda.is_available() is False)")
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its convolution algorithms, as XLA autotunes its own
    return str(device), "cuda" if name == "gpu" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--device", choices=("cpu", "gpu"),
                        help="run JAX and PyTorch both on the CPU or both on the first GPU (default: JAX on its "
                             "default backend, PyTorch on the CPU)")
    args = parser.parse_args()
    shape = (42, 42, 1)
    jax_device, torch_device = select_device(args.device)

    cnn_run, cnn = jax_step("rts,cnn", shape, args.batch)
    st_run, st = jax_step("rts,st_cnn,affine", shape, args.batch)
    st_width = st.width
    cls_run, _ = jax_step("rts,cnn", (21, 21, 1), args.batch, width=st_width)
    systems = {("cnn", "jax"): cnn_run, ("st_cnn", "jax"): st_run, ("classifier", "jax"): cls_run}
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
        systems[("cnn", "torch")] = torch_step(TorchCNN(cnn.width, 42), shape, args.batch, torch_device)
        systems[("st_cnn", "torch")] = torch_step(TorchSTCNN(st_width, 42), shape, args.batch, torch_device)
        systems[("classifier", "torch")] = torch_step(TorchCNN(st_width, 21), (21, 21, 1), args.batch, torch_device)

    times = {k: [] for k in systems}
    for _ in range(args.rounds):
        for key, fn in systems.items():
            times[key].append(time_block(fn, args.reps))
    med = {k: statistics.median(v) for k, v in times.items()}

    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
           + (f", torch {torch.__version__}" if torch else ", torch not installed")
           + f"; JAX on {jax_device}, PyTorch on "
           + (torch.cuda.get_device_name() if torch is not None and torch_device == "cuda" else torch_device))
    print(f"batch {args.batch}, RTS 42x42x1; {env}\n")
    print("| step | JAX ms | JAX img/s | PyTorch ms | PyTorch img/s | JAX / PyTorch time |")
    print("|---|---|---|---|---|---|")
    rows = []
    for model in ("cnn", "st_cnn", "classifier"):
        j = med[(model, "jax")]
        t = med.get((model, "torch"))
        rows.append(dict(model=model, jax_s=j, torch_s=t))
        tcols = f"{1e3 * t:.1f} | {args.batch / t:.0f} | {j / t:.2f}" if t else "- | - | -"
        print(f"| {model} | {1e3 * j:.1f} | {args.batch / j:.0f} | {tcols} |")
    overhead = {s: med[("st_cnn", s)] / med[("classifier", s)] - 1 for s in ("jax", "torch") if ("st_cnn", s) in med}
    st_over_cnn = {s: med[("st_cnn", s)] / med[("cnn", s)] for s in ("jax", "torch") if ("st_cnn", s) in med}
    print("\ntransformer overhead (st_cnn / classifier - 1): "
          + ", ".join(f"{s} {100 * v:+.1f}%" for s, v in overhead.items()))
    print("st_cnn / cnn step time: " + ", ".join(f"{s} {v:.2f}" for s, v in st_over_cnn.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, batch=args.batch, rows=rows, overhead=overhead,
                                                   st_over_cnn=st_over_cnn, times=[[*k, v] for k, v in times.items()]),
                                              indent=2))


if __name__ == "__main__":
    main()
