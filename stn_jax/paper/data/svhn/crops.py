"""SVHN crops: framing the digit boxes, cropping and resizing, checking the boxes, pictures of crops.

* **Crops.** ``framing="tight"`` (`crop_64`, Goodfellow et al. 2013): the
  smallest rectangle holding every digit box, enlarged by 30 % in x and in y
  about its centre, cropped and resized to ``image_size`` (64) square; the
  aspect ratio is not kept (Goodfellow et al. 2013 resize the rectangle).
  ``framing="loose"`` (`crop_128`) [U: the paper only says "looser 128x128
  crops with more background, following Ba et al."]: a square centred on the
  digits' union box whose side is ``LOOSE_FACTOR`` (2) times the longer side
  of the 30 %-enlarged box, resized to ``image_size`` (128). The digits then
  have about the same size in pixels as in the 64 px crops, inside twice the
  field of view. ``framing="auto"`` (default) is tight below 128 px, loose from
  128 px (`resolve_framing`). Parts of a crop outside the image repeat the image's edge pixels [U]
  (not black borders that would mark the frame). Resizing is PIL's bilinear
  filter (antialiased when shrinking) on the exact, sub-pixel crop box.
* **Boxes.** `check_boxes` refuses a digit box with zero or negative width or
  height, or one entirely outside its image, naming the image and the box.
  Boxes partly outside the image are normal in SVHN (225 of the 99,289 boxes
  of the official train and test annotations) and are cropped as usual.
* **Pictures.** `draw_crops` shows real numbers with their boxes and both crops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stn_jax.paper.data.svhn.annotations import SvhnFormatError, SvhnRecord
from stn_jax.paper.data.svhn.sources import _folder_source, load_image, read_annotations

TIGHT_ENLARGE = 1.3     # Goodfellow et al. 2013: the union box enlarged by 30 % in x and y
LOOSE_FACTOR = 2.0      # [U] loose framing: square side = 2 x the longer side of the enlarged box


def resolve_framing(image_size: int, framing: str = "auto") -> str:
    """``"tight"`` or ``"loose"``: ``auto`` is tight below 128 px, loose from 128 px."""
    if framing == "auto":
        return "loose" if image_size >= 128 else "tight"
    if framing not in ("tight", "loose"):
        raise ValueError(f"framing must be auto, tight or loose, got {framing!r}")
    return framing


def union_box(boxes: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: the smallest rectangle holding every ``(left, top, width, height)`` box."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float((b[:, 0] + b[:, 2]).max()),
            float((b[:, 1] + b[:, 3]).max()))


def crop_box(boxes: np.ndarray, framing: str = "tight") -> tuple[float, float, float, float]:
    """The source rectangle ``(x0, y0, x1, y1)`` a crop covers (see the module docstring).

    tight: the union box enlarged by 30 % in x and y about its centre (Goodfellow et al. 2013);
    loose [U]: the square centred on it whose side is ``LOOSE_FACTOR`` times the tight box's longer side.
    """
    x0, y0, x1, y1 = union_box(boxes)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = max(x1 - x0, 1.0) * TIGHT_ENLARGE, max(y1 - y0, 1.0) * TIGHT_ENLARGE
    if framing == "loose":
        w = h = LOOSE_FACTOR * max(w, h)
    elif framing != "tight":
        raise ValueError(f"framing must be tight or loose, got {framing!r}")
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def crop_and_resize(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The sub-pixel rectangle ``box = (x0, y0, x1, y1)`` of ``image`` (uint8 (H, W, 3)) resized to
    ``size x size`` (PIL bilinear, antialiased when shrinking); outside the image the edge pixels repeat."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = max(math.ceil(x1), ix0 + 1), max(math.ceil(y1), iy0 + 1)
    rows = np.clip(np.arange(iy0, iy1), 0, h - 1)
    cols = np.clip(np.arange(ix0, ix1), 0, w - 1)
    region = np.ascontiguousarray(image[rows][:, cols])
    sub = (x0 - ix0, y0 - iy0, max(x1 - ix0, x0 - ix0 + 1e-3), max(y1 - iy0, y0 - iy0 + 1e-3))
    out = Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR, box=sub)
    return np.asarray(out, np.uint8)


def crop(image: np.ndarray, boxes: np.ndarray, size: int, framing: str = "tight") -> np.ndarray:
    """The ``size x size`` uint8 RGB crop of a house number with digit ``boxes`` (`crop_box`)."""
    return crop_and_resize(image, crop_box(boxes, framing), size)


def crop_64(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Goodfellow et al. 2013's crop: the union box enlarged 30 %, resized to 64x64 uint8 RGB."""
    return crop(image, boxes, 64, "tight")


