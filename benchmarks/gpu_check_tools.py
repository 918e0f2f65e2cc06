"""Helpers of benchmarks/gpu_check.sh: versions, carried wheels, MNIST data, a table of the training runs.

    python benchmarks/gpu_check_tools.py versions [--require-gpu]
    python benchmarks/gpu_check_tools.py missing
    python benchmarks/gpu_check_tools.py install WHEEL_DIR TARGET_DIR
    python benchmarks/gpu_check_tools.py mnist DIR [--synthetic]
    python benchmarks/gpu_check_tools.py runs RUNS_DIR TSV
    python benchmarks/gpu_check_tools.py on BACKEND PYTHON_ARGS...

* ``versions``: Python, JAX (backend, devices, default matmul precision), PyTorch
  and CUDA, and the training stack; ``--require-gpu`` exits 1 unless JAX's default
  backend is a GPU and PyTorch (when installed) sees CUDA.
* ``missing`` / ``install``: the Python packages that the experiments and the
  tests import (`NEEDED`) and that this interpreter cannot find; ``install`` puts
  them, and only them, into ``TARGET_DIR`` from a folder of wheels (``pip install
  --no-index --no-deps --target``; without pip, by unpacking the wheels), so the
  machine's own jax, torch and numpy are never replaced.
* ``mnist``: checks that ``DIR`` holds the four MNIST IDX files; with
  ``--synthetic`` first writes the test suite's synthetic MNIST there
  (``tests/conftest.py: write_synthetic_mnist``).
* ``runs``: one row per ``RUNS_DIR/<name>/metrics.jsonl``: the last step, the
  training images/s between the first and the last logged training rows, and the
  last test error, written to ``TSV`` and printed.
* ``on``: runs ``python PYTHON_ARGS...`` if JAX's default backend is ``BACKEND``
  (``gpu``, ``cpu``), else exits 1 saying so: JAX can fall back to the CPU
  silently, and tests that pass there say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
# Module imported by the experiments or the sampler tests -> the distribution that provides it.
NEEDED = {
    "ml_collections": "ml_collections", "absl": "absl-py", "yaml": "PyYAML", "tensorboardX": "tensorboardX",
    "google.protobuf": "protobuf", "packaging": "packaging", "tqdm": "tqdm", "PIL": "pillow",
    "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(require_gpu: bool) -> int:
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    import jax

    print(f"jax {jax.__version__}, default backend {jax.default_backend()}, devices {jax.devices()}")
    try:
        precision = jax.config.jax_default_matmul_precision
    except AttributeError:
        precision = "?"
    print(f"jax default matmul precision: {precision} (None: the backend's default)")
    ok = jax.default_backend() == "gpu" or not require_gpu
    try:
        import torch
    except ImportError:
        print("torch: not installed")
    else:
        cuda = torch.cuda.is_available()
        print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {cuda}"
              + (f", {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}" if cuda else ""))
        ok = ok and (cuda or not require_gpu)
    for dist in ("numpy", "scipy", "flax", "optax", "orbax-checkpoint", "h5py", *NEEDED.values()):
        print(f"{dist} {_version(dist)}")
    if not ok:
        print("a GPU was required: JAX's default backend or PyTorch has no GPU")
    return 0 if ok else 1


def missing() -> list[str]:
    """Distributions in `NEEDED` whose module this interpreter cannot find."""
    out = []
    for module, dist in NEEDED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package is absent
            found = False
        if not found:
            out.append(dist)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _fits(wheel: Path) -> bool:
    """Whether a wheel's tags suit this interpreter (used only without pip)."""
    py, abi, plat = wheel.stem.split("-")[-3:]
    if plat == "any":
        return True
    here = sys.version_info[:2]
    built_for = [(int(t[2]), int(t[3:])) for t in py.split(".") if re.fullmatch(r"cp3\d+", t)]
    python_ok = here in built_for or (abi == "abi3" and min(built_for, default=here) <= here)
    return python_ok and platform.machine() in plat


