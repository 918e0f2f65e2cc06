"""Co-localisation's geometry and loss arithmetic (paper Appendix A.2): boxes, IoU, random patches, triplet terms.

Pure JAX functions, no registry: the ``triplet`` objective (`stn_jax.paper.objectives.Triplet`), the
``coloc_set`` data task (`stn_jax.paper.data.coloc`) and the ``coloc_st`` model
(`stn_jax.paper.models.coloc`) build on them; docs/coloc.md describes the method.

* `theta_to_box`, `iou`: boxes ``(x0, y0, x1, y1)`` in normalised [-1, 1] image
  coordinates (outer pixel edges, ``align_corners=False``).
* `patch_theta`: the random patches ``I_n^rand`` of the loss, placed inside the image.
* `unit_norm`: descriptors scaled to unit L2 norm, as a whole or part by part.
* `triplet_terms`: the paper's hinge
  ``sum_n sum_{m != n} max(0, |e(I_n^T) - e(I_m^T)|^2 - |e(I_n^T) - e(I_n^rand)|^2 + alpha)``
  per image, with its pair counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------
# Boxes.
# ----------------------------------------------------------------------------


def theta_to_box(theta: jax.Array) -> jax.Array:
    """Attention parameters ``(..., 3)`` = ``(s, t_x, t_y)`` -> the crop's box ``(..., 4)`` = ``(x0, y0, x1, y1)``.

    With ``align_corners=False`` the output grid's outer edges (+-1) map to ``t +- s``,
    so the crop covers exactly ``[t_x - s, t_x + s] x [t_y - s, t_y + s]`` of the input
    (normalised coordinates). A negative ``s`` (a mirrored crop) gives the same box.
    """
    s, tx, ty = theta[..., 0], theta[..., 1], theta[..., 2]
    s = jnp.abs(s)
    return jnp.stack([tx - s, ty - s, tx + s, ty + s], -1)


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of boxes ``(..., 4)`` = ``(x0, y0, x1, y1)`` (0 for disjoint or empty boxes)."""
    ix = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    iy = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = ix * iy
    area = lambda c: jnp.clip(c[..., 2] - c[..., 0], 0.0) * jnp.clip(c[..., 3] - c[..., 1], 0.0)
    union = area(a) + area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------
# The loss's random patches and hinge terms.
# ----------------------------------------------------------------------------


def patch_theta(u: jax.Array, scale: jax.Array) -> jax.Array:
    """Attention parameters ``(B, 3)`` of square patches of half-side ``scale`` ``(B,)`` inside the image.

    ``u`` ``(B, 3)`` uniform in [0, 1): the centre is ``t = (2 u[:, 1:] - 1) (1 - s)`` per axis
    (uniform over the positions that keep the patch inside; centred when ``s >= 1``).
    """
    s = jnp.abs(scale)
    room = jnp.clip(1.0 - s, 0.0)[:, None]
    return jnp.concatenate([s[:, None], (2.0 * u[:, 1:] - 1.0) * room], 1)


def unit_norm(desc: jax.Array, sizes: Sequence[int] | None = None) -> jax.Array:
    """``desc`` ``(B, D)`` divided by its L2 norm (``sqrt(|d|^2 + 1e-12)``: a zero vector stays zero).

    ``sizes``: the lengths of consecutive parts of the descriptor (summing to D); each part is then
    divided by its own norm, so that each has length 1 and the whole ``sqrt(len(sizes))``.
    """
    if sizes is None:
        return desc / jnp.sqrt(jnp.sum(desc ** 2, -1, keepdims=True) + 1e-12)
    sizes = [int(n) for n in sizes]
    if sum(sizes) != desc.shape[-1]:
        raise ValueError(f"descriptor parts of sizes {sizes} (sum {sum(sizes)}) do not make up its "
                         f"{desc.shape[-1]} numbers")
    parts = jnp.split(desc, np.cumsum(sizes)[:-1].tolist(), -1)
    return jnp.concatenate([unit_norm(p) for p in parts], -1)


def triplet_terms(desc_t: jax.Array, desc_rand: jax.Array, alpha: float, num_pairs: int = 0,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-image hinge sums and pair counts of the triplet loss.

    ``desc_t`` ``(B, D)`` the crops' descriptors e(I_n^T), ``desc_rand`` ``(B, D)`` the
    random patches' e(I_n^rand). Pairs: ``num_pairs = 0``: every ``m != n`` of the batch;
    ``k > 0``: ``m = n + 1, ..., n + k`` (mod B; the batch is a random draw, so these are
    random pairs). ``weights`` ``(B,)`` (e.g. the eval mask) weight image n's pairs by
    ``w_n w_m``. Returns ``(hinge (B,), pairs (B,))``: image n's summed hinge and its
    (weighted) number of pairs.
    """
    b = desc_t.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    d_rand = jnp.sum((desc_t - desc_rand) ** 2, -1)                       # (B,)
    if num_pairs <= 0 or num_pairs >= b - 1:
        sq = jnp.sum(desc_t ** 2, -1)
        d_pair = sq[:, None] + sq[None, :] - 2.0 * desc_t @ desc_t.T         # (B, B)
        d_pair = jnp.maximum(d_pair, 0.0)
        pair_w = w[:, None] * w[None, :] * (1.0 - jnp.eye(b, dtype=jnp.float32))
    else:
        shifts = range(1, num_pairs + 1)
        d_pair = jnp.stack([jnp.sum((desc_t - jnp.roll(desc_t, -k, 0)) ** 2, -1) for k in shifts], 1)
        pair_w = jnp.stack([w * jnp.roll(w, -k) for k in shifts], 1)       # (B, K)
    hinge = jnp.maximum(0.0, d_pair - d_rand[:, None] + alpha) * pair_w
    return hinge.sum(1), pair_w.sum(1)
