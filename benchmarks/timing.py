"""Timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which puts this folder first
on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_block(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (which must block until its result is ready), after one
    untimed warm-up call (the compilation, on the first round)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
