"""Shared fixtures and independent reference helpers for the stn_jax test suite.

Nothing here imports PyTorch at module level: `torch` is optional and only the
parity module (tests/test_torch_parity.py) needs it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import ndimage

try:  # The native CPU kernels are optional; without them there is one lowering.
    from stn_jax._native import CPU_SAMPLERS, use_cpu_sampler
except ImportError:  # pragma: no cover - depends on the checkout
    CPU_SAMPLERS, use_cpu_sampler = ("default",), None

ROOT = Path(__file__).resolve().parents[1]
# The four original MNIST IDX files (../shared/data/mnist; any copy of them works).
if str(ROOT) not in sys.path:  # config files import `configs.common`; experiments.* are run as modules
    sys.path.insert(0, str(ROOT))
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")
ALIGN = (False, True)


# ---------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    missing = [f for f in MNIST_FILES if not (MNIST_DIR / f).is_file()]
    if missing:
        pytest.fail(f"the MNIST folder {MNIST_DIR} lacks {missing}: these tests read the four original MNIST "
                    f"files from ../shared/data/mnist (see its README), or from a folder you copy there")
    return str(MNIST_DIR)


@pytest.fixture
def x64():
    """Float64 enabled for the duration of the test, restored afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=CPU_SAMPLERS)
def cpu_sampler(request):
    """Runs the test once per CPU lowering of the sampler (native kernel, pure XLA).

    Functions traced inside the test use the chosen lowering; both must give the
    same answers, so tests that take this fixture check both.
    """
    ctx = use_cpu_sampler(request.param) if use_cpu_sampler is not None else contextlib.nullcontext()
    with ctx:
        yield request.param


# ---------------------------------------------------------------------------
# Layout helpers (PyTorch is NCHW / NCDHW; stn_jax is channels-last).
# ---------------------------------------------------------------------------


def to_torch(x, dtype=None, requires_grad=False):
    """Channels-last ``(N, *spatial, C)`` array -> channels-first torch tensor ``(N, C, *spatial)``."""
    import torch

    a = np.asarray(x)
    a = np.moveaxis(a, -1, 1) if a.ndim >= 3 else a
    t = torch.tensor(np.ascontiguousarray(a), dtype=dtype)
    return t.requires_grad_(requires_grad)


def from_torch(t) -> np.ndarray:
    """Channels-first torch tensor ``(N, C, *spatial)`` -> channels-last numpy ``(N, *spatial, C)``."""
    a = t.detach().cpu().numpy()
    return np.moveaxis(a, 1, -1)


# ---------------------------------------------------------------------------
# Independent coordinate conversion and a scipy reference sampler.
# ---------------------------------------------------------------------------


def to_pixel(coord, size: int, align_corners: bool) -> np.ndarray:
    """Normalised -> pixel coordinate (pixel i has centre i), in float64, written from the spec.

    align_corners=False: -1 and +1 are the outer edges: pixel = ((c + 1) * size - 1) / 2.
    align_corners=True: -1 and +1 are the centres of the end pixels: pixel = (c + 1) / 2 * (size - 1).
    """
    c = np.asarray(coord, np.float64)
    if align_corners:
        return (c + 1.0) / 2.0 * (size - 1)
    return ((c + 1.0) * size - 1.0) / 2.0


def to_normalized(pixel, size: int, align_corners: bool) -> np.ndarray:
    """Pixel -> normalised coordinate, float64 (inverse of `to_pixel`; size 1 with align_corners -> 0)."""
    p = np.asarray(pixel, np.float64)
    if align_corners:
        return np.zeros_like(p) if size == 1 else 2.0 * p / (size - 1) - 1.0
    return (2.0 * p + 1.0) / size - 1.0


def scipy_sample(image, grid, order: int, align_corners: bool) -> np.ndarray:
    """Reference sampler with zero padding via `scipy.ndimage.map_coordinates`.

    image ``(H, W, C)``, grid ``(..., 2)`` of normalised (x, y); returns ``(..., C)`` float64.
    ``map_coordinates`` indexes (row, col) = (y, x) in pixel units.
    """
    image = np.asarray(image, np.float64)
    h, w = image.shape[:2]
    grid = np.asarray(grid, np.float64)
    rows = to_pixel(grid[..., 1], h, align_corners).ravel()
    cols = to_pixel(grid[..., 0], w, align_corners).ravel()
    out = [ndimage.map_coordinates(image[..., c], [rows, cols], order=order, mode="constant", cval=0.0)
           for c in range(image.shape[-1])]
    return np.stack(out, -1).reshape(grid.shape[:-1] + (image.shape[-1],))


def interior_grid(rng, shape, h: int, w: int, align_corners: bool, avoid_ties: bool = False) -> np.ndarray:
    """Random normalised (x, y) points whose pixel coordinates lie in [0, W-1] x [0, H-1].

    With ``avoid_ties`` the fractional parts stay 0.1 away from .5 (so rounding
    to the nearest pixel is unambiguous whatever the tie rule).
    """
    px = rng.uniform(0, w - 1, shape)
    py = rng.uniform(0, h - 1, shape)
    if avoid_ties:
        px, py = _away_from_half(px, w), _away_from_half(py, h)
    return np.stack([to_normalized(px, w, align_corners), to_normalized(py, h, align_corners)], -1)


def _away_from_half(p, n):
    frac = p - np.floor(p)
    bad = np.abs(frac - 0.5) < 0.1
    return np.where(bad, np.clip(np.floor(p) + 0.25, 0, n - 1), p)


def off_lattice_pixels(rng, shape, low: int, high: int) -> np.ndarray:
    """Pixel coordinates ``k + f`` with integer k in [low, high] and f in [0.15, 0.35] U [0.65, 0.85].

    They stay >= 0.15 pixel away from every integer and half-integer, i.e. from
    every kink of bilinear interpolation, clipping (integers) and reflection
    (integers with align_corners, half-integers without), so finite differences
    with small steps never cross one.
    """
    k = rng.integers(low, high + 1, shape)
    f = rng.uniform(0.15, 0.35, shape) + 0.5 * rng.integers(0, 2, shape)
    return k + f


def for_each_padding(sample, **options):
    """One jitted function returning ``[sample(x, grid, padding_mode=p, **options) for p in PADDINGS]``.

    Compiling the three paddings together is several times cheaper than
    running them eagerly one by one (every eager operation compiles on its own).
    """
    import jax

    return jax.jit(lambda x, grid: [sample(x, grid, padding_mode=p, **options) for p in PADDINGS])
