"""Helpers the NumPy data sets (`stn_jax.paper.data.svhn`, `stn_jax.paper.data.cub`) share: the entropy of
their per-example random streams, how many worker processes to start, and the default cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def stream_entropy(*values: int) -> list[int]:
    """``values`` as unsigned 64-bit words, the entropy of ``np.random.default_rng`` for one random stream
    (e.g. ``(TRAIN_STREAM, seed, step, j)``: example ``j`` of the batch of ``step``)."""
    return [int(v) % (1 << 64) for v in values]


def worker_count(num_workers: int) -> int:
    """The processes (or threads) that ``config.data.num_workers`` asks for: ``-1`` (any negative value) = the
    machine's cores, at most 16; ``0`` = none (the work runs in the calling thread)."""
    if num_workers < 0:
        return min(os.cpu_count() or 1, 16)
    return int(num_workers)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stn_jax`` (default ``~/.cache/stn_jax``): where SVHN and CUB cache their
    preprocessed images when neither ``config.data.cache_dir`` nor a ``cache_dir`` argument says where."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stn_jax"
