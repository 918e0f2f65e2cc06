"""Synthetic house numbers from MNIST digits (task ``svhn_synth``): `synth_number` and `SvhnSynthDataset`.

No counterpart in the paper; a stand-in for offline studies and tests [U
throughout]: a number of 1-5 MNIST digits, narrowed to about half as wide as
tall, each scaled by 0.97-1.03 and shifted up or down a little, about
touching, slanted by a common shear, drawn in one colour on a background of
another colour (luminance contrast at least 0.3) with a smooth low-frequency
texture, a colour gradient, random clutter strokes, a slight blur and pixel
noise. Each digit's box is the axis-aligned box of its slanted ink
(`synth_number` returns them, ``box``). Framing as for the real data, on the
union of these boxes: tight (the 30 %-enlarged union box fills the frame,
aspect not kept) or loose (a square twice the enlarged box's longer side,
centred on the number), each with a jitter of 5 % in size and 4 % in position.
The layout parameters (``SYNTH_LENGTH_PROBS``, ``SYNTH_SQUEEZE``,
``SYNTH_GAP``, ``SYNTH_DIGIT_SCALE``, ``SYNTH_DY``) are matched to real SVHN:
the number of digits to the frequencies of SVHN train (33,402 images), the
shape and spacing of the digit boxes to 595 real train images (1,293 boxes:
width / height median 0.50, gap between neighbours median 0 of the height, the
digits of a number equally tall and nearly aligned). Measured with
``experiments/svhn_framing.py`` on those 595 images, the 64 px and 128 px
crops then agree with the real ones in digit height, number width (both as
fractions of the crop's side, medians within 1 %) and digit count (within 1
point per length); the real crops are exactly centred on the number, the
synthetic ones up to 4 % off (docs/data.md). Training examples use the MNIST
train digits and ``default_rng((TRAIN_STREAM, seed, step, j))``; test example
``i`` uses the MNIST test digits and ``default_rng((TEST_STREAM, test_seed,
i))``, so it is a pure function of ``i`` (cached with its SHA-256 when a cache
folder is given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from stn_jax.paper.data.common import stream_entropy
from stn_jax.paper.data.files import array_digest, atomic_write
from stn_jax.paper.data.svhn.annotations import MAX_DIGITS, SvhnFormatError, SvhnSourceError, encode_label
from stn_jax.paper.data.svhn.crops import LOOSE_FACTOR, TIGHT_ENLARGE
from stn_jax.paper.data.svhn.dataset import TEST_STREAM, TRAIN_STREAM, VALID_STREAM, _Base
from stn_jax.paper.data.tasks import EVALUATION_OPTIONS

log = logging.getLogger(__name__)

SYNTH_VERSION = 2       # bump when the synthetic generator changes (invalidates cached synthetic test sets)

# The synthetic numbers' layout [U], matched to real SVHN (see the module docstring). Lengths: SVHN train's
# 5,137 / 18,130 / 8,691 / 1,434 / 9 numbers of 1-5 digits (and one of 6) of its 33,402 images.
SYNTH_LENGTH_PROBS = (0.1538, 0.5428, 0.2602, 0.0429, 0.0003)
SYNTH_DIGIT_SCALE = (0.97, 1.03)  # each digit's size factor (MNIST digits' ink is 20 px tall)
SYNTH_SQUEEZE = (0.5, 0.65)     # the number's width factor: MNIST digits are 0.75 as wide as tall (median)
SYNTH_GAP = (-1.0, 3.0)         # pixels between neighbouring digits' ink at MNIST scale
SYNTH_DY = 0.6                  # standard deviation of each digit's vertical shift, pixels at MNIST scale
SYNTH_SHEAR = 0.3               # the number's slant: x += shear * y, shear uniform in [-0.3, 0.3]


def ink_box(digit: np.ndarray, threshold: int = 32) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (end exclusive) of the pixels above ``threshold``; the whole frame if none."""
    ys, xs = np.nonzero(np.asarray(digit) > threshold)
    if not len(xs):
        return 0, 0, digit.shape[1], digit.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _luminance(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, [0.299, 0.587, 0.114]))


