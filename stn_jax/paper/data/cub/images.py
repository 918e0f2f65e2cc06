"""CUB images: decoding a JPEG and resizing it (`decode_resize`), and the crop of an example with its box
(`crop_example`). Top-level functions: the worker processes run them.

* **Images** [P: "random 224 crops of images resized to 256, flips"; R: the
  448 px example resizes to 512x512 and takes random 448 crops with mirroring].
  Each JPEG is decoded with PIL and converted to RGB (greyscale "L", CMYK,
  palette images too), then resized (PIL bilinear, antialiased) to
  ``resize`` x ``resize`` (``resize_mode="square"``, default [R]: the Caffe
  examples' data layers resize to a square, not keeping the aspect ratio)
  or so that its shorter side is ``resize`` (``"shorter"`` [U], the
  torchvision habit). ``resize=-1`` means ``round(image_size * 8 / 7)``:
  256 for 224 [P], 512 for 448 [R]. Training takes a uniformly random
  ``image_size`` crop at an integer offset and flips it horizontally with
  probability 1/2 (``flip``); test examples take the centre crop, no flip.
  Output ``image`` float32 RGB in [0, 1] ``(B, S, S, 3)`` (no mean/std: the
  backbone's preprocessing does that), ``label`` int32 ``(B,)``, and
  ``box`` float32 ``(B, 4)``: the bird's official box as ``(x0, y0, x1, y1)``
  in the output crop's normalised coordinates (pixel edges: -1 = left/top
  edge, +1 = right/bottom edge, the ``align_corners=False`` convention),
  clipped to the image first (a few official boxes pass the border by up to
  32 px) and to [-1, 1] after (the visible part), mirrored with the image.
  Training uses the labels only [P]; the box is for pictures and checks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from stn_jax.paper.data.cub.annotations import HOW_TO_GET, CubFormatError, CubSourceError
from stn_jax.paper.data.files import IMAGE_ERRORS, describe_image_error


def _resized_shape(w: int, h: int, resize: int, mode: str) -> tuple[int, int]:
    """(width, height) after resizing a ``w x h`` image."""
    if mode == "square":
        return resize, resize
    if w <= h:
        return resize, max(resize, int(round(h * resize / w)))
    return max(resize, int(round(w * resize / h))), resize


def decode_resize(data: str | os.PathLike | bytes | np.ndarray, resize: int, mode: str = "square"
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """A JPEG (path, bytes or an already decoded uint8 array) as RGB resized uint8 ``(h, w, 3)``, and the
    original ``(width, height)``. Greyscale, CMYK and palette images become RGB.

    Raises `CubSourceError` for a missing file and `CubFormatError` naming the file when it is truncated
    or not an image.
    """
    import io

    from PIL import Image

    name = str(data) if isinstance(data, (str, os.PathLike)) else f"(a {type(data).__name__})"
    try:
        if isinstance(data, np.ndarray):
            im = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
        else:
            im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        with im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            size = im.size
            out = im.resize(_resized_shape(size[0], size[1], resize, mode), Image.Resampling.BILINEAR)
            return np.asarray(out, np.uint8), size
    except FileNotFoundError:
        raise CubSourceError(f"CUB image {name} is missing. {HOW_TO_GET}") from None
    except IMAGE_ERRORS as e:
        raise CubFormatError(f"CUB image {name} is truncated or unreadable ({describe_image_error(e)}): replace "
                             f"it with the original file. {HOW_TO_GET}") from None


def crop_example(image: np.ndarray, orig_size: Sequence[int], box_xywh: Sequence[float], size: int,
                 entropy: list[int] | None, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` crop of a resized uint8 image (a view of it) and the box in its normalised coordinates.

    ``entropy`` None: the centre crop, no flip (test); else ``default_rng(entropy)``
    draws the row offset, the column offset and (with ``flip``) a flip, in that order.
    """
    h, w = image.shape[:2]
    if entropy is None:
        oy, ox, mirror = (h - size) // 2, (w - size) // 2, False
    else:
        rng = np.random.default_rng(entropy)
        oy = int(rng.integers(0, h - size + 1))
        ox = int(rng.integers(0, w - size + 1))
        mirror = bool(rng.random() < 0.5) if flip else False
    out = image[oy:oy + size, ox:ox + size]
    if mirror:
        out = out[:, ::-1]
    ow, oh = float(orig_size[0]), float(orig_size[1])
    bx, by, bw, bh = (float(v) for v in box_xywh)
    x0, x1 = np.clip([bx, bx + bw], 0.0, ow) * (w / ow) - ox
    y0, y1 = np.clip([by, by + bh], 0.0, oh) * (h / oh) - oy
    box = np.clip(np.array([x0, y0, x1, y1]) * (2.0 / size) - 1.0, -1.0, 1.0)
    if mirror:
        box = np.array([-box[2], box[1], -box[0], box[3]])
    return out, box.astype(np.float32)
