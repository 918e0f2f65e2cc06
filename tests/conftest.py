"""Shared fixtures and independent reference helpers for the stn_jax test suite, the shuffled order
(``STN_JAX_TEST_SHUFFLE=<seed>``) and the guard that restores global settings after every test.

Nothing here imports PyTorch at module level: `torch` is optional and only the
parity module (tests/test_torch_parity.py) needs it.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import ndimage

from stn_jax import CPU_SAMPLERS, use_cpu_sampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # config files import `configs.common`; experiments.* are run as modules
    sys.path.insert(0, str(ROOT))
# The project's real data beside a CI checkout; STN_JAX_SHARED=/elsewhere points the suite at another copy
# (or, e.g. STN_JAX_SHARED=/nonexistent, at none: the real-data tests then skip, saying why).
SHARED = Path(os.environ.get("STN_JAX_SHARED") or ROOT.parent / "shared")
# The four original MNIST IDX files (../shared/data/mnist; any copy of them works).
MNIST_DIR = SHARED / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
MODES = ("bilinear", "nearest")
PADDINGS = ("zeros", "border", "reflection")
ALIGN = (False, True)


# ---------------------------------------------------------------------------
# Test order and global settings.
# ---------------------------------------------------------------------------

# STN_JAX_TEST_SHUFFLE=<seed> runs the tests in a seeded random order (`pytest_collection_modifyitems`).
SHUFFLE_VARIABLE = "STN_JAX_TEST_SHUFFLE"
# Environment variables that change what the library or JAX computes; `restore_global_settings` guards them.
GUARDED_ENVIRONMENT = ("STN_JAX_", "JAX_", "XLA_")


def shuffle_seed() -> int | None:
    """The seed in ``$STN_JAX_TEST_SHUFFLE``, or None where it is unset or empty."""
    value = os.environ.get(SHUFFLE_VARIABLE, "")
    try:
        return int(value) if value else None
    except ValueError:
        raise pytest.UsageError(f"{SHUFFLE_VARIABLE} must be an integer seed, got {value!r}") from None


def _shuffle_note() -> str | None:
    seed = shuffle_seed()
    return None if seed is None else f"shuffled order: {SHUFFLE_VARIABLE}={seed} (set it again to repeat the order)"


def pytest_report_header(config: pytest.Config) -> str | None:
    return _shuffle_note()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    note = _shuffle_note()
    if note:
        terminalreporter.write_line(note)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``$STN_JAX_TEST_SHUFFLE`` set: the modules in a random order, each module's tests in a random order.

    The order is a function of the seed alone, so every pytest-xdist worker collects the same list (as
    xdist requires) and the run can be repeated; a module's tests stay together, so module-scoped fixtures
    are still built once per module and worker.
    """
    seed = shuffle_seed()
    if seed is None:
        return
    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    items[:] = [item for group in groups for item in group]


def _guarded_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(GUARDED_ENVIRONMENT)}


@pytest.fixture(autouse=True)
def restore_global_settings() -> Iterator[None]:
    """Every test ends with the JAX configuration and the ``STN_JAX_*``, ``JAX_*`` and ``XLA_*`` environment
    variables it started with, so that no test's result depends on the tests before it.

    A test that changes one and does not restore it gets a warning naming it; the value is restored and
    JAX's caches are cleared (a function compiled under a flag outside the cache keys, such as
    ``jax_disable_most_optimizations``, would otherwise keep running with it).
    """
    config, environment = dict(jax.config.values), _guarded_environment()
    yield
    changed = sorted(k for k, v in config.items() if jax.config.values.get(k) != v)
    for name in changed:
        jax.config.update(name, config[name])
    now = _guarded_environment()
    changed_environment = sorted(k for k in environment.keys() | now.keys() if environment.get(k) != now.get(k))
    for name in changed_environment:
        if name in environment:
            os.environ[name] = environment[name]
        else:
            del os.environ[name]
    if changed or changed_environment:
        jax.clear_caches()
        warnings.warn(f"the test changed and did not restore {', '.join(changed + changed_environment)} "
                      f"(restored, JAX's caches cleared)", stacklevel=1)


# ---------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST folder, for the ``@pytest.mark.real_data`` tests that need the original files; else skip."""
    missing = [f for f in MNIST_FILES if not (MNIST_DIR / f).is_file()]
    if missing:
        pytest.skip(f"real-data test: the MNIST folder {MNIST_DIR} lacks {', '.join(missing)} (it holds the four "
                    f"original MNIST files beside the project in CI; see its README, or set STN_JAX_SHARED)")
    return str(MNIST_DIR)


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory) -> str:
    """A folder of four small MNIST-format IDX files (`write_synthetic_mnist`): the default suite's data."""
    folder = tmp_path_factory.mktemp("synthetic_mnist")
    write_synthetic_mnist(folder)
    return str(folder)


def shared_path(relative: str) -> Path:
    """``../shared/<relative>`` (the project's data folder beside a CI checkout), or skip saying why.

    Tests that read real data take their paths from here and carry ``@pytest.mark.real_data``;
    a clone of the project without ``../shared`` skips them with this reason.
    """
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real-data test: {path} is absent (it exists beside the project in CI; see the data READMEs)")
    return path


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
    with use_cpu_sampler(request.param):
        yield request.param


