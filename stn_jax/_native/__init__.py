"""Optional native CPU kernels: the interpolation primitives and convolution patches.

``sampler.cc`` and ``patches.cc`` are compiled on first use with the system C++
compiler against the XLA FFI headers shipped with jaxlib, into one library
cached under ``$STN_JAX_CACHE`` (default ``~/.cache/stn_jax``) keyed by the
sources, jaxlib version and CPU, and registered as XLA custom calls. They speed
up float32 sampling on CPU (XLA:CPU re-fuses index arithmetic into every gather
and scatter, see docs/benchmarks.md) and the patch extraction of
`stn_jax.conv`; GPU and TPU use the XLA lowerings.

If there is no compiler, the build fails, or (for the sampler)
``STN_JAX_CPU_SAMPLER=xla`` is set, the pure-XLA lowerings are used instead,
with identical semantics (a warning says why, once).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

_log = logging.getLogger(__name__)
_SOURCES = tuple(Path(__file__).with_name(n) for n in ("sampler.cc", "patches.cc"))
_HEADERS = (Path(__file__).with_name("parallel.h"),)
_TARGETS = {"interp": "StnInterpF32", "spread": "StnSpreadF32",
            "patches": "StnPatchesF32", "unpatches": "StnUnpatchesF32"}
CPU_SAMPLERS = ("native", "xla")
# GCC's auto-vectoriser turns the tiny per-corner loops into slow shuffles (1.5x slower);
# the per-axis factor loops are vectorised explicitly (`#pragma omp simd`).
_FLAGS = ("-O3", "-march=native", "-fno-tree-vectorize", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict[str, object] = {}
_override = threading.local()


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    source = b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + jax.__version__.encode()
                         + _cpu_fingerprint().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("STN_JAX_CACHE", Path.home() / ".cache" / "stn_jax"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"stn_native_{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders agree on the file
    return target


def _load() -> bool:
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build()))
                for name, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(f"stn_{name}_f32", jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any failure means: use the XLA lowering
                _log.warning("stn_jax: native CPU kernels unavailable, using the XLA lowerings (%s)", e)
                _state["ok"] = False
        return bool(_state["ok"])


def cpu_sampler() -> str:
    """The CPU implementation new traces will use: ``"native"`` or ``"xla"``."""
    choice = getattr(_override, "value", None) or os.environ.get("STN_JAX_CPU_SAMPLER", "native")
    if choice not in CPU_SAMPLERS:
        raise ValueError(f"STN_JAX_CPU_SAMPLER must be one of {CPU_SAMPLERS}, got {choice!r}")
    return choice


@contextlib.contextmanager
def use_cpu_sampler(choice: str):
    """Within the block, newly traced samplers use ``choice`` on CPU (``"native"`` or ``"xla"``).

    Functions already compiled keep the implementation they were traced with.
    """
    if choice not in CPU_SAMPLERS:
        raise ValueError(f"cpu sampler must be one of {CPU_SAMPLERS}, got {choice!r}")
    previous = getattr(_override, "value", None)
    _override.value = choice
    try:
        yield
    finally:
        _override.value = previous


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on first call)."""
    return _load()
