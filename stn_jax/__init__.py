"""stn_jax: Spatial Transformer Networks in JAX.

The functional core, importable from here:

* sampling: `grid_sample`, `grid_sample_3d`, `warp`; the CPU lowering switch
  `use_cpu_sampler` (``"native"`` kernels or pure ``"xla"``), `cpu_sampler`, `CPU_SAMPLERS`;
* grids: `affine_grid`, `affine_grid_3d`, `attention_grid`, `projective_grid`,
  `tps_grid`, and the registry `TRANSFORMS` / `get_transform`;
* helpers: `compose_affine`, `invert_affine`, `compose_projective`,
  `invert_projective`, `attention_to_affine`, `projective_matrix`,
  `normalized_to_pixel`, `pixel_to_normalized`, `identity_grid`.
"""

from stn_jax._native import CPU_SAMPLERS, cpu_sampler, use_cpu_sampler
from stn_jax.coords import identity_grid, normalized_to_pixel, pixel_to_normalized
from stn_jax.sampler import grid_sample, grid_sample_3d, warp
from stn_jax.transforms import (
    TRANSFORMS,
    Transform,
    affine_grid,
    affine_grid_3d,
    attention_grid,
    attention_to_affine,
    compose_affine,
    compose_projective,
    default_control_points,
    get_transform,
    invert_affine,
    invert_projective,
    projective_grid,
    projective_matrix,
    tps_grid,
)

__version__ = "0.1.0"

__all__ = [
    "CPU_SAMPLERS", "TRANSFORMS", "Transform", "affine_grid", "affine_grid_3d", "attention_grid", "attention_to_affine",
    "compose_affine", "compose_projective", "cpu_sampler", "default_control_points", "get_transform", "grid_sample",
    "grid_sample_3d", "identity_grid", "invert_affine", "invert_projective", "normalized_to_pixel",
    "pixel_to_normalized", "projective_grid", "projective_matrix", "tps_grid", "use_cpu_sampler", "warp",
]
