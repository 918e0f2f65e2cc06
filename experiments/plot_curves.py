"""Learning curves of runs side by side, from their workdirs' ``metrics.jsonl`` (docs/models.md).

    python -m experiments.plot_curves --out docs/images/svhn_learning_check.png \\
        --run "plain He init=workdirs/svhn_check/cnn64_w05_b32" \\
        --run "He init scaled for dropout=workdirs/svhn_check/cnn64_w05_b32_dinit" \\
        --floor 98.3 --floor_label "marginal label distribution"

Two panels: the training loss (the logged rows, smoothed over ``--smooth``
rows) and the error, training (thin, smoothed) and test (markers, every
evaluation), in %, with optional horizontal reference lines (``--floor``:
chance, the marginal, a probe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from experiments import cli
from experiments.figures import save_small_png
from stn_jax.paper.summaries import read_metrics

flags.DEFINE_multi_string("run", None, "LABEL=WORKDIR of a run to draw (repeat).")
flags.DEFINE_string("out", None, "PNG file to write.")
flags.DEFINE_integer("smooth", 8, "Moving average over this many training rows (1: none).")
flags.DEFINE_multi_float("floor", [], "A horizontal reference line on the error panel, in % (repeat).")
flags.DEFINE_multi_string("floor_label", [], "The label of each --floor, in order.")
flags.DEFINE_string("title", "", "A title over both panels.")
flags.mark_flags_as_required(["run", "out"])
FLAGS = flags.FLAGS


def parse_run(text: str) -> tuple[str, Path]:
    """``"LABEL=WORKDIR"`` -> ``(label, workdir)``; the workdir must hold a ``metrics.jsonl``."""
    label, sep, workdir = text.rpartition("=")
    if not sep or not label or not workdir:
        raise ValueError(f"--run must be LABEL=WORKDIR, got {text!r}")
    path = Path(workdir)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"--run {text!r}: no metrics.jsonl in {path}")
    return label, path


def smoothed(values: list[float], window: int) -> np.ndarray:
    """The moving average over ``window`` values (shorter at the start), the same length as ``values``."""
    v = np.asarray(values, np.float64)
    if window <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    lo = np.maximum(np.arange(1, v.size + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, v.size + 1) - lo)


def curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``loss`` and ``error`` (training rows) and ``test_error`` (evaluations), errors in %."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key, scale in (("loss", 1.0), ("error", 100.0), ("test_error", 100.0)):
        picked = [(r["step"], scale * float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        out[key] = ([s for s, _ in picked], [v for _, v in picked])
    return out


def plot(runs: list[tuple[str, Path]], out: Path, *, smooth: int, floors: list[tuple[float, str]],
         title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, workdir) in enumerate(runs):
        c = curves(read_metrics(workdir))
        colour = f"C{i}"
        steps, loss = c["loss"]
        ax_loss.plot(steps, smoothed(loss, smooth), color=colour, lw=1, label=label)
        steps, err = c["error"]
        ax_err.plot(steps, smoothed(err, smooth), color=colour, lw=0.8, alpha=0.6, label=f"{label}: training")
        steps, test = c["test_error"]
        if steps:
            ax_err.plot(steps, test, color=colour, marker="o", lw=1.2, label=f"{label}: test")
    for value, name in floors:
        ax_err.axhline(value, color="k", ls="--", lw=0.8, label=name)
    ax_loss.set(xlabel="step", ylabel="training loss")
    ax_err.set(xlabel="step", ylabel="error %")
    ax_loss.legend(fontsize=7)
    ax_err.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_small_png(fig, out, dpi=90)


def main(_argv) -> None:
    runs = [parse_run(r) for r in FLAGS.run]
    labels = list(FLAGS.floor_label) + [""] * len(FLAGS.floor)
    floors = [(v, labels[i] or f"{v:g} %") for i, v in enumerate(FLAGS.floor)]
    print(plot(runs, Path(FLAGS.out), smooth=FLAGS.smooth, floors=floors, title=FLAGS.title))


if __name__ == "__main__":
    cli.run(main)
