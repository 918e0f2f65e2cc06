"""The MNIST-family data tasks (paper Sect. 4.1, Appendix A.1-A.3), registered in `stn_jax.paper.data.TASKS`.

Each task is a distortion of MNIST digits (`stn_jax.paper.data.distortions`)
plus its options; `stn_jax.paper.data.pipeline.MnistDataset` turns any of them
into deterministic, sharded batches and a fixed, cached test set.

Options carry the provenance tags [P], [S], [R], [U] (defined in `stn_jax.paper`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from stn_jax.paper.data import distortions as D
from stn_jax.paper.data.tasks import EVALUATION_OPTIONS, DataTask, register

# Options every MNIST-family task has.
COMMON: dict[str, Any] = {
    "source": "tfds",          # "tfds" or a folder with the four MNIST IDX files (offline: ../shared/data/mnist)
    "tfds_data_dir": "",       # "" = tfds' default (~/tensorflow_datasets)
    "tfds_manual_dir": "",     # folder with the four original .gz files: tfds prepares from them, offline
    "cache_dir": "",           # fixed test sets are cached here; "" = the trainer's <workdir>/data
    "test_seed": 2015,         # [U] fixed, independent of the training seed: the same test set for every model
    "test_size": 10_000,       # [U] one distorted copy per MNIST test digit, at most the split; -1 = the whole split
    "generator_device": "cpu",  # "cpu" (same bits on every machine) or "default" (the default JAX device)
    "prefetch": True,          # dispatch the next training batch while the current one is used
}
# Options that do not change the generated data (the source's content enters the test-set fingerprint
# through its digest; generator_device is assumed not to change the bits, which holds for the default "cpu").
NO_CONTENT = ("source", "tfds_data_dir", "tfds_manual_dir", "cache_dir", "generator_device", "prefetch",
              *EVALUATION_OPTIONS)


@dataclasses.dataclass(frozen=True)
class MnistTask:
    """How one MNIST-family task makes an example.

    Attributes:
      example: ``example(r, index, src, p) -> (image, label, extras, params)``: ``r`` a
        `distortions.Draws`, ``index`` the source digit, ``src`` the source arrays (``images`` uint8
        (N, 28, 28), ``labels`` int32 (N,), ``ink`` float32 (N, 4)), ``p`` the options.
      words: ``words(p)``: random uint32 words the distortion reads.
      image_shape: ``image_shape(p)``: per-example shape, channels last.
      num_classes: label classes.
      extras: extra per-example outputs (name -> shape, float32), e.g. co-localisation's boxes.
      digit_class: whether the task can be restricted to one digit class (``digit_class`` option).
    """

    example: Callable
    words: Callable[[dict], int]
    image_shape: Callable[[dict], tuple[int, ...]]
    num_classes: int = 10
    extras: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    digit_class: bool = False


MNIST_TASKS: dict[str, MnistTask] = {}


def _digit(src, i):
    return src["images"][i].astype(jnp.float32) / 255.0


def _plain(distort: Callable) -> Callable:
    """An example whose label is the source digit's: ``distort(r, index, src, p) -> (image, params)``."""
    def example(r, i, src, p):
        image, params = distort(r, i, src, p)
        return image, src["labels"][i], {}, params
    return example


def _square(channels: int = 1):
    return lambda p: (p["canvas_size"], p["canvas_size"], channels)


def _rts_options(p):
    return dict(canvas_size=p["canvas_size"], max_angle=p["max_angle"], min_scale=p["min_scale"],
                max_scale=p["max_scale"], keep_inside=bool(p["keep_inside"]))


def _scale_problems(p) -> list[str]:
    ok = 0 < p["min_scale"] <= p["max_scale"]
    return [] if ok else [f"need 0 < min_scale <= max_scale, got {p['min_scale']}, {p['max_scale']}"]


