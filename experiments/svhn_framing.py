"""How the synthetic house numbers are framed, compared with real SVHN crops: a table and a picture.

    python -m experiments.svhn_framing --source ../shared/data/svhn_format1_subset \\
        --mnist ../shared/data/mnist --out docs/images/svhn_framing.png

Real: every number (1-5 digits) of the format-1 split ``--split`` of ``--source`` (a folder or archive as
for ``config.data.source``), its digit boxes mapped into the crops that `svhn.crop` makes (`svhn.crop_box`:
tight at 64 px, loose at 128 px; no image is read). Synthetic: ``--count`` numbers of `svhn.synth_number`
on the MNIST test digits of ``--mnist`` (a folder of the four IDX files, or ``tfds``) at 64 px (tight) and
128 px (loose), with their own boxes (``box``: the box of each digit's slanted ink). Number ``i`` draws from
``np.random.default_rng((seed, i))``. Per number, as fractions of the crop's side:

* digit height: the mean height of its digit boxes;
* number width: the width of the union of its boxes;
* centre offset: the distance from the union box's centre to the crop's centre;

and its number of digits. Prints a table (median, 10th and 90th percentile per statistic, source and size;
the digit counts in % of the numbers) and writes ``--out``, a PNG of histograms, real against synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from experiments.cli import run
from experiments.figures import save_small_png

flags.DEFINE_string("source", None, "SVHN format-1 folder (or the split's folder or archive).")
flags.DEFINE_string("split", "train", "Split of --source whose numbers are measured.")
flags.DEFINE_string("mnist", None, "MNIST folder of the four IDX files (or 'tfds') for the synthetic numbers.")
flags.DEFINE_integer("count", 2000, "Synthetic numbers per size.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic numbers.")
flags.DEFINE_string("out", None, "PNG file to write (histograms).")
flags.mark_flags_as_required(["source", "mnist", "out"])
FLAGS = flags.FLAGS

SIZES = {64: "tight", 128: "loose"}  # the paper's two crops (Sect. 4.2)
STATISTICS = {"digit_height": "digit height", "number_width": "number width", "centre_offset": "centre offset"}


def number_statistics(boxes: np.ndarray) -> dict[str, float]:
    """``boxes`` (n, 4): left, top, width, height as fractions of the crop's width and height (the crop spans
    [0, 1] x [0, 1]). Returns the statistics of the module docstring and ``digits`` = n."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
    return {"digit_height": float(b[:, 3].mean()), "number_width": float(x1 - x0),
            "centre_offset": float(np.hypot((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5)), "digits": len(b)}


def real_statistics(source: str, split: str) -> dict[int, list[dict[str, float]]]:
    """Per crop size, the statistics of every number of 1-5 digits of ``split``, boxes mapped into its crop."""
    from stn_jax.paper.data import svhn

    records = [r for r in svhn.read_annotations(source, split) if 1 <= len(r) <= svhn.MAX_DIGITS]
    if not records:
        raise ValueError(f"the SVHN {split} split of {source} holds no number of 1-{svhn.MAX_DIGITS} digits")
    out: dict[int, list[dict[str, float]]] = {}
    for size, framing in SIZES.items():
        rows = []
        for r in records:
            x0, y0, x1, y1 = svhn.crop_box(r.boxes, framing)
            w, h = x1 - x0, y1 - y0
            rows.append(number_statistics((r.boxes - [x0, y0, 0, 0]) / [w, h, w, h]))
        out[size] = rows
    return out


def synthetic_statistics(mnist: str, count: int, seed: int) -> dict[int, list[dict[str, float]]]:
    """Per crop size, the statistics of ``count`` synthetic numbers (their own boxes)."""
    from stn_jax.paper.data import svhn

    config = svhn.default_config("svhn_synth")
    config.source = mnist
    images, labels, inks = svhn.SvhnSynthDataset(config, seed=seed, global_batch_size=1).mnist("test")
    out: dict[int, list[dict[str, float]]] = {}
    for size, framing in SIZES.items():
        rows = []
        for i in range(count):
            number = svhn.synth_number(np.random.default_rng((seed, i)), images, labels, size, framing,
                                       inks=inks)
            rows.append(number_statistics(number["box"][:number["length"]] / size))
        out[size] = rows
    return out


def table(sources: dict[str, dict[int, list[dict[str, float]]]]) -> str:
    """The printed table: per statistic, source and size the median and 10th / 90th percentiles; then the
    digit counts (% of the numbers, the same at both sizes)."""
    lines = [f"{'statistic':<14} {'source':<10} {'size':>4} {'median':>7} {'p10':>6} {'p90':>6}"]
    for key, name in STATISTICS.items():
        for size in SIZES:
            for source, stats in sources.items():
                p10, median, p90 = np.percentile([s[key] for s in stats[size]], [10, 50, 90])
                lines.append(f"{name:<14} {source:<10} {size:>4} {median:7.3f} {p10:6.3f} {p90:6.3f}")
    lines.append("")
    lines.append(f"{'digits (% of numbers)':<26}" + "".join(f"{n:>7}" for n in range(1, 6)))
    for source, stats in sources.items():
        counts = np.bincount([s["digits"] for s in stats[64]], minlength=6)[1:6]
        lines.append(f"{f'{source} ({counts.sum()})':<26}" + "".join(f"{100 * c / counts.sum():7.1f}" for c in counts))
    return "\n".join(lines)


def draw(sources: dict[str, dict[int, list[dict[str, float]]]], out: Path) -> Path:
    """Histograms, real against synthetic: one row per crop size, one column per statistic; and the digit
    counts. Saved with a 64-colour palette (small in the repository)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(sources, ("tab:blue", "tab:orange")))
    fig, axes = plt.subplots(len(SIZES), len(STATISTICS) + 1, figsize=(10, 4.4), squeeze=False)
    for row, (size, framing) in enumerate(SIZES.items()):
        for col, (key, name) in enumerate(STATISTICS.items()):
            ax = axes[row, col]
            values = {source: [s[key] for s in stats[size]] for source, stats in sources.items()}
            low, high = min(min(v) for v in values.values()), max(max(v) for v in values.values())
            bins = np.linspace(0.95 * low, 1.05 * high + 1e-3, 30)
            for source, v in values.items():
                ax.hist(v, bins, density=True, histtype="stepfilled", alpha=0.45, color=colours[source],
                        label=source)
            ax.set_title(f"{name}, {size} px ({framing})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
    ax = axes[0, -1]
    for k, (source, stats) in enumerate(sources.items()):
        counts = np.bincount([s["digits"] for s in stats[64]], minlength=6)[1:6]
        ax.bar(np.arange(1, 6) + (k - 0.5) * 0.4, 100 * counts / counts.sum(), 0.4, color=colours[source])
    ax.set_title("digits (% of numbers)", fontsize=8)
    ax.tick_params(labelsize=7)
    axes[1, -1].set_axis_off()
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("real SVHN crops against synthetic numbers (fractions of the crop's side)", fontsize=9)
    fig.tight_layout()
    return save_small_png(fig, out)


def main(argv) -> None:
    del argv
    sources = {"real": real_statistics(FLAGS.source, FLAGS.split),
               "synthetic": synthetic_statistics(FLAGS.mnist, FLAGS.count, FLAGS.seed)}
    print(table(sources))
    print(f"wrote {draw(sources, Path(FLAGS.out))}")


if __name__ == "__main__":
    run(main)