# ---------------------------------------------------------------------------
# A synthetic MNIST: digit-like glyphs in the original file format.
# ---------------------------------------------------------------------------

# Each class is a few strokes (polylines in a unit box, y down), loosely the shape of the digit.
def _arc(cx, cy, rx, ry, start, stop, n=10):
    t = np.linspace(np.radians(start), np.radians(stop), n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


GLYPHS = {
    0: [_arc(0.5, 0.5, 0.32, 0.46, 0, 360, 20)],
    1: [np.array([[0.35, 0.2], [0.55, 0.0], [0.55, 1.0]])],
    2: [np.concatenate([_arc(0.5, 0.28, 0.3, 0.28, 190, 380), [[0.15, 1.0], [0.9, 1.0]]])],
    3: [_arc(0.45, 0.26, 0.3, 0.25, 210, 450), _arc(0.45, 0.74, 0.33, 0.26, 270, 510)],
    4: [np.array([[0.65, 1.0], [0.65, 0.0], [0.1, 0.68], [0.9, 0.68]])],
    5: [np.concatenate([[[0.85, 0.0], [0.25, 0.0], [0.2, 0.45]], _arc(0.48, 0.7, 0.34, 0.3, 240, 500)])],
    6: [np.concatenate([[[0.7, 0.0]], _arc(0.5, 0.7, 0.32, 0.3, 200, 560)])],
    7: [np.array([[0.1, 0.0], [0.9, 0.0], [0.4, 1.0]]), np.array([[0.35, 0.5], [0.75, 0.5]])],
    8: [_arc(0.5, 0.25, 0.26, 0.24, 0, 360, 16), _arc(0.5, 0.73, 0.32, 0.27, 0, 360, 16)],
    9: [np.concatenate([_arc(0.5, 0.3, 0.32, 0.3, 20, 380), [[0.82, 1.0]]])],
}


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 digit-like images and their labels (every class, in random order).

    Each image draws its class's strokes, anti-aliased, with a random scale,
    rotation, shear, offset, stroke width and brightness, and noisy ink; the
    glyph fills about 20x20 pixels near the centre (like MNIST's) and the
    background is exactly 0.
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(10), rng.integers(0, 10, n - 10)])[rng.permutation(n)].astype(np.uint8)
    ys, xs = np.mgrid[:28, :28].astype(np.float64)
    pix = np.stack([xs.ravel(), ys.ravel()], 1)  # (784, 2) pixel centres (x, y)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        angle, shear = np.radians(rng.uniform(-12, 12)), rng.uniform(-0.2, 0.2)
        size = rng.uniform(14, 18)
        linear = size * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
            np.array([[rng.uniform(0.75, 1.0), shear], [0.0, 1.0]])
        centre = np.array([13.5, 13.5]) + rng.uniform(-1.0, 1.0, 2)
        width = rng.uniform(0.9, 1.6)  # half-width of a stroke, pixels
        dist = np.full(len(pix), np.inf)
        for stroke in GLYPHS[int(label)]:
            pts = (stroke - 0.5) @ linear.T + centre + rng.normal(0, 0.3, stroke.shape)
            a, b = pts[:-1], pts[1:]
            ab = b - a
            t = np.clip(((pix[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)
            d = np.linalg.norm(pix[:, None] - (a + t[..., None] * ab), axis=-1).min(1)
            dist = np.minimum(dist, d)
        ink = np.clip(width + 0.5 - dist, 0, 1) * rng.uniform(0.75, 1.0)
        ink = ink * np.clip(rng.normal(1.0, 0.12, ink.shape), 0.5, 1.2)
        images[i] = np.clip(np.round(255 * ink), 0, 255).reshape(28, 28).astype(np.uint8)
    return images, labels


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """``<prefix>-images-idx3-ubyte.gz`` (magic 2051) and ``<prefix>-labels-idx1-ubyte.gz`` (magic 2049)."""
    n = len(labels)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 2051, n, 28, 28) + np.ascontiguousarray(images, np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 2049, n) + np.asarray(labels, np.uint8).tobytes())


def write_synthetic_mnist(folder: str | Path, train: int = 600, test: int = 200, seed: int = 0) -> Path:
    """Writes the four MNIST IDX files of a synthetic MNIST (`synthetic_digits`) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder, "train", *synthetic_digits(train, seed))
    write_idx(folder, "t10k", *synthetic_digits(test, seed + 1))
    return folder


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


@pytest.fixture
def cheap_compilation():
    """XLA with most optimisations off during a test (a whole module: ``pytestmark =
    pytest.mark.usefixtures("cheap_compilation")``): values the same to float tolerance, faster compilation.

    The flag is not part of JAX's compilation cache keys, so JAX's caches are cleared on entry and on exit:
    no function compiled with the optimisations runs inside the test, and none compiled without them runs
    after it (its floats differ in the last bits: other multiply-adds become fused multiply-adds).
    """
    previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
        jax.clear_caches()