def synth_number(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, size: int, framing: str,
                 max_length: int = MAX_DIGITS, inks: np.ndarray | None = None) -> dict[str, Any]:
    """One synthetic house number (see the module docstring) from MNIST ``digits`` uint8 (N, 28, 28).

    Returns ``image`` uint8 (size, size, 3), ``label`` int32 (5,), ``length``, ``index`` (the MNIST digits used)
    and ``box`` float32 (5, 4): each digit's left, top, width, height in output pixels (the axis-aligned box of
    its slanted ink; x right, y down, the image spans [0, size]), NaN rows after the last digit.
    """
    from PIL import Image, ImageDraw, ImageFilter

    probs = np.asarray(SYNTH_LENGTH_PROBS[:max_length], np.float64)
    n = int(rng.choice(max_length, p=probs / probs.sum())) + 1
    ids = rng.integers(len(digits), size=n)
    # The number, white on black, at MNIST scale (about 20 px tall), on a canvas with room for the layout.
    scale = rng.uniform(*SYNTH_DIGIT_SCALE, n)
    squeeze = rng.uniform(*SYNTH_SQUEEZE)
    gaps = rng.uniform(*SYNTH_GAP, n)
    dy = rng.normal(0, SYNTH_DY, n)
    shear = rng.uniform(-SYNTH_SHEAR, SYNTH_SHEAR)
    pieces, x = [], 4.0
    for k in range(n):
        d = digits[ids[k]]
        x0, y0, x1, y1 = (inks[ids[k]] if inks is not None else ink_box(d))
        w, h = max(1, round((x1 - x0) * scale[k] * squeeze)), max(1, round((y1 - y0) * scale[k]))
        piece = np.asarray(Image.fromarray(np.ascontiguousarray(d[y0:y1, x0:x1])).resize(
            (w, h), Image.Resampling.BILINEAR))
        pieces.append((piece, round(x), round(30.0 - h / 2 + dy[k])))
        x += w + (gaps[k] if k < n - 1 else 0)
    canvas = np.zeros((60, int(round(x)) + 8), np.uint8)
    for piece, px, py in pieces:
        h, w = piece.shape
        region = canvas[py:py + h, px:px + w]
        np.maximum(region, piece[:region.shape[0], :region.shape[1]], out=region)
    # Each digit's box: the axis-aligned box of its slanted ink (pixels above 32, as in `ink_box`), as an SVHN
    # annotator draws it, in slanted canvas coordinates (X', Y), X' = X - shear (Y - 30), where the frame is a
    # rectangle. Columns x0, y0, x1, y1; a pixel (X, Y) covers [X, X + 1] x [Y, Y + 1].
    boxes = np.empty((n, 4))
    for k, (piece, px, py) in enumerate(pieces):
        ys, xs = np.nonzero(piece > 32) if (piece > 32).any() else np.nonzero(np.ones_like(piece))
        X, Y = px + xs, py + ys
        slanted = np.concatenate([X - shear * (Y - 30.0), X - shear * (Y + 1 - 30.0)])
        boxes[k] = slanted.min(), Y.min(), slanted.max() + 1, Y.max() + 1
    bx0, by0 = boxes[:, :2].min(0)
    bx1, by1 = boxes[:, 2:].max(0)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    # The frame: the 30 %-enlarged union box, each side jittered by 5 % and its centre by 4 %; loose: the square
    # twice its longer side, as for the real crops.
    fw = TIGHT_ENLARGE * (bx1 - bx0) * rng.uniform(0.95, 1.05)
    fh = TIGHT_ENLARGE * (by1 - by0) * rng.uniform(0.95, 1.05)
    if framing == "loose":
        fw = fh = LOOSE_FACTOR * max(fw, fh)
    fx = cx + rng.uniform(-0.04, 0.04) * fw
    fy = cy + rng.uniform(-0.04, 0.04) * fh
    # Shrink the canvas first (antialiased) so that the affine warp below is close to 1:1.
    shrink = max(1.0, min(fw, fh) / size)
    alpha = Image.fromarray(canvas)
    if shrink > 1.0:
        alpha = alpha.resize((max(1, round(canvas.shape[1] / shrink)), max(1, round(canvas.shape[0] / shrink))),
                             Image.Resampling.BILINEAR)
    sx, sy = alpha.size[0] / canvas.shape[1], alpha.size[1] / canvas.shape[0]
    # Output pixel (u, v) -> canvas (X, Y): Y = f + e v, X' = c + a u, X = X' + shear (Y - 30).
    a, c = fw / size, fx - fw / 2
    e, f = fh / size, fy - fh / 2
    coeffs = (a * sx, shear * e * sx, (c + shear * (f - 30.0)) * sx, 0.0, e * sy, f * sy)
    box = np.full((MAX_DIGITS, 4), np.nan, np.float32)
    box[:n] = np.stack([(boxes[:, 0] - c) / a, (boxes[:, 1] - f) / e, (boxes[:, 2] - boxes[:, 0]) / a,
                        (boxes[:, 3] - boxes[:, 1]) / e], 1)
    alpha = np.asarray(alpha.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR),
                       np.float32) / 255.0

    # Colours: background and ink with a luminance contrast of at least 0.3.
    bg = rng.uniform(0, 1, 3)
    fg = rng.uniform(0, 1, 3)
    for _ in range(20):
        if abs(_luminance(fg) - _luminance(bg)) >= 0.3:
            break
        fg = rng.uniform(0, 1, 3)
    else:
        fg = np.zeros(3) if _luminance(bg) >= 0.5 else np.ones(3)  # black or white: contrast >= 0.5
    # Background: a smooth low-frequency texture plus a gradient.
    cells = int(rng.integers(2, 7))
    noise = rng.normal(0, rng.uniform(0.03, 0.15), (cells, cells, 3))
    texture = np.stack([np.asarray(Image.fromarray(noise[..., ch].astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC)) for ch in range(3)], -1)
    angle = rng.uniform(0, 2 * np.pi)
    line = np.linspace(-0.5, 0.5, size)
    ramp = np.cos(angle) * line[None, :] + np.sin(angle) * line[:, None]
    image = bg[None, None, :] + texture + ramp[..., None] * rng.uniform(-0.3, 0.3, 3)[None, None, :]
    # Clutter strokes (lines of other colours), more with the loose framing's larger field of view.
    strokes = int(rng.integers(0, 4 if framing == "tight" else 7))
    if strokes:
        colours = []
        for _ in range(strokes):
            mask = Image.new("L", (size, size))
            ImageDraw.Draw(mask).line([tuple(rng.uniform(-0.2, 1.2, 2) * size) for _ in range(int(rng.integers(2, 4)))],
                                      fill=255, width=max(1, int(rng.uniform(0.01, 0.04) * size)))
            colours.append((np.asarray(mask, np.float32) / 255.0, rng.uniform(0, 1, 3), rng.uniform(0.15, 0.6)))
        for mask, colour, opacity in colours:
            m = (mask * opacity)[..., None]
            image = image * (1 - m) + colour[None, None, :] * m
    opacity = rng.uniform(0.8, 1.0)
    a3 = (alpha * opacity)[..., None]
    image = image * (1 - a3) + fg[None, None, :] * a3
    image = image + rng.normal(0, rng.uniform(0.0, 0.04), image.shape)
    out = Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8))
    radius = rng.uniform(0, 1.0) * size / 64
    if radius > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    label, length = encode_label("".join(str(int(labels[i])) for i in ids))
    return {"image": np.asarray(out, np.uint8), "label": label, "length": np.int32(length),
            "index": np.pad(ids, (0, MAX_DIGITS - n), constant_values=-1), "box": box}


