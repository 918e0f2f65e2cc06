"""Where a run's numbers and pictures go: TensorBoard, JSON lines, the terminal.

* `SummaryWriter` writes TensorBoard event files (scalars, images,
  histograms) with TensorBoard's own record writer, without importing
  TensorFlow.
* `MetricsWriter` sends scalars to TensorBoard and appends them as one JSON
  object per line to ``metrics.jsonl`` in the workdir (easy to tabulate).
* `Progress` prints a one-line progress report with images/s and ETA.

Only process 0 writes (the others get no-op writers), as in multi-host JAX
training loops.
"""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class SummaryWriter:
    """Appends TensorBoard events to ``<logdir>/events.out.tfevents.*``."""

    def __init__(self, logdir: str | Path):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = open(logdir / name, "ab")
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def _summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image``: (H, W) or (H, W, 3) uint8, or float in [0, 1]."""
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        channels = 1 if image.ndim == 2 else image.shape[-1]
        proto = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=channels,
                                          encoded_image_string=png.getvalue())
        self._summary(step, [summary_pb2.Summary.Value(tag=tag, image=proto)])

    def histogram(self, step: int, tag: str, values: np.ndarray, bins: int = 30) -> None:
        values = np.asarray(values, np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        counts, edges = np.histogram(values, bins=bins)
        proto = summary_pb2.HistogramProto(
            min=float(values.min()), max=float(values.max()), num=float(values.size),
            sum=float(values.sum()), sum_squares=float((values ** 2).sum()),
            bucket_limit=[float(e) for e in edges[1:]], bucket=[float(c) for c in counts])
        self._summary(step, [summary_pb2.Summary.Value(tag=tag, histo=proto)])

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


class MetricsWriter:
    """Scalars to TensorBoard and ``metrics.jsonl``; images and histograms to TensorBoard."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self.tensorboard = SummaryWriter(Path(workdir) / "tensorboard")
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self.tensorboard.scalars(step, clean)
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled:
            self.tensorboard.image(step, tag, image)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        if self.enabled:
            self.tensorboard.histogram(step, tag, values)

    def flush(self) -> None:
        if self.enabled:
            self.tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self._jsonl.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Reports ``step/total``, a few metrics, images/s and the ETA, at most every ``interval`` s."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, interval: float = 2.0,
                 enabled: bool = True, stream=sys.stderr):
        self.total, self.batch, self.interval, self.enabled, self.stream = total_steps, batch_size, interval, enabled, stream
        self._t0, self._step0 = time.time(), start_step
        self._last_print = 0.0
        self._rate = float("nan")

    def images_per_second(self, step: int) -> float:
        elapsed = time.time() - self._t0
        return (step - self._step0) * self.batch / elapsed if elapsed > 0 and step > self._step0 else float("nan")

    def update(self, step: int, metrics: Mapping[str, float] | None = None, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self._last_print < self.interval):
            return
        self._last_print = now
        rate = self.images_per_second(step)
        steps_per_s = rate / self.batch if rate == rate else float("nan")
        eta = (self.total - step) / steps_per_s if steps_per_s and steps_per_s == steps_per_s else float("nan")
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        text = " ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items())
        eta_text = _duration(eta) if eta == eta else "?"
        print(f"\r[{bar}] {step}/{self.total} {text} | {rate:,.0f} img/s | ETA {eta_text}   ",
              end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=self.stream, flush=True)
