"""Co-localisation's loss at hand-placed crops, with no training: which crops the triplet loss prefers.

    python -m experiments.coloc_losses --config configs/colocalisation.py:t,8 \\
        --config.data.source=../shared/data/mnist [--config.<key>=<value> ...] \\
        [--descriptors=hidden1,hidden2,logits --descriptors=logits] [--normalize=none,whole,per_part] \\
        [--patch_scales=range,crop,fixed] [--out table.md]

Builds the run's data set and model as training does (`stn_jax.paper.train_state.setup` of the resolved
config: the fixed images, the frozen encoder of ``model.options.encoder``), trains nothing, and scores crops
placed by hand with the objective's own evaluation (`stn_jax.paper.evaluation.evaluate`, the triplet
objective's ``eval_sums(model, batch, theta)``): the same hinge, margin ``alpha``, pairs (``num_pairs``,
within each evaluation batch), normalisation, and random patches placed by the evaluation's fixed uniforms.
Each number is the mean hinge per pair over the set: the ``loss`` that training logs and evaluates.

It prints a caption, a markdown table header and one row per combination of descriptor
(``--descriptors``, repeatable: ``model.options.descriptor`` values) x normalisation (``--normalize``) x
random patch (``--patch_scales``: ``objective.patch_scale`` values ``range``, ``crop``, ``fixed``); each
flag left out keeps the config's own setting. ``--out`` also writes them to a file.

Columns: one crop theta = (s, t_x, t_y) per image, in normalised coordinates (the image spans [-1, 1], the
crop ``[t - s, t + s]`` per axis):

* ``digit frame``: the digit's frame (``batch["box"]``, 28x28): centred on it, s its half-side (28/84 = 1/3);
* ``whole image``: s = 1, t = 0 (the identity);
* ``empty``: a crop of the frame's size in the image corner diagonally opposite the digit's quadrant,
  ``t = -(1 - s) sign(c)`` per axis for the digit's centre c (sign 0 counts as +): it never overlaps the
  frame (on TC it may hold clutter);
* ``s=0.20`` ... ``s=1.00``: crops centred on the digit with half-side s (`CENTRED_SCALES`);
* ``start``: the untrained model's own crops (the config's ``init_scale``, t = 0: where step 0 starts).

Normalisations (`NORMALIZATIONS`, the objective's ``normalize`` and ``normalize_parts``): ``none`` (the
paper's plain distance), ``whole`` (the descriptor scaled to unit length), ``per_part`` (each part, e.g.
hidden1, hidden2 and logits, scaled to unit length before the concatenation), ``per_part+whole`` (both);
``true`` and ``false`` stand for ``whole`` and ``none``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.cli import run

if TYPE_CHECKING:  # the trainer's modules load in the functions (importing this module stays cheap)
    from stn_jax.paper.evaluation import Run
    from stn_jax.paper.train_state import Setup

CENTRED_SCALES = (0.2, 0.27, 0.33, 0.4, 0.5, 0.7, 1.0)
"""Half-sides of the crops centred on the digit (``s=...`` columns; the digit's frame has 1/3)."""
COLUMNS = ("digit frame", "whole image", "empty", *(f"s={s:.2f}" for s in CENTRED_SCALES), "start")
NORMALIZATIONS: dict[str, tuple[bool, bool]] = {"none": (False, False), "whole": (True, False),
                                                "per_part": (False, True), "per_part+whole": (True, True)}
"""``--normalize`` names -> the objective's ``(normalize, normalize_parts)``."""
ALIASES = {"true": "whole", "false": "none"}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when run as a program: importing the module defines none)."""
    config_flags.DEFINE_config_file("config", None, "Co-localisation config file (configs/colocalisation.py:t,8).",
                                    lock_config=False,
                                    accept_new_attributes=True)  # keys are checked by stn_jax.paper.config.resolve
    flags.DEFINE_multi_string("descriptors", None, "A model.options.descriptor value, e.g. "
                              "hidden1,hidden2,logits; repeat the flag for several (default: the config's).")
    flags.DEFINE_list("normalize", None, f"Normalisations: {', '.join(NORMALIZATIONS)} (true = whole, false = "
                      f"none; default: the config's).")
    flags.DEFINE_list("patch_scales", None, "objective.patch_scale values: range, crop, fixed (default: the "
                      "config's).")
    flags.DEFINE_string("out", None, "Also write the caption and the table to this markdown file.")
    flags.mark_flags_as_required(["config"])


@dataclasses.dataclass(frozen=True)
class Row:
    """One combination's losses (mean hinge per pair), by column (`COLUMNS`)."""

    descriptor: str
    normalization: str
    patch: str
    losses: Mapping[str, float]

    def markdown(self) -> str:
        cells = [self.descriptor.replace(",", "+"), self.normalization, self.patch]
        return "| " + " | ".join(cells + [f"{self.losses[c]:.3f}" for c in COLUMNS]) + " |"


