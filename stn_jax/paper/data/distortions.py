"""The paper's MNIST distortions as pure JAX functions of a PRNG key (paper Sect. 4.1, Appendix A.1-A.3).

Every function makes **one** example from one key; the pipeline maps them over
a batch with `jax.lax.map` inside one `jax.jit` (one example per iteration, so
an example's bits do not depend on the batch size or the process's shard). Geometric distortions are built
with stn_jax's own transforms and sampler: each is a map from output (canvas)
coordinates to digit coordinates, turned into a sampling grid by
`affine_grid` / `projective_grid` / `tps_grid` / `affine_grid_3d` and read with
`grid_sample` / `grid_sample_3d` (zero padding, ``align_corners=False``).

Conventions:

* ``digit`` is one MNIST image, float32 ``(28, 28)`` in [0, 1]; outputs are
  float32 channels-last in [0, 1] with background 0.
* Pixel coordinates put the centre of pixel ``i`` at ``i`` and pixel ``i``
  covers ``[i - 0.5, i + 0.5]`` (`stn_jax.coords`, ``align_corners=False``), so
  the digit's 28x28 frame spans ``[-0.5, 27.5]`` and its centre is 13.5.
* ``ink`` is the digit's ink bounding box in those pixel coordinates,
  ``(x0, y0, x1, y1)`` = outer edges of the first and last non-zero columns/rows
  (`ink_boxes`).
* Angles are in degrees; a positive angle turns the digit clockwise on screen
  (x right, y down).
* Each function returns ``(image, params)``; ``params`` holds the drawn
  distortion parameters (for tests and pictures).

Randomness: every function takes ``rng``, either a `jax.random` key or a
`Draws` tape of uint32 words (``jax.random.bits``) from which it reads its
numbers in a fixed order: uniforms from 24 bits, integers by modulo (bias
below 2e-5 for ranges up to 60,000), normals by Box-Muller.
`words_needed(task, ...)` says how many words an example uses. The pipeline
draws one ``(batch, words)`` block with a single ``jax.random.bits`` call
and hands row ``i`` to example ``i``: XLA compiles one threefry instead of one
per random call, which keeps compile times near a second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax.sampler import grid_sample, grid_sample_3d
from stn_jax.transforms import affine_grid, affine_grid_3d, default_control_points, projective_grid, tps_grid

DIGIT = 28
_CENTRE = (DIGIT - 1) / 2  # 13.5: centre of the digit frame in pixel coordinates


# ----------------------------------------------------------------------------
# Randomness.
# ----------------------------------------------------------------------------


class Draws:
    """A tape of uint32 random words read in order (a pure-JAX value; the cursor is trace-time Python)."""

    def __init__(self, words):
        self.words = jnp.asarray(words)
        if self.words.dtype != jnp.uint32 or self.words.ndim != 1:
            raise ValueError(f"Draws needs a 1-D uint32 array of random words, got {self.words.dtype} "
                             f"{self.words.shape}")
        self.used = 0

    @classmethod
    def from_key(cls, key, n: int) -> Draws:
        return cls(jax.random.bits(key, (max(n, 1),), jnp.uint32))

    def take(self, n: int) -> jax.Array:
        if self.used + n > self.words.shape[0]:
            raise ValueError(f"not enough random words: need more than {self.words.shape[0]} "
                             f"(used {self.used}, asked {n}); see words_needed()")
        out = self.words[self.used:self.used + n]
        self.used += n
        return out

    def uniform(self, low=0.0, high=1.0, shape=()) -> jax.Array:
        """Uniform in ``[low, high)`` (24-bit resolution)."""
        n = int(np.prod(shape))
        u = (self.take(n) >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
        return (low + u * (high - low)).reshape(shape)

    def randint(self, low: int, high: int, shape=()) -> jax.Array:
        """Integers in ``[low, high)`` (static bounds), int32."""
        n = int(np.prod(shape))
        w = self.take(n) % np.uint32(high - low)
        return (w.astype(jnp.int32) + low).reshape(shape)

    def normal(self, shape=()) -> jax.Array:
        """Standard normals by Box-Muller (two words per pair of normals)."""
        n = int(np.prod(shape))
        pairs = (n + 1) // 2
        w = self.take(2 * pairs).reshape(2, pairs)
        u1 = 1.0 - (w[0] >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)  # (0, 1]
        u2 = (w[1] >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
        r = jnp.sqrt(-2.0 * jnp.log(u1))
        z = jnp.concatenate([r * jnp.cos(2 * np.pi * u2), r * jnp.sin(2 * np.pi * u2)])
        return z[:n].reshape(shape)


def _draws(rng, n: int) -> Draws:
    if isinstance(rng, Draws):
        return rng
    rng = jnp.asarray(rng) if not hasattr(rng, "dtype") else rng
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return Draws.from_key(rng, n)
    return Draws(rng)


def words_needed(task: str, *, num_clutter: int = 0, tps_grid_size: int = 4) -> int:
    """Random words one example of ``task`` reads (not counting the pipeline's digit index)."""
    per_task = {
        "r": 1,
        "rts": 4,
        "p": 1 + 8,
        "e": 1 + 2 * ((tps_grid_size ** 2 * 2 + 1) // 2),
        "tc": 2 + 5 * num_clutter,
        "coloc": 2 + 5 * num_clutter,
        "addition": 1 + 2 * 4,
        "mnist3d": 6,
    }
    if task not in per_task:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(per_task)}")
    return per_task[task]


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def ink_boxes(images: np.ndarray) -> np.ndarray:
    """Ink bounding boxes ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in pixel coordinates (outer edges).

    A blank image gets the whole frame ``(-0.5, -0.5, 27.5, 27.5)``.
    """
    images = np.asarray(images)
    n, h, w = images.shape
    rows, cols = images.any(axis=2), images.any(axis=1)
    blank = ~rows.any(axis=1)
    r0, r1 = rows.argmax(1), h - 1 - rows[:, ::-1].argmax(1)
    c0, c1 = cols.argmax(1), w - 1 - cols[:, ::-1].argmax(1)
    box = np.stack([c0 - 0.5, r0 - 0.5, c1 + 0.5, r1 + 0.5], 1).astype(np.float32)
    box[blank] = (-0.5, -0.5, w - 0.5, h - 0.5)
    return box


def _pixel_to_normalized(sizes) -> np.ndarray:
    """``(n+1, n+1)`` homogeneous matrix: pixel coordinates -> normalised, per axis size (x, y[, z] order)."""
    n = len(sizes)
    m = np.eye(n + 1)
    for a, s in enumerate(sizes):
        m[a, a], m[a, n] = 2.0 / s, 1.0 / s - 1.0
    return m


def pixel_map_to_theta(linear, offset, src_sizes, dst_sizes) -> jax.Array:
    """The normalised ``theta`` of the pixel-space map ``p_src = linear @ p_dst + offset``.

    Args:
      linear: ``(n, n)``; offset: ``(n,)``; both map output (canvas) pixel
        coordinates to source (digit) pixel coordinates, in (x, y[, z]) order.
      src_sizes, dst_sizes: sizes per coordinate, (x, y[, z]) order, i.e. (W, H[, D]).

    Returns:
      ``(n, n + 1)`` affine parameters for `affine_grid` (n = 2) or `affine_grid_3d` (n = 3).
    """
    n = len(src_sizes)
    m = jnp.concatenate([jnp.concatenate([linear, offset[:, None]], 1),
                         jnp.eye(n + 1, dtype=linear.dtype)[n:]], 0)
    to_src = jnp.asarray(_pixel_to_normalized(src_sizes), linear.dtype)
    from_dst = jnp.asarray(np.linalg.inv(_pixel_to_normalized(dst_sizes)), linear.dtype)
    return (to_src @ m @ from_dst)[:n]


def rotation(angle_deg) -> jax.Array:
    """2x2 rotation by ``angle_deg`` (clockwise on screen with y down)."""
    a = jnp.deg2rad(angle_deg)
    c, s = jnp.cos(a), jnp.sin(a)
    return jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])])