class SvhnSynthDataset(_Base):
    """Synthetic house numbers from MNIST digits (task ``svhn_synth``); the `SvhnDataset` interface.

    ``config.data.source``: an MNIST folder of the four IDX files (or ``"tfds"``).
    """

    def __init__(self, config_data, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None):
        self._init_common(config_data, seed, global_batch_size, process_index, process_count, cache_dir)
        if self.task != "svhn_synth":
            raise ValueError(f"SvhnSynthDataset is for task 'svhn_synth', got {self.task!r} (use make_dataset)")
        if not self.params["source"]:
            raise SvhnSourceError("config.data.source is empty: the svhn_synth task composes MNIST digits; set "
                                  "--config.data.source to a folder with the four MNIST IDX files (e.g. "
                                  "../shared/data/mnist) or to 'tfds'")
        self._digits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._test_cache: dict[str, np.ndarray] | None = None
        self.test_checksum: str | None = None

    def mnist(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images uint8 (N, 28, 28), labels (N,), ink boxes (N, 4))`` of the MNIST ``split``."""
        if split not in self._digits:
            from stn_jax.paper.data.mnist import load_mnist

            images, labels = load_mnist(str(self.params["source"]), split)
            inks = np.array([ink_box(d) for d in images], np.int32).reshape(-1, 4)
            self._digits[split] = (np.asarray(images), np.asarray(labels), inks)
        return self._digits[split]

    def _make(self, entropy: list[int], split: str) -> dict[str, Any]:
        images, labels, inks = self.mnist(split)
        rng = np.random.default_rng(entropy)
        return synth_number(rng, images, labels, self.image_size, self.framing, int(self.params["max_length"]), inks)

    @staticmethod
    def _float(examples: list[dict[str, Any]], with_params: bool = False) -> dict[str, np.ndarray]:
        out = {"image": np.stack([e["image"] for e in examples]).astype(np.float32) / np.float32(255),
               "label": np.stack([e["label"] for e in examples]).astype(np.int32),
               "length": np.asarray([e["length"] for e in examples], np.int32)}
        if with_params:
            out["index"] = np.stack([e["index"] for e in examples])
        return out

    def train_batch(self, step: int, *, with_params: bool = False) -> dict[str, np.ndarray]:
        """This process's shard of the global batch of ``step`` (pure function of seed, step, process);
        ``with_params`` adds ``index`` (the MNIST train digits used, -1 padded)."""
        step = self._check_step(step)
        return self._float([self._make(stream_entropy(TRAIN_STREAM, self.seed, step, j), "train")
                            for j in self._rows()], with_params)

    @property
    def test_size(self) -> int:
        return int(self.params["test_size"]) if self.params["test_size"] != -1 else len(self.mnist("test")[0])

    @property
    def validation_size(self) -> int:
        return int(self.params["validation_size"])

    def _test_example(self, i: int) -> dict[str, Any]:
        return self._make(stream_entropy(TEST_STREAM, self.params["test_seed"], i), "test")

    def test_fingerprint(self) -> str:
        images, labels, _ = self.mnist("test")
        h = hashlib.sha256(images.tobytes())
        h.update(np.asarray(labels, np.int64).tobytes())
        ignored = ("source", "cache_dir", "validation_size", *EVALUATION_OPTIONS)
        content = {k: v for k, v in self.params.items() if k not in ignored}
        content.update(version=SYNTH_VERSION, mnist_test=h.hexdigest())
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def _cached_test(self) -> dict[str, np.ndarray] | None:
        """The whole test set as uint8, generated once and cached under ``cache_dir`` (None without one)."""
        if self.cache_dir is None:
            return None
        if self._test_cache is None:
            path = self.cache_dir / f"svhn_synth_test_{self.image_size}px_{self.framing}_{self.test_fingerprint()}.npz"
            meta_path = path.with_suffix(".json")
            if path.is_file() and meta_path.is_file():
                try:
                    with np.load(path) as f:
                        arrays = {k: f[k] for k in f.files}
                    recorded = json.loads(meta_path.read_text())["sha256"]
                except (OSError, ValueError, KeyError) as e:
                    raise SvhnFormatError(f"cached synthetic test set {path} is unreadable ({e}); delete it and "
                                          f"{meta_path} to regenerate") from None
                digest = array_digest(arrays)
                if digest != recorded:
                    raise SvhnFormatError(f"cached synthetic test set {path} has SHA-256 {digest} but {meta_path} "
                                          f"records {recorded}; delete both files to regenerate it")
            else:
                examples = [self._test_example(i) for i in range(self.test_size)]
                arrays = {"image": np.stack([e["image"] for e in examples]),
                          "label": np.stack([e["label"] for e in examples]).astype(np.int32),
                          "length": np.asarray([e["length"] for e in examples], np.int32)}
                digest = array_digest(arrays)
                meta = {"sha256": digest, "task": self.task, "examples": self.test_size, "version": SYNTH_VERSION,
                        "params": {k: v for k, v in self.params.items() if k != "cache_dir"}}
                atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
                atomic_write(meta_path, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
            self.test_checksum = digest
            log.info("svhn_synth test set: %d examples, sha256 %s (%s)", len(arrays["label"]), digest, path)
            self._test_cache = arrays
        return self._test_cache

    def test_examples(self, indices) -> dict[str, np.ndarray]:
        """Test numbers ``indices``: example ``i`` is a pure function of ``(test_seed, i)``."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.test_size):
            raise IndexError(f"test indices must be in [0, {self.test_size})")
        if not indices.size:
            return {k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}
        cached = self._cached_test()
        if cached is not None:
            return {"image": cached["image"][indices].astype(np.float32) / np.float32(255),
                    "label": cached["label"][indices], "length": cached["length"][indices]}
        return self._float([self._test_example(int(i)) for i in indices])

    def validation_examples(self, indices) -> dict[str, np.ndarray]:
        """Validation numbers (from the MNIST train digits, their own random stream)."""
        indices = np.asarray(indices, np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.validation_size):
            raise IndexError(f"validation indices must be in [0, {self.validation_size})")
        return self._float([self._make(stream_entropy(VALID_STREAM, self.params["test_seed"], int(i)), "train")
                            for i in indices]) if indices.size else {
            k: np.zeros((0,) + tuple(v.shape), v.dtype) for k, v in self.element_spec.items()}