def _clutter_problems(p) -> list[str]:
    out = []
    if not D.DIGIT <= p["canvas_size"]:
        out.append(f"canvas_size must be >= {D.DIGIT}, got {p['canvas_size']}")
    if not 1 <= p["clutter_size"] <= min(D.DIGIT, p["canvas_size"]):
        out.append(f"clutter_size must be in [1, {min(D.DIGIT, p['canvas_size'])}], got {p['clutter_size']}")
    if p["num_clutter"] < 0:
        out.append(f"num_clutter must be >= 0, got {p['num_clutter']}")
    return out


def _common_problems(p) -> list[str]:
    out = []
    if not (p["test_size"] == -1 or p["test_size"] >= 1):
        out.append(f"test_size must be -1 or >= 1, got {p['test_size']}")
    if p["generator_device"] not in ("cpu", "default"):
        out.append(f"generator_device must be 'cpu' or 'default', got {p['generator_device']!r}")
    if "canvas_size" in p and p["canvas_size"] < 1:
        out.append(f"canvas_size must be >= 1, got {p['canvas_size']}")
    return out


def register_mnist_task(name: str, title: str, family: str, options: dict[str, Any], task: MnistTask,
                        validate: Callable[[dict], list[str]] = lambda p: []) -> None:
    """Registers an MNIST-family task: its options (besides `COMMON`) and how it makes an example."""

    def make(params, **kw):
        from stn_jax.paper.data.pipeline import MnistDataset

        return MnistDataset(params, task, **kw)

    MNIST_TASKS[name] = task
    register(DataTask(name, title, {**COMMON, **options}, make, lambda p: _common_problems(p) + validate(p), family))


# -- the tasks ---------------------------------------------------------------

register_mnist_task("r", "R", "mnist", {
    "canvas_size": 28,     # [U] not stated (28 or 42); 28 = the MNIST frame
    "max_angle": 90.0,     # [S, quoted verbatim in a GitHub issue] rotation U[-90, 90] degrees
}, MnistTask(
    _plain(lambda r, i, src, p: D.rotated(r, _digit(src, i), canvas_size=p["canvas_size"], max_angle=p["max_angle"])),
    lambda p: D.words_needed("r"), _square()))

_RTS = {
    "canvas_size": 42,     # [S][R] 42x42
    "max_angle": 45.0,     # [S][R] rotation U[-45, 45] degrees
    "min_scale": 0.7,      # [S][R] scale U[0.7, 1.2]
    "max_scale": 1.2,
    "keep_inside": True,   # [U] position uniform among those keeping the digit's (transformed) ink box inside
}
register_mnist_task("rts", "RTS", "mnist", _RTS, MnistTask(
    _plain(lambda r, i, src, p: D.rts(r, _digit(src, i), src["ink"][i], **_rts_options(p))),
    lambda p: D.words_needed("rts"), _square()), _scale_problems)

register_mnist_task("p", "P", "mnist", {
    "canvas_size": 28,     # [U] not stated
    "min_scale": 0.75,     # [S: 'to verify'; independent MATLAB generator] scale U[0.75, 1.0]
    "max_scale": 1.0,
    "corner_sigma": 5.0,   # [S: 'to verify'] each of the 4 corners moved by N(0, 5 px)
}, MnistTask(
    _plain(lambda r, i, src, p: D.projective(r, _digit(src, i), canvas_size=p["canvas_size"],
                                             min_scale=p["min_scale"], max_scale=p["max_scale"],
                                             corner_sigma=p["corner_sigma"])),
    lambda p: D.words_needed("p"), _square()), _scale_problems)

register_mnist_task("e", "E", "mnist", {
    "canvas_size": 28,     # [U] not stated
    "min_scale": 0.75,     # [U: our recollection] scale U[0.75, 1.0]
    "max_scale": 1.0,
    "tps_grid_size": 4,    # [U] 16 control points [S] on a regular 4x4 grid [U]
    "tps_sigma": 1.5,      # [S] control points moved by N(0, 1.5 px)
}, MnistTask(
    _plain(lambda r, i, src, p: D.elastic(r, _digit(src, i), canvas_size=p["canvas_size"], min_scale=p["min_scale"],
                                          max_scale=p["max_scale"], tps_grid_size=p["tps_grid_size"],
                                          tps_sigma=p["tps_sigma"])),
    lambda p: D.words_needed("e", tps_grid_size=p["tps_grid_size"]), _square()), _scale_problems)