def rotation_3d(angles_deg) -> jax.Array:
    """3x3 rotation ``R_z @ R_y @ R_x`` from angles (about x, y, z) in degrees."""
    ax, ay, az = (jnp.deg2rad(angles_deg[i]) for i in range(3))
    one, zero = jnp.ones_like(ax), jnp.zeros_like(ax)
    rx = jnp.array([[one, zero, zero], [zero, jnp.cos(ax), -jnp.sin(ax)], [zero, jnp.sin(ax), jnp.cos(ax)]])
    ry = jnp.array([[jnp.cos(ay), zero, jnp.sin(ay)], [zero, one, zero], [-jnp.sin(ay), zero, jnp.cos(ay)]])
    rz = jnp.array([[jnp.cos(az), -jnp.sin(az), zero], [jnp.sin(az), jnp.cos(az), zero], [zero, zero, one]])
    return rz @ ry @ rx


def _sample2d(digit, theta, size, mode="bilinear") -> jax.Array:
    grid = affine_grid(theta, (size, size))
    out = grid_sample(digit[..., None], grid, mode=mode, padding_mode="zeros")
    return jnp.clip(out, 0.0, 1.0)


def _position_inside(u, extent_low, extent_high, canvas: int, keep_inside: bool):
    """Canvas pixel position ``t`` of the digit centre, uniform over the positions that keep
    ``[t + extent_low, t + extent_high]`` inside the canvas ``[-0.5, canvas - 0.5]`` (per axis).

    Where the extent is larger than the canvas, the digit is centred. With
    ``keep_inside=False`` ``t`` is uniform over the whole canvas.
    """
    if not keep_inside:
        return -0.5 + u * canvas
    lo = -0.5 - extent_low
    hi = canvas - 0.5 - extent_high
    return jnp.where(hi >= lo, lo + u * (hi - lo), 0.5 * (lo + hi))


