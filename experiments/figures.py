"""Saving the experiments' matplotlib figures small enough for the repository."""

from __future__ import annotations

from pathlib import Path


def save_small_png(fig, out: Path, *, dpi: int = 72, colours: int = 64) -> Path:
    """Writes ``fig`` to ``out`` (parents created) as a PNG with a ``colours``-colour palette, and closes it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    with Image.open(out) as im:
        small = im.convert("RGB").quantize(colors=colours)
    small.save(out, optimize=True)
    return out