def crop_128(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The loose crop [U]: a square twice the enlarged box's longer side, resized to 128x128 uint8 RGB."""
    return crop(image, boxes, 128, "loose")


def check_boxes(record: SvhnRecord, image_shape: Sequence[int], name: str) -> None:
    """Refuses a digit box of ``record`` that cannot be cropped: a width or height that is zero or negative (or
    a value that is not a finite number), or a box entirely outside the ``(H, W, ...)`` image. Boxes partly
    outside the image are normal in SVHN and pass.

    Raises `SvhnFormatError`, one line naming the image ``name`` and the box (1-based, its label and pixels).
    """
    height, width = image_shape[:2]
    for k, (left, top, w, h) in enumerate(np.asarray(record.boxes, np.float64).reshape(-1, 4)):
        if not np.isfinite([left, top, w, h]).all():
            problem = "has a value that is not a finite number"
        elif w <= 0 or h <= 0:
            problem = "has zero or negative width or height"
        elif left >= width or top >= height or left + w <= 0 or top + h <= 0:
            problem = f"lies entirely outside the {width}x{height} image"
        else:
            continue
        raise SvhnFormatError(f"SVHN image {name}: digit box {k + 1} of {len(record)} (label {record.digits[k]}, "
                              f"left {left:g}, top {top:g}, width {w:g}, height {h:g}) {problem}; correct its entry "
                              f"in the split's digitStruct file, or delete the image and set "
                              f"config.data.allow_missing_images=True to skip it")


def draw_crops(folder: str | os.PathLike, out: str | os.PathLike, names: Sequence[str] | None = None,
               count: int = 8) -> Path:
    """Saves a picture of ``count`` real house numbers from a split ``folder``: the image with the digit
    boxes, the tight 64 px crop and the loose 128 px crop (`crop_64`, `crop_128`) in three rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    src = _folder_source(Path(folder).name, Path(folder).expanduser())
    records = read_annotations(src.path)
    by_name = {r.filename: r for r in records}
    chosen = [by_name[n] for n in names] if names else [r for r in records if (src.path / r.filename).is_file()][:count]
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.6 * len(chosen), 5.2), squeeze=False)
    for col, r in enumerate(chosen):
        image = load_image(src.path / r.filename)
        ax = axes[0, col]
        ax.imshow(image)
        for left, top, w, h in r.boxes:
            ax.add_patch(patches.Rectangle((left, top), w, h, fill=False, color="yellow", lw=0.8))
        for framing, colour in (("tight", "cyan"), ("loose", "magenta")):
            x0, y0, x1, y1 = crop_box(r.boxes, framing)
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=0.8, ls="--"))
        ax.set_title(f"{r.filename}: {r.digits}", fontsize=8)
        axes[1, col].imshow(crop_64(image, r.boxes))
        axes[2, col].imshow(crop_128(image, r.boxes))
        for row in range(3):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    axes[0, 0].set_ylabel("image, boxes", fontsize=8)
    axes[1, 0].set_ylabel("64 px (tight)", fontsize=8)
    axes[2, 0].set_ylabel("128 px (loose)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