def _box_corners(ink) -> jax.Array:
    """The 4 corners of an ink box relative to the digit centre, ``(4, 2)``."""
    x0, y0, x1, y1 = ink[0], ink[1], ink[2], ink[3]
    return jnp.stack([jnp.stack([x0, y0]), jnp.stack([x1, y0]), jnp.stack([x0, y1]),
                      jnp.stack([x1, y1])]) - _CENTRE


# ----------------------------------------------------------------------------
# R, RTS, P, E (paper Sect. 4.1).
# ----------------------------------------------------------------------------


def rotated(rng, digit, *, canvas_size: int = 28, max_angle: float = 90.0):
    """R: the digit rotated about its centre by ``U[-max_angle, max_angle]`` degrees, centred on the canvas."""
    r = _draws(rng, words_needed("r"))
    angle = r.uniform(-max_angle, max_angle)
    centre = jnp.full((2,), (canvas_size - 1) / 2, jnp.float32)
    linear = rotation(-angle)  # canvas -> digit: the inverse rotation
    offset = _CENTRE - linear @ centre
    theta = pixel_map_to_theta(linear, offset, (DIGIT, DIGIT), (canvas_size, canvas_size))
    return _sample2d(digit, theta, canvas_size), {"angle": angle}


def rts(rng, digit, ink, *, canvas_size: int = 42, max_angle: float = 45.0, min_scale: float = 0.7,
        max_scale: float = 1.2, keep_inside: bool = True):
    """RTS: rotation ``U[-max_angle, max_angle]``, scale ``U[min_scale, max_scale]``, uniform random position.

    The digit is rotated and scaled about its frame centre, which lands at a
    canvas position drawn uniformly among those that keep the transformed ink
    bounding box inside the canvas (``keep_inside``; otherwise anywhere on the
    canvas, so digits can be cut by the edge). ``params["centre"]`` is that
    position in canvas pixel coordinates (x, y).
    """
    r = _draws(rng, words_needed("rts"))
    angle = r.uniform(-max_angle, max_angle)
    scale = r.uniform(min_scale, max_scale)
    u = r.uniform(shape=(2,))
    corners = (scale * _box_corners(ink)) @ rotation(angle).T  # forward map of the ink box, relative to the centre
    centre = _position_inside(u, corners.min(0), corners.max(0), canvas_size, keep_inside)
    linear = rotation(-angle) / scale
    offset = _CENTRE - linear @ centre
    theta = pixel_map_to_theta(linear, offset, (DIGIT, DIGIT), (canvas_size, canvas_size))
    return _sample2d(digit, theta, canvas_size), {"angle": angle, "scale": scale, "centre": centre}


def _inverse3(m) -> jax.Array:
    """Inverse of a 3x3 matrix by its adjugate (closed form: cheap to compile)."""
    a, b, c = m[0, 0], m[0, 1], m[0, 2]
    d, e, f = m[1, 0], m[1, 1], m[1, 2]
    g, h, i = m[2, 0], m[2, 1], m[2, 2]
    adj = jnp.array([[e * i - f * h, c * h - b * i, b * f - c * e],
                     [f * g - d * i, a * i - c * g, c * d - a * f],
                     [d * h - e * g, b * g - a * h, a * e - b * d]])
    det = a * adj[0, 0] + b * adj[1, 0] + c * adj[2, 0]
    return adj / det