def table_header() -> str:
    """The markdown header (and its rule) of `Row.markdown` rows."""
    names = ["descriptor", "normalize", "random patch", *COLUMNS]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def normalization_name(objective: Mapping[str, Any]) -> str:
    """The `NORMALIZATIONS` name of an objective's ``normalize`` and ``normalize_parts``."""
    key = (bool(objective["normalize"]), bool(objective.get("normalize_parts", False)))
    return next(name for name, value in NORMALIZATIONS.items() if value == key)


def patch_label(objective: Mapping[str, Any]) -> str:
    """How the random patch is drawn, for the table: ``U[0.25, 0.5]``, ``crop's size``, ``fixed 0.333``."""
    mode = objective["patch_scale"]
    if mode == "range":
        return f"U[{objective['patch_min_scale']:g}, {objective['patch_max_scale']:g}]"
    return "crop's size" if mode == "crop" else f"fixed {objective['patch_fixed_scale']:.3g}"


def placements(box: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
    """The hand-placed crops ``(N, 3)`` of every column (`COLUMNS`, module docstring) for digit frames
    ``box`` ``(N, 4)`` = ``(x0, y0, x1, y1)`` and the untrained model's crops ``start`` ``(N, 3)``."""
    box = np.asarray(box, np.float32)
    centre = (box[:, :2] + box[:, 2:]) / 2
    half = ((box[:, 2] - box[:, 0]) + (box[:, 3] - box[:, 1])) / 4

    def at(s: float | np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.column_stack([np.broadcast_to(np.asarray(s, np.float32), half.shape), t]).astype(np.float32)

    away = -np.where(centre >= 0, 1.0, -1.0) * (1.0 - half)[:, None]  # the corner opposite the digit's quadrant
    out = {"digit frame": at(half, centre), "whole image": at(1.0, np.zeros_like(centre)), "empty": at(half, away)}
    out.update({f"s={s:.2f}": at(s, centre) for s in CENTRED_SCALES})
    out["start"] = np.asarray(start, np.float32)
    return out


class PlacedCrops:
    """A data set's test set whose examples also carry the crop to score, ``theta`` (`evaluate`'s interface)."""

    def __init__(self, dataset: Any, theta: np.ndarray):
        self.dataset, self.theta = dataset, np.asarray(theta, np.float32)

    @property
    def test_size(self) -> int:
        return self.dataset.test_size

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {**self.dataset.test_examples(indices), "theta": self.theta[np.asarray(indices)]}


def placed_run(s: Setup) -> Run:
    """The `stn_jax.paper.evaluation.Run` of setup ``s`` whose evaluation step scores each batch's ``theta``
    (the objective's ``eval_sums(model, batch, theta)``) instead of the model's crops."""
    from stn_jax.paper.evaluation import Run, make_mesh, make_picture_step

    @jax.jit
    def eval_step(params, model_state, batch):
        return s.objective.eval_sums(s.merge(params, model_state, train=False), batch, batch["theta"])

    return Run(s, make_mesh(), eval_step, make_picture_step(s))


def score_crops(s: Setup) -> dict[str, dict[str, float]]:
    """The objective's evaluation (``loss``, ``mean_iou``, ...) of every column's crops (`placements`) on the
    test set of setup ``s``, with its untrained state."""
    from stn_jax.paper.evaluation import check_batch_sizes, evaluate

    check_batch_sizes(s.config)
    placed = placed_run(s)
    dataset = s.dataset
    state = jax.device_put(s.state, placed.replicated)
    images = dataset.test_examples(np.arange(dataset.test_size))
    thetas, _ = jax.device_get(placed.picture_step(state.params, state.model_state, images["image"]))
    return {name: evaluate(placed, state, PlacedCrops(dataset, theta))
            for name, theta in placements(images["box"], np.asarray(thetas[0])).items()}


def variant(config: ml_collections.ConfigDict, descriptor: str | None = None, normalization: str | None = None,
            patch_scale: str | None = None) -> ml_collections.ConfigDict:
    """The resolved ``config`` with ``model.options.descriptor``, the objective's normalisation (a
    `NORMALIZATIONS` name or alias) and ``objective.patch_scale`` replaced where given."""
    from stn_jax.paper.config import resolve

    c = resolve(config)
    if descriptor is not None:
        c.model.options.descriptor = descriptor
    if normalization is not None:
        name = ALIASES.get(normalization.lower(), normalization.lower())
        if name not in NORMALIZATIONS:
            raise ValueError(f"--normalize: unknown normalisation {normalization!r}; choose from "
                             f"{', '.join([*NORMALIZATIONS, *ALIASES])}")
        c.objective.normalize, c.objective.normalize_parts = NORMALIZATIONS[name]
    if patch_scale is not None:
        c.objective.patch_scale = patch_scale
    return resolve(c)


def landscape(config: ml_collections.ConfigDict, descriptors: Sequence[str | None] = (None,),
              normalizations: Sequence[str | None] = (None,),
              patch_scales: Sequence[str | None] = (None,)) -> Iterator[Row]:
    """One `Row` per combination (None: the config's setting), descriptor by descriptor: the run's set-up
    (`stn_jax.paper.train_state.setup`) is built once per descriptor, with each combination's objective."""
    from stn_jax.paper.objectives import create_objective
    from stn_jax.paper.train_state import setup

    if variant(config).objective.name != "triplet":
        raise ValueError(f"objective {config.objective.name!r}: coloc_losses scores co-localisation (triplet) runs")
    combos = list(itertools.product(normalizations, patch_scales))
    for descriptor in descriptors:
        configs = [variant(config, descriptor, n, p) for n, p in combos]  # checks every option before any work
        base = setup(configs[0])
        for c in configs:
            s = dataclasses.replace(base, config=c, objective=create_objective(c.objective))
            losses = {name: result["loss"] for name, result in score_crops(s).items()}
            yield Row(c.model.options.descriptor, normalization_name(c.objective), patch_label(c.objective), losses)


def caption(config: ml_collections.ConfigDict) -> str:
    """What the table measures, in one paragraph."""
    c = variant(config)
    d, o, m = c.data, c.objective, c.model.options
    pairs = "every pair m != n" if o.num_pairs <= 0 else f"{o.num_pairs} rolled partners per image"
    return (f"Triplet loss (mean hinge per pair, alpha = {o.alpha:g}, {pairs}; random patches from the "
            f"evaluation's fixed uniforms) of hand-placed crops, no training: {d.task}, "
            f"{'TC' if d.num_clutter else 'T'}, class {d.digit_class}, {d.test_size} images, encoder {m.encoder}; "
            f"start = the untrained model's crops (s = {m.init_scale:g}, t = 0).")


def main(argv: list[str]) -> None:
    del argv
    text = [caption(FLAGS.config), "", table_header()]
    print("\n".join(text), flush=True)
    for row in landscape(FLAGS.config, FLAGS.descriptors or [None], FLAGS.normalize or [None],
                         FLAGS.patch_scales or [None]):
        text.append(row.markdown())
        print(text[-1], flush=True)
    if FLAGS.out:
        out = Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    define_flags()
    run(main)