register_mnist_task("tc", "TC", "mnist", {
    "canvas_size": 60,     # [S][R] 60x60
    "num_clutter": 6,      # [S][R] six patches
    "clutter_size": 6,     # [S][R] 6x6, cut from random training digits
}, MnistTask(
    _plain(lambda r, i, src, p: D.translated_cluttered(r, _digit(src, i), src["images"],
                                                       canvas_size=p["canvas_size"], num_clutter=p["num_clutter"],
                                                       clutter_size=p["clutter_size"])),
    lambda p: D.words_needed("tc", num_clutter=p["num_clutter"]), _square()), _clutter_problems)


def _addition(r, i, src, p):
    other = r.randint(0, src["images"].shape[0])
    pair = jnp.stack([i, other])
    digits = jnp.stack([_digit(src, i), _digit(src, other)])
    inks = jnp.stack([src["ink"][i], src["ink"][other]])
    image, params = D.addition(r, digits, inks, **_rts_options(p))
    params["labels"] = src["labels"][pair]
    return image, params["labels"].sum(), {}, params


# Appendix A.1: two RTS digits (the RTS options apply to each), label = their sum (0..18).
register_mnist_task("addition", "Addition", "addition", dict(_RTS), MnistTask(
    _addition, lambda p: D.words_needed("addition"), _square(2), num_classes=19), _scale_problems)


def _volume_problems(p) -> list[str]:
    out = []
    if p["volume_size"] < D.DIGIT:
        out.append(f"volume_size must be >= {D.DIGIT}, got {p['volume_size']}")
    if not 1 <= p["extrude_depth"] <= p["volume_size"]:
        out.append(f"extrude_depth must be in [1, volume_size], got {p['extrude_depth']}")
    return out


register_mnist_task("mnist3d", "3-D", "mnist3d", {
    "volume_size": 60,     # [P] 60x60x60 voxels
    "extrude_depth": 12,   # [U] depth of the extruded digit, in voxels
    "rotate_3d": False,    # [U] one secondary summary says the digit is also rotated in 3-D; off by default
    "max_angle_3d": 45.0,  # [U] Euler angles U[-a, a] when rotate_3d
    "test_size": 1_000,    # [U] 1,000 volumes (864 MB as float32); 10,000 would need 8.6 GB
}, MnistTask(
    _plain(lambda r, i, src, p: D.volume(r, _digit(src, i), src["ink"][i], volume_size=p["volume_size"],
                                         extrude_depth=p["extrude_depth"], rotate_3d=bool(p["rotate_3d"]),
                                         max_angle_3d=p["max_angle_3d"])),
    lambda p: D.words_needed("mnist3d"), lambda p: (p["volume_size"],) * 3 + (1,)), _volume_problems)


def _coloc(r, i, src, p):
    image, params = D.colocalisation(r, _digit(src, i), src["ink"][i], src["images"], canvas_size=p["canvas_size"],
                                     num_clutter=p["num_clutter"], clutter_size=p["clutter_size"])
    return image, src["labels"][i], {"box": params.pop("box"), "ink_box": params.pop("ink_box")}, params


def _coloc_problems(p) -> list[str]:
    ok = -1 <= p["digit_class"] <= 9
    return _clutter_problems(p) + ([] if ok else [f"digit_class must be -1 (all) or 0-9, got {p['digit_class']}"])


register_mnist_task("coloc", "Co-localisation", "coloc", {
    "canvas_size": 84,     # [P] 84x84
    "num_clutter": 0,      # [P] 0 for the "T" data; 16 for "TC"
    "clutter_size": 6,     # [P] 6x6 crops of training digits
    "digit_class": -1,     # [P] each run uses one class (0-9); -1 = all classes
}, MnistTask(_coloc, lambda p: D.words_needed("coloc", num_clutter=p["num_clutter"]), _square(),
             extras={"box": (4,), "ink_box": (4,)}, digit_class=True), _coloc_problems)