def square_to_quad(quad) -> jax.Array:
    """The homography (3x3) taking the square's corners ``(-1,-1), (1,-1), (1,1), (-1,1)`` to ``quad`` ``(4, 2)``.

    Heckbert's closed form (unit square to quadrilateral), composed with the
    map from [-1, 1]^2 to the unit square.
    """
    x, y = quad[:, 0], quad[:, 1]
    dx1, dx2, dx3 = x[1] - x[2], x[3] - x[2], x[0] - x[1] + x[2] - x[3]
    dy1, dy2, dy3 = y[1] - y[2], y[3] - y[2], y[0] - y[1] + y[2] - y[3]
    den = dx1 * dy2 - dx2 * dy1
    g = (dx3 * dy2 - dx2 * dy3) / den
    h = (dx1 * dy3 - dx3 * dy1) / den
    unit = jnp.array([[x[1] - x[0] + g * x[1], x[3] - x[0] + h * x[3], x[0]],
                      [y[1] - y[0] + g * y[1], y[3] - y[0] + h * y[3], y[0]],
                      [g, h, jnp.ones_like(g)]])
    to_unit = jnp.array([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], quad.dtype)
    return unit @ to_unit


_SQUARE = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], np.float32)


def projective(rng, digit, *, canvas_size: int = 28, min_scale: float = 0.75, max_scale: float = 1.0,
               corner_sigma: float = 5.0):
    """P: scale ``U[min_scale, max_scale]`` about the centre, then each frame corner moved by ``N(0, sigma)`` px.

    The forward map is the homography taking the digit frame's corners to the
    four moved corners on the canvas; the sampling grid (`projective_grid`)
    uses its inverse, normalised to ``h33 = 1``. If the moved corners are
    degenerate (practically never) the example falls back to the plain scaling.
    """
    r = _draws(rng, words_needed("p"))
    scale = r.uniform(min_scale, max_scale)
    noise = r.normal((4, 2)) * (corner_sigma * 2.0 / canvas_size)  # px -> canvas normalised units
    ratio = DIGIT / canvas_size  # the digit frame's half-width in canvas normalised units, before scaling
    canvas_corners = scale * ratio * jnp.asarray(_SQUARE) + noise
    inverse = _inverse3(square_to_quad(canvas_corners))  # canvas -> digit (normalised)
    h = (inverse / inverse[2, 2]).reshape(-1)[:8]
    k = 1.0 / (scale * ratio)
    zero = jnp.zeros((), jnp.float32)
    plain = jnp.stack([k, zero, zero, zero, k, zero, zero, zero])
    h = jnp.where(jnp.all(jnp.isfinite(h)), h, plain)
    grid = projective_grid(h, (canvas_size, canvas_size))
    image = jnp.clip(grid_sample(digit[..., None], grid, padding_mode="zeros"), 0.0, 1.0)
    return image, {"scale": scale, "corner_offsets_px": noise * (canvas_size / 2.0), "homography": h}


def elastic(rng, digit, *, canvas_size: int = 28, min_scale: float = 0.75, max_scale: float = 1.0,
            tps_grid_size: int = 4, tps_sigma: float = 1.5):
    """E: scale ``U[min_scale, max_scale]``, then a thin-plate spline whose ``g x g`` control points
    (a regular grid over the canvas, `default_control_points`) are moved by ``N(0, tps_sigma)`` px.

    The offsets are applied in the sampling direction: the spline sends
    control point ``c_k`` of the output to ``c_k + delta_k`` of the scaled
    digit (`tps_grid` with offsets). The inverse of a small symmetric
    perturbation is, to first order, the same perturbation with the sign
    flipped, so the distribution of warps is the same either way.
    """
    r = _draws(rng, words_needed("e", tps_grid_size=tps_grid_size))
    scale = r.uniform(min_scale, max_scale)
    points = default_control_points(tps_grid_size)
    offsets = r.normal(points.shape) * (tps_sigma * 2.0 / canvas_size)  # px -> canvas normalised units
    grid = tps_grid(offsets, (canvas_size, canvas_size), control_points=points)
    grid = grid * (canvas_size / (DIGIT * scale))  # canvas normalised -> digit normalised (undo the scaling)
    image = jnp.clip(grid_sample(digit[..., None], grid, padding_mode="zeros"), 0.0, 1.0)
    return image, {"scale": scale, "control_offsets_px": offsets * (canvas_size / 2.0)}


