"""The memory an array may take: results that cannot be allocated are refused before anything is dispatched.

XLA finds out that an output does not fit only after dispatching (on CPU, dozens of "Error dispatching
computation" lines), and NumPy arrays built on the host may take the machine down instead of failing. The
sampler's entry points and the thin-plate spline's host-side matrix check their sizes against
`memory_limit` first and fail in one ``ValueError`` line naming the size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import numpy as np


@functools.cache
def memory_limit(platform: str) -> int | None:
    """The most bytes arrays on ``platform`` can occupy in all: the machine's physical memory (swap not
    counted) for ``"cpu"``, the sum of the devices' allocator limits (``memory_stats()["bytes_limit"]``)
    otherwise; None where the platform does not say."""
    if platform == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.devices(platform)]
    return sum(limits) if limits and all(limits) else None


def nbytes(shape: Sequence[int], dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype``."""
    return math.prod(shape) * np.dtype(dtype).itemsize


def platform_of(x: jax.Array) -> str:
    """The platform that computes with ``x``: its device's, or while tracing (`jax.jit`) the default backend."""
    return jax.default_backend() if isinstance(x, jax.core.Tracer) else next(iter(x.devices())).platform


def check_memory(name: str, what: str, size: int, platform: str) -> None:
    """Raises one ``ValueError`` line when ``size`` bytes (of ``what``) exceed `memory_limit` of ``platform``."""
    limit = memory_limit(platform)
    if limit is not None and size > limit:
        raise ValueError(f"{name}: {what} would take {size / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB "
                         f"of {platform} memory: ask for a smaller output, or compute it in tiles")
