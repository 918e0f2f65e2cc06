"""Warps a test pattern with every 2-D transform and writes the results as a PNG.

    python -m experiments.demo_warp --out warp_demo.png

A self-contained check that the library works on this machine: no data needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import stn_jax  # noqa: E402


def test_pattern(size: int = 96) -> np.ndarray:
    """A checkerboard with a coloured frame and an arrow, (size, size, 3) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / size
    board = ((np.floor(x * 8) + np.floor(y * 8)) % 2)[..., None] * np.array([0.9, 0.9, 0.9])
    image = 0.15 + 0.7 * board
    frame = (x < 0.04) | (x > 0.96) | (y < 0.04) | (y > 0.96)
    image[frame] = [0.85, 0.2, 0.2]
    arrow = (np.abs(x - 0.5) < 0.05) & (y > 0.3) & (y < 0.75) | (np.abs(x - 0.5) < (0.3 - y) * 0.8) & (y > 0.1)
    image[arrow] = [0.2, 0.35, 0.9]
    return image.astype(np.float32)


def examples() -> list[tuple[str, str, np.ndarray]]:
    angle = np.deg2rad(30)
    rng = np.random.default_rng(0)
    return [
        ("identity", "affine", np.array([1, 0, 0, 0, 1, 0], np.float32)),
        ("affine: rotate 30deg, zoom", "affine",
         np.array([0.8 * np.cos(angle), -0.8 * np.sin(angle), 0.1, 0.8 * np.sin(angle), 0.8 * np.cos(angle), 0],
                  np.float32)),
        ("attention: s=0.5, t=(0.4,-0.4)", "attention", np.array([0.5, 0.4, -0.4], np.float32)),
        ("projective", "projective", np.array([1, 0.1, 0, 0.05, 1, 0, 0.4, 0.3], np.float32)),
        ("thin-plate spline", "tps", (0.15 * rng.standard_normal(32)).astype(np.float32)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="warp_demo.png", help="where to write the PNG")
    args = parser.parse_args()

    image = jnp.asarray(test_pattern())
    cases = examples()
    fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.3))
    for ax, (title, name, params) in zip(axes, cases):
        warped = stn_jax.warp(image, params, (96, 96), name, padding_mode="zeros")
        ax.imshow(np.clip(np.asarray(warped), 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