# ----------------------------------------------------------------------------
# Translation and clutter (TC, co-localisation).
# ----------------------------------------------------------------------------


def translate(digit, top_left, canvas_size: int, method: str = "slice") -> jax.Array:
    """The 28x28 digit pasted with its top-left pixel at integer ``top_left = (x, y)``, ``(S, S, 1)``.

    An integer translation is an exact copy of the pixels. ``method="slice"``
    (the default) writes them with `jax.lax.dynamic_update_slice`;
    ``method="sampler"`` builds the translation's affine grid and samples with
    `grid_sample` (nearest). Both give the same array (tested); slicing is
    10-20x faster on CPU because the sampler visits every canvas pixel.
    ``top_left`` must keep the digit inside the canvas.
    """
    if method == "sampler":
        offset = -top_left.astype(jnp.float32)
        theta = pixel_map_to_theta(jnp.eye(2, dtype=jnp.float32), offset, (DIGIT, DIGIT),
                                   (canvas_size, canvas_size))
        return _sample2d(digit, theta, canvas_size, mode="nearest")
    if method != "slice":
        raise ValueError(f"method must be 'slice' or 'sampler', got {method!r}")
    canvas = jnp.zeros((canvas_size, canvas_size), digit.dtype)
    return jax.lax.dynamic_update_slice(canvas, digit, (top_left[1], top_left[0]))[..., None]


def clutter(rng, sources, *, canvas_size: int, num: int, size: int = 6) -> jax.Array:
    """``num`` random ``size x size`` crops of random source digits, added at random canvas positions.

    As in DeepMind's mnist-cluttered generator: the source digits are drawn
    from the whole split, crop windows and canvas positions are uniform integer
    positions, overlapping crops add up and the sum is clipped to 1. Crops and
    pastes are integer array slices (exact). Returns ``(S, S, 1)``.
    """
    canvas = jnp.zeros((canvas_size, canvas_size), jnp.float32)
    if num == 0:
        return canvas[..., None]
    r = _draws(rng, 5 * num)
    idx = r.randint(0, sources.shape[0], (num,))
    src = r.randint(0, DIGIT - size + 1, (num, 2))
    dst = r.randint(0, canvas_size - size + 1, (num, 2))
    for i in range(num):
        crop = jax.lax.dynamic_slice(sources[idx[i]], (src[i, 1], src[i, 0]), (size, size))
        crop = crop.astype(jnp.float32) / 255.0
        here = jax.lax.dynamic_slice(canvas, (dst[i, 1], dst[i, 0]), (size, size))
        canvas = jax.lax.dynamic_update_slice(canvas, here + crop, (dst[i, 1], dst[i, 0]))
    return jnp.minimum(canvas, 1.0)[..., None]


def translated_cluttered(rng, digit, sources, *, canvas_size: int = 60, num_clutter: int = 6,
                         clutter_size: int = 6):
    """TC: the 28x28 digit at a uniform random integer position on the canvas (fully inside) plus clutter.

    ``params["top_left"]`` is the digit frame's top-left pixel (x, y).
    """
    r = _draws(rng, words_needed("tc", num_clutter=num_clutter))
    top_left = r.randint(0, canvas_size - DIGIT + 1, (2,))
    image = translate(digit, top_left, canvas_size)
    image = jnp.minimum(image + clutter(r, sources, canvas_size=canvas_size, num=num_clutter, size=clutter_size),
                        1.0)
    return image, {"top_left": top_left}


def colocalisation(rng, digit, ink, sources, *, canvas_size: int = 84, num_clutter: int = 0,
                   clutter_size: int = 6):
    """Co-localisation: like TC on an 84x84 canvas, with the digit's boxes.

    ``params`` hold ``box`` (the digit's 28x28 frame) and ``ink_box`` (its
    tight ink box), both ``(x0, y0, x1, y1)`` in normalised [-1, 1] canvas
    coordinates (outer pixel edges, `stn_jax.coords` with
    ``align_corners=False``): the attention parameters that crop the frame
    are ``s = (x1 - x0) / 2`` and ``t = ((x0 + x1) / 2, (y0 + y1) / 2)``.
    """
    image, params = translated_cluttered(rng, digit, sources, canvas_size=canvas_size, num_clutter=num_clutter,
                                         clutter_size=clutter_size)
    tl = params["top_left"].astype(jnp.float32)
    frame = jnp.concatenate([tl - 0.5, tl + DIGIT - 0.5])
    ink_px = ink + jnp.concatenate([tl, tl])
    to_norm = lambda p: (2.0 * p + 1.0) / canvas_size - 1.0
    params["box"] = to_norm(frame)
    params["ink_box"] = to_norm(ink_px)
    return image, params


