"""Where a run's numbers and pictures go: TensorBoard, JSON lines, the terminal.

* `MetricsWriter` sends scalars, images and histograms to TensorBoard through
  ``tensorboardX`` (no TensorFlow in the training process) and appends every
  scalar row to ``metrics.jsonl`` in the workdir (easy to tabulate). Rows of
  steps after a resumed run's checkpoint are dropped when the run resumes, so
  a step is never recorded twice.
* `Progress` is a ``tqdm`` bar with the latest metrics and images/s.

Only process 0 writes (the others get no-op writers), as in multi-host JAX
training loops.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm


class MetricsWriter:
    """Scalars to TensorBoard and ``metrics.jsonl``; images and histograms to TensorBoard."""

    def __init__(self, workdir: str | Path, enabled: bool = True, *, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = Path(workdir) / "metrics.jsonl"
        drop_rows_after(path, resume_step)
        self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step or None)
        self._jsonl = open(path, "a")

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self.tensorboard.add_scalar(k, v, step)
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image``: (H, W, 3) uint8."""
        if self.enabled:
            self.tensorboard.add_image(tag, image, step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        values = values[np.isfinite(values)]
        if self.enabled and values.size:
            self.tensorboard.add_histogram(tag, values, step, bins=30)

    def flush(self) -> None:
        if self.enabled:
            self.tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self._jsonl.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, in the order written (training rows and ``test_*`` rows)."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_rows_after(path: Path, step: int) -> None:
    """Removes the rows of ``metrics.jsonl`` with ``"step" > step`` (a resumed run writes them again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


class Progress:
    """A tqdm bar over the steps, showing the latest metrics and images/s."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, enabled: bool = True):
        self.batch, self._step0, self._t0 = batch_size, start_step, time.time()
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                         dynamic_ncols=True, mininterval=2.0)

    def images_per_second(self, step: int) -> float:
        elapsed = time.time() - self._t0
        return (step - self._step0) * self.batch / elapsed if elapsed > 0 and step > self._step0 else float("nan")

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        self._bar.update(step - self._bar.n)
        shown = {k: f"{v:.4g}" for k, v in (metrics or {}).items()}
        shown["img/s"] = f"{self.images_per_second(step):,.0f}"
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()
