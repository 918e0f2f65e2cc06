"""Draws the coordinate conventions of docs/conventions.md.

    python -m experiments.conventions_figure --out docs/images/conventions.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stn_jax.coords import pixel_centers  # noqa: E402


def draw(ax, n: int, align_corners: bool) -> None:
    centres = pixel_centers(n, align_corners, np.float64)
    half = (centres[1] - centres[0]) / 2
    for i, c in enumerate(centres):
        ax.add_patch(plt.Rectangle((c - half, -0.5), 2 * half, 1, fill=True, alpha=0.25 + 0.15 * (i % 2),
                                   color="tab:blue", lw=0))
        ax.plot(c, 0, "o", color="tab:blue")
        ax.annotate(f"pixel {i}\n{c:+.2f}", (c, 0), (c, -0.95), ha="center", fontsize=8)
    for x, label in ((-1, "-1"), (1, "+1")):
        ax.axvline(x, color="tab:red", lw=2)
        ax.annotate(label, (x, 0.62), ha="center", color="tab:red", fontsize=10)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.2, 0.9)
    ax.set_yticks([])
    ax.set_title(f"align_corners={align_corners}: " +
                 ("-1/+1 are the centres of the edge pixels" if align_corners
                  else "-1/+1 are the outer edges of the image"), fontsize=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/images/conventions.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.2))
    draw(axes[0], 4, False)
    draw(axes[1], 4, True)
    axes[1].set_xlabel("normalised x (same for y along the height and z along the depth)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