# ----------------------------------------------------------------------------
# MNIST addition (paper Appendix A.1) and 3-D MNIST (Appendix A.3).
# ----------------------------------------------------------------------------


def addition(rng, digits, inks, **rts_options):
    """Two independently RTS-distorted digits as the two channels: ``(S, S, 2)``.

    ``digits`` is ``(2, 28, 28)``, ``inks`` ``(2, 4)``; options as in `rts`.
    Reads 8 words (4 per digit).
    """
    r = _draws(rng, 2 * words_needed("rts"))
    first, p0 = rts(r, digits[0], inks[0], **rts_options)
    second, p1 = rts(r, digits[1], inks[1], **rts_options)
    return jnp.concatenate([first, second], -1), jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)


def volume(rng, digit, ink, *, volume_size: int = 60, extrude_depth: int = 12, rotate_3d: bool = False,
           max_angle_3d: float = 45.0):
    """3-D MNIST: the digit extruded ``extrude_depth`` voxels along depth, at a random place in a cube.

    Output ``(D, H, W, 1)`` with ``D = H = W = volume_size``; depth is the
    first spatial axis (z), the digit lies in the (y, x) planes.

    Without ``rotate_3d`` the extruded 28x28xdepth block is placed at a uniform
    random integer position, fully inside (an exact copy of the digit in every
    slice it covers, written with `jax.lax.dynamic_update_slice`). With
    ``rotate_3d`` the block is also rotated about its centre by Euler angles
    each ``U[-max_angle_3d, max_angle_3d]`` (R_z R_y R_x), then placed at a
    uniform random position that keeps the rotated ink box inside, and sampled
    trilinearly (`affine_grid_3d` + `grid_sample_3d`).
    ``params["centre"]`` is the block centre in voxel coordinates (x, y, z).
    """
    size = volume_size
    r = _draws(rng, words_needed("mnist3d"))
    if not rotate_3d:
        top_left = r.randint(0, size - DIGIT + 1, (2,))
        z0 = r.randint(0, size - extrude_depth + 1)
        block = jnp.broadcast_to(digit[None, :, :, None], (extrude_depth, DIGIT, DIGIT, 1))
        vol = jax.lax.dynamic_update_slice(jnp.zeros((size, size, size, 1), digit.dtype), block,
                                           (z0, top_left[1], top_left[0], 0))
        centre = jnp.concatenate([top_left.astype(jnp.float32) + _CENTRE,
                                  (z0 + (extrude_depth - 1) / 2)[None].astype(jnp.float32)])
        return vol, {"centre": centre, "angles": jnp.zeros(3, jnp.float32)}
    angles = r.uniform(-max_angle_3d, max_angle_3d, (3,))
    u = r.uniform(shape=(3,))
    rot = rotation_3d(angles)
    src = jnp.broadcast_to(digit[None, :, :, None], (extrude_depth, DIGIT, DIGIT, 1))
    src_centre = jnp.array([_CENTRE, _CENTRE, (extrude_depth - 1) / 2], jnp.float32)
    x0, y0, x1, y1 = ink[0], ink[1], ink[2], ink[3]
    zlo, zhi = -0.5, extrude_depth - 0.5
    corners = jnp.stack([jnp.stack([x, y, jnp.asarray(z, jnp.float32)])
                         for x in (x0, x1) for y in (y0, y1) for z in (zlo, zhi)]) - src_centre
    moved = corners @ rot.T
    centre = _position_inside(u, moved.min(0), moved.max(0), size, True)
    linear = rot.T
    offset = src_centre - linear @ centre
    theta = pixel_map_to_theta(linear, offset, (DIGIT, DIGIT, extrude_depth), (size, size, size))
    grid = affine_grid_3d(theta, (size, size, size))
    vol = jnp.clip(grid_sample_3d(src, grid, mode="trilinear", padding_mode="zeros"), 0.0, 1.0)
    return vol, {"centre": centre, "angles": angles}
