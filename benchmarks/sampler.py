"""Times affine grid + sampling against PyTorch and jax.scipy.ndimage.map_coordinates.

For each shape (batch, input size, output size, channels) and each task

* ``fwd``: output only;
* ``fwd+bwd(theta)``: output and the gradient w.r.t. theta;
* ``fwd+bwd(image,theta)``: output and the gradients w.r.t. image and theta,

it runs every system in interleaved rounds (A, B, C, A, B, C, ...), with one
untimed warm-up call before each timed block, and reports the median time and
the median of the per-round ratios to PyTorch (``affine_grid`` + ``grid_sample``
on the same inputs, same process). Absolute times drift on shared machines;
the ratios are what to quote. It also prints a memory-bandwidth lower bound
per task: the bytes that must cross memory (image, output, cotangent, image
gradient) over this machine's copy bandwidth, measured here.

Systems: ``torch`` (reference; needs ``pip install torch==2.13.0``),
``stn_jax`` (default CPU implementation: native kernel), ``stn_jax[xla]``
(pure-XLA lowering, what GPU/TPU run), ``map_coordinates``
(``jax.scipy.ndimage.map_coordinates`` vmapped over batch and channels).

    python benchmarks/sampler.py                   # all shapes, markdown table
    python benchmarks/sampler.py --cases mnist60 --rounds 3
    python benchmarks/sampler.py --device gpu      # JAX and PyTorch both on the first GPU

``--device``: by default JAX runs on its default backend (the GPU where jaxlib has
one) and PyTorch on the CPU; ``--device gpu`` puts both on the first GPU (PyTorch
through CUDA, synchronised before each time is taken) and measures the bound with
the GPU's own copy bandwidth; ``--device cpu`` puts both on the CPU. On a GPU,
``stn_jax`` and ``stn_jax[xla]`` are the same program (the CPU lowering choice
does not apply there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import stn_jax
from stn_jax import use_cpu_sampler

try:
    import torch
except ImportError:  # the reference is optional; ratios are then omitted
    torch = None


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    size_in: tuple[int, ...]
    size_out: tuple[int, ...]
    channels: int

    @property
    def ndim(self) -> int:
        return len(self.size_in)


CASES = [
    Case("mnist60", 256, (60, 60), (60, 60), 1),
    Case("rgb64", 128, (64, 64), (64, 64), 3),
    Case("cub448", 32, (448, 448), (224, 224), 3),
    Case("vol48", 8, (48, 48, 48), (48, 48, 48), 1),
]
TASKS = ("fwd", "fwd+bwd(theta)", "fwd+bwd(image,theta)")


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((case.batch, *case.size_in, case.channels)).astype(np.float32)
    n = case.ndim
    eye = np.eye(n, n + 1, dtype=np.float32)
    theta = (eye + 0.1 * rng.standard_normal((case.batch, n, n + 1))).astype(np.float32)
    cot = rng.standard_normal((case.batch, *case.size_out, case.channels)).astype(np.float32)
    return image, theta, cot


# ---------------------------------------------------------------- systems


def jax_system(case: Case, sampler, image, theta, cot):
    """Three callables (one per task) for a JAX sampler ``sampler(image, theta) -> out``."""
    image, theta, cot = map(jnp.asarray, (image, theta, cot))

    def vjp(argnums):
        def f(image, theta, cot):
            out, pull = jax.vjp(lambda *a: sampler(*a), image, theta)
            grads = pull(cot)
            return out, tuple(grads[i] for i in argnums)
        return jax.jit(f)

    fwd = jax.jit(sampler)
    bwd_t, bwd_it = vjp((1,)), vjp((0, 1))
    return {
        "fwd": lambda: jax.block_until_ready(fwd(image, theta)),
        "fwd+bwd(theta)": lambda: jax.block_until_ready(bwd_t(image, theta, cot)),
        "fwd+bwd(image,theta)": lambda: jax.block_until_ready(bwd_it(image, theta, cot)),
    }


def stn_sampler(case: Case):
    def f(image, theta):
        return stn_jax.warp(image, theta, case.size_out, "affine" if case.ndim == 2 else "affine3d")
    return f


def map_coordinates_sampler(case: Case):
    """The hand-rolled JAX STN sampler: map_coordinates per example and channel."""
    def one(image, grid):  # image (*S, C), grid (*S_out, n) normalised (x, y[, z])
        pix = [((grid[..., a] + 1) * image.shape[case.ndim - 1 - a] - 1) / 2 for a in range(case.ndim)]
        coords = pix[::-1]  # map_coordinates wants (row, col[, ...]) = (.., y, x)
        per_channel = lambda im: jax.scipy.ndimage.map_coordinates(im, coords, order=1, mode="constant")
        return jax.vmap(per_channel, in_axes=-1, out_axes=-1)(image)

    def f(image, theta):
        grid = (stn_jax.affine_grid if case.ndim == 2 else stn_jax.affine_grid_3d)(theta, case.size_out)
        return jax.vmap(one)(image, grid)
    return f


def torch_system(case: Case, image, theta, cot, device: str = "cpu"):
    torch.set_num_threads(2)
    perm = (0, case.ndim + 1) + tuple(range(1, case.ndim + 1))
    image = torch.tensor(image, device=device).permute(*perm).contiguous()
    theta = torch.tensor(theta, device=device)
    cot = torch.tensor(cot, device=device).permute(*perm).contiguous()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shape = (case.batch, case.channels, *case.size_out)
    F = torch.nn.functional

    def run(image_grad: bool, theta_grad: bool):
        i = image.detach().requires_grad_(image_grad)
        t = theta.detach().requires_grad_(theta_grad)
        with torch.set_grad_enabled(image_grad or theta_grad):
            out = F.grid_sample(i, F.affine_grid(t, shape, align_corners=False), align_corners=False)
            if image_grad or theta_grad:
                out.backward(cot)
        sync()  # CUDA runs asynchronously: wait for the work before the time is taken
        return out

    return {
        "fwd": lambda: run(False, False),
        "fwd+bwd(theta)": lambda: run(False, True),
        "fwd+bwd(image,theta)": lambda: run(True, True),
    }


# ---------------------------------------------------------------- timing


def copy_bandwidth() -> float:
    """Bytes/s of a large in-memory copy (read + write), best of 5."""
    a = np.ones(64 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best


def device_copy_bandwidth() -> float:
    """Bytes/s of a large elementwise copy (read + write) on JAX's default device, best of 10."""
    a = jnp.ones(512 * 2**20 // 4, jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(copy(a))
    best = min(_timed(lambda: jax.block_until_ready(copy(a))) for _ in range(10))
    return 2 * a.nbytes / best


def select_device(name: str | None) -> tuple[str, str]:
    """Applies ``--device``: JAX's default device and PyTorch's device, as ``(jax device, torch device)``."""
    if name is None:  # JAX's default backend, PyTorch on the CPU
        return str(jax.devices()[0]), "cpu"
    device = jax.devices(name)[0]  # raises if JAX has no such backend
    jax.config.update("jax_default_device", device)
    if name == "gpu" and torch is not None and not torch.cuda.is_available():
        raise SystemExit("--device gpu: this PyTorch build sees no CUDA device (torch.cuda.is_available() is False)")
    return str(device), "cuda" if name == "gpu" else "cpu"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lower_bound_bytes(case: Case, task: str) -> int:
    n_in = case.batch * int(np.prod(case.size_in)) * case.channels * 4
    n_out = case.batch * int(np.prod(case.size_out)) * case.channels * 4
    if task == "fwd":
        return n_in + n_out
    if task == "fwd+bwd(theta)":
        return n_in + 2 * n_out  # image, output, cotangent
    return 2 * n_in + 2 * n_out  # + image gradient


def bench_case(case: Case, systems: list[str], rounds: int, reps: int, torch_device: str = "cpu") -> list[dict]:
    image, theta, cot = make_inputs(case)
    impls = {}
    if "torch" in systems and torch is not None:
        impls["torch"] = torch_system(case, image, theta, cot, torch_device)
    if "stn_jax" in systems:
        with use_cpu_sampler("native"):
            impls["stn_jax"] = jax_system(case, stn_sampler(case), image, theta, cot)
            for fn in impls["stn_jax"].values():
                fn()  # trace and compile inside the context
    if "stn_jax[xla]" in systems:
        with use_cpu_sampler("xla"):
            impls["stn_jax[xla]"] = jax_system(case, stn_sampler(case), image, theta, cot)
            for fn in impls["stn_jax[xla]"].values():
                fn()
    if "map_coordinates" in systems:
        impls["map_coordinates"] = jax_system(case, map_coordinates_sampler(case), image, theta, cot)

    rows = []
    for task in TASKS:
        times = {name: [] for name in impls}
        for _ in range(rounds):
            for name, impl in impls.items():
                impl[task]()  # untimed warm-up right before the timed block
                times[name].append(statistics.median(_timed(impl[task]) for _ in range(reps)))
        for name, ts in times.items():
            row = dict(case=case.name, task=task, system=name, median_ms=1e3 * statistics.median(ts))
            if "torch" in times:
                row["ratio"] = statistics.median(t / r for t, r in zip(ts, times["torch"]))
            rows.append(row)
    return rows


def environment(device: str | None = None, torch_device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    gpu = torch.cuda.get_device_name() if torch is not None and torch_device == "cuda" else None
    return dict(cpu=cpu, cores=os.cpu_count(), device=device or str(jax.devices()[0]), jax=jax.__version__,
                jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
                torch=torch.__version__ if torch else None, torch_device=gpu or torch_device,
                numpy=np.__version__, python=platform.python_version())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--systems", nargs="*", default=["torch", "stn_jax", "stn_jax[xla]", "map_coordinates"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per block (median taken)")
    parser.add_argument("--json", help="also write the rows and the environment to this file")
    parser.add_argument("--device", choices=("cpu", "gpu"),
                        help="run JAX and PyTorch both on the CPU or both on the first GPU (default: JAX on its "
                             "default backend, PyTorch on the CPU)")
    args = parser.parse_args()

    jax_device, torch_device = select_device(args.device)
    env = environment(jax_device, torch_device)
    bandwidth = device_copy_bandwidth() if args.device == "gpu" else copy_bandwidth()
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()) + f", copy bandwidth={bandwidth / 1e9:.1f} GB/s")
    if torch is None:
        print("# torch is not installed: no reference, no ratios (pip install torch==2.13.0)")
    print("| shape | task | system | median ms | ratio to torch | bandwidth bound ms |")
    print("|---|---|---|---|---|---|")
    rows = []
    for case in [c for c in CASES if c.name in args.cases]:
        size_in, size_out = "x".join(map(str, case.size_in)), "x".join(map(str, case.size_out))
        shape = f"{case.name}: {case.batch}x{size_in}->{size_out}x{case.channels}"
        for row in bench_case(case, args.systems, args.rounds, args.reps, torch_device):
            bound = 1e3 * lower_bound_bytes(case, row["task"]) / bandwidth
            row["bound_ms"] = bound
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
            print(f"| {shape} | {row['task']} | {row['system']} | {row['median_ms']:.1f} | {ratio} | {bound:.2f} |",
                  flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, copy_bandwidth=bandwidth, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
