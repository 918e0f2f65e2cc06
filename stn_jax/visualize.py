"""Pictures of what a spatial transformer does: inputs with the sampling grid drawn, beside the outputs.

`transformer_panel` returns one RGB uint8 image: a row per example; the first
column is the input with each transformer's sampling grid outlined on it (the
region of the input it reads, one colour per transformer, with a few interior
grid lines so that TPS and projective bending show), then one column per
transformer output. A transformer that collapses (zooms out to nothing, drifts
off the image) is visible at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from stn_jax import transforms
from stn_jax.coords import normalized_to_pixel

COLOURS = [(230, 60, 60), (60, 200, 80), (70, 130, 255), (240, 200, 40)]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (H, W, 3) uint8; 1 channel grey, 2 channels red/green, 3 RGB, more: first 3."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == 1:
        rgb = np.repeat(image, 3, -1)
    elif c == 2:
        rgb = np.concatenate([image, np.zeros_like(image[..., :1])], -1)
    else:
        rgb = image[..., :3]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _grid_lines(grid: np.ndarray, size: tuple[int, int], align_corners: bool, scale: int, lines: int):
    """Polylines (in upscaled pixel coordinates) of the grid's border and a few interior lines."""
    h, w = size
    px = normalized_to_pixel(grid[..., 0], w, align_corners)
    py = normalized_to_pixel(grid[..., 1], h, align_corners)
    pts = np.stack([(px + 0.5) * scale, (py + 0.5) * scale], -1)  # pixel centres in the upscaled image
    ho, wo = pts.shape[:2]
    rows = sorted({0, ho - 1, *np.linspace(0, ho - 1, lines + 2).round().astype(int)})
    cols = sorted({0, wo - 1, *np.linspace(0, wo - 1, lines + 2).round().astype(int)})
    polylines = [pts[r] for r in rows] + [pts[:, c] for c in cols]
    return [[tuple(map(float, p)) for p in line] for line in polylines]


def transformer_panel(inputs: np.ndarray, thetas: Sequence[np.ndarray], warped: Sequence[np.ndarray],
                      transform: str, align_corners: bool = False, scale: int = 4, max_examples: int = 8,
                      interior_lines: int = 2) -> np.ndarray:
    """One picture of several examples.

    Args:
      inputs: (N, H, W, C) in [0, 1] (volumes (N, D, H, W, C) are shown as depth maxima).
      thetas: per transformer, (N, num_params) parameters of ``transform``.
      warped: per transformer, (N, H_out, W_out, C_out) outputs (3-D outputs as depth maxima).
      transform: registry name of the transformers' transform.
    """
    inputs = np.asarray(inputs)
    t = transforms.get_transform(transform)
    if inputs.ndim == 5:
        inputs = inputs.max(axis=1)
    n = min(len(inputs), max_examples)
    h, w = inputs.shape[1:3]
    rows = []
    for i in range(n):
        base = Image.fromarray(to_rgb(inputs[i])).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(base)
        cells = [base]
        for k, (theta, out) in enumerate(zip(thetas, warped)):
            out = np.asarray(out[i])
            if out.ndim == 4:
                out = out.max(axis=0)
            if t.spatial_dims == 2:
                grid = np.asarray(t.make_grid(np.asarray(theta[i]), out.shape[:2], align_corners))
                for line in _grid_lines(grid, (h, w), align_corners, scale, interior_lines):
                    draw.line(line, fill=COLOURS[k % len(COLOURS)], width=1)
            ho, wo = out.shape[:2]
            cells.append(Image.fromarray(to_rgb(out)).resize((wo * scale, ho * scale), Image.NEAREST))
        height = max(c.height for c in cells)
        row = Image.new("RGB", (sum(c.width for c in cells) + 4 * (len(cells) - 1), height), (40, 40, 40))
        x = 0
        for c in cells:
            row.paste(c, (x, 0))
            x += c.width + 4
        rows.append(row)
    panel = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * (n - 1)), (40, 40, 40))
    y = 0
    for r in rows:
        panel.paste(r, (0, y))
        y += r.height + 4
    return np.asarray(panel)