def install(wheels: Path, target: Path) -> int:
    needed = missing()
    if not needed:
        print("every needed module is importable; nothing to install")
        return 0
    print(f"missing: {', '.join(needed)}")
    if not wheels.is_dir():
        print(f"no wheel folder {wheels}: prepare it as benchmarks/gpu_check.sh's header says")
        return 1
    target.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
               "--target", str(target), "--disable-pip-version-check", *needed]
        print(" ".join(cmd), flush=True)
        result = subprocess.run(cmd)
        if result.returncode:
            return result.returncode
    else:
        print("no pip: unpacking the wheels")
        for dist in needed:
            found = [w for w in sorted(wheels.glob("*.whl")) if _norm(w.name.split("-")[0]) == _norm(dist)
                     and _fits(w)]
            if not found:
                print(f"no wheel for {dist} that suits Python {platform.python_version()} on {platform.machine()}")
                return 1
            print(f"unpacking {found[-1].name}")
            zipfile.ZipFile(found[-1]).extractall(target)
    importlib.invalidate_caches()
    sys.path.insert(0, str(target))
    still = missing()
    if still:
        print(f"still missing after the install: {', '.join(still)}")
        return 1
    print(f"installed into {target}: {', '.join(needed)}")
    return 0


def mnist(folder: Path, synthetic: bool) -> int:
    if synthetic:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_synthetic_mnist  # the test suite's synthetic MNIST (600 train, 200 test)

        write_synthetic_mnist(folder)
        print(f"wrote a synthetic MNIST (tests/conftest.py) to {folder}")
    absent = [f for f in MNIST_FILES if not (folder / f).is_file()]
    if absent:
        print(f"{folder} lacks {', '.join(absent)}")
        return 1
    for f in MNIST_FILES:
        print(f"{folder / f}: {(folder / f).stat().st_size} bytes")
    return 0


def runs(folder: Path, tsv: Path) -> int:
    rows = [("run", "last_step", "train_img_per_s", "test_error", "metrics_rows")]
    for metrics in sorted(folder.glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        batch = json.loads((metrics.parent / "config.json").read_text()).get("batch_size", 0) \
            if (metrics.parent / "config.json").is_file() else 0
        train = [r for r in records if "loss" in r]
        speed = "-"
        if len(train) >= 2 and train[-1]["time"] > train[0]["time"] and batch:
            speed = f"{(train[-1]['step'] - train[0]['step']) * batch / (train[-1]['time'] - train[0]['time']):.0f}"
        errors = [(r["step"], v) for r in records for k, v in r.items() if k.startswith("test") and "error" in k]
        error = f"{errors[-1][1]}" if errors else "-"
        last = max((r["step"] for r in records), default=0)
        rows.append((metrics.parent.name, str(last), speed, error, str(len(records))))
    text = "".join("\t".join(r) + "\n" for r in rows)
    tsv.write_text(text)
    print(text, end="")
    return 0


def run_on(backend: str, args: list[str]) -> int:
    env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process only looks; the command gets the memory
    import jax

    found = jax.default_backend()
    print(f"JAX default backend: {found} ({jax.devices()[0].device_kind})", flush=True)
    if found != backend:
        print(f"JAX's default backend is {found}, not {backend}: not running python {' '.join(args)}")
        return 1
    return subprocess.run([sys.executable, *args], env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--require-gpu", action="store_true")
    sub.add_parser("missing")
    p = sub.add_parser("install")
    p.add_argument("wheels", type=Path)
    p.add_argument("target", type=Path)
    p = sub.add_parser("mnist")
    p.add_argument("folder", type=Path)
    p.add_argument("--synthetic", action="store_true")
    p = sub.add_parser("runs")
    p.add_argument("folder", type=Path)
    p.add_argument("tsv", type=Path)
    p = sub.add_parser("on")
    p.add_argument("backend", choices=("gpu", "cpu"))
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "versions":
        return versions(args.require_gpu)
    if args.command == "missing":
        print(" ".join(missing()) or "none")
        return 0
    if args.command == "install":
        return install(args.wheels, args.target)
    if args.command == "mnist":
        return mnist(args.folder, args.synthetic)
    if args.command == "runs":
        return runs(args.folder, args.tsv)
    return run_on(args.backend, args.args)


if __name__ == "__main__":
    sys.exit(main())
