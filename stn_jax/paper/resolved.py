"""The fully resolved config of a run and what it builds, shown without training (`experiments.show_config`).

`resolved_run(config)` completes a config (`stn_jax.paper.config.resolve`: every
default of the trainer, model, data task and objective), builds its model
abstractly (`nnx.eval_shape`: shapes only, no data read, nothing computed or
downloaded) on the input shape its data options give (`input_spec`), and
returns a `ResolvedRun`: the config with the width the model solves from its
parameter budget, and the model's parameters per optimiser group
(`stn_jax.paper.train_state.GROUPS`). Models that start from weight files
(the CUB models' ``pretrained`` ImageNet weights, ``head_init``) are counted on
random weights, which have the same shapes; the text says so. Training shows
the same text for the model it builds (`ResolvedRun.of_setup`) and records the
config in ``config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import nnx

from stn_jax.paper import models
from stn_jax.paper.config import resolve
from stn_jax.paper.data import cub, svhn
from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
from stn_jax.paper.train_state import ModelInfo, Setup, create_model, group_multipliers, model_info, with_solved_width

WEIGHT_FILE_OPTIONS = ("pretrained", "head_init")
"""Model options naming files of starting weights: blank (random weights of the same shapes) for counting."""


def input_spec(data: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """``(per-example input shape, number of classes)`` of a resolved data section, from its options alone.

    The shape is channels last (``(H, W, C)``; ``(D, H, W, C)`` for volumes); the classes are those of one
    label (SVHN: of each of its five digit positions; CUB: the kept classes, all 200 when ``classes`` is unset).
    """
    task = data["task"]
    mnist = MNIST_TASKS.get("coloc" if task == "coloc_set" else task)  # coloc_set: a fixed set of coloc images
    if mnist is not None:
        return tuple(int(n) for n in mnist.image_shape(dict(data))), mnist.num_classes
    if task in svhn.TASKS:
        size = int(data["image_size"])
        return (size, size, 3), svhn.NUM_CLASSES
    if task == cub.TASK:
        size = int(data["image_size"])
        ids = cub.parse_classes(data["classes"])
        return (size, size, 3), len(ids) if ids else cub.NUM_CLASSES_ALL
    raise ValueError(f"data task {task!r} has no input shape known without reading its data")


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """A resolved config (widths solved) and the model it builds.

    Attributes:
      config: `resolve`'s config with ``model.options.width`` solved (`with_solved_width`).
      input_shape: per-example input shape, channels last.
      num_classes: classes of one label.
      info: the model's summary, width and parameter counts (`stn_jax.paper.train_state.ModelInfo`).
      random_weights: weight-file options blanked for counting, with the value the run uses.
    """

    config: ml_collections.ConfigDict
    input_shape: tuple[int, ...]
    num_classes: int
    info: ModelInfo
    random_weights: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_setup(cls, s: Setup) -> ResolvedRun:
        """The run a training set-up has built (its data set gives the shapes)."""
        return cls(s.config, tuple(s.dataset.image_shape), int(s.dataset.num_classes), s.info)

    def text(self) -> str:
        """The config as ``config.json`` holds it, then the model and its parameters per group."""
        c, info = self.config, self.info
        spec = models.MODELS.get(c.model.name)
        transform = c.model.transform or None
        shape = "x".join(str(n) for n in self.input_shape)
        multipliers = group_multipliers(c.optimizer)
        width = max(len(f"{n:,}") for n in [*info.parameters.values(), info.other_variables])
        lines = ["config (every default filled, widths solved):", c.to_json_best_effort(indent=2),
                 f"model: {spec.display_name(transform)} ({c.model.name}{'/' + transform if transform else ''}) on "
                 f"data task {c.data.task}: input {shape}, {self.num_classes} classes"]
        if info.summary:
            lines.append(f"  {info.summary}")
        lines.append(f"parameters: {sum(info.parameters.values()):,} trained")
        lines += [f"  {group:<8} {count:>{width},}  learning rate x{multipliers[group]:g}"
                  for group, count in info.parameters.items()]
        if info.other_variables:
            lines.append(f"  {'fixed':<8} {info.other_variables:>{width},}  not trained (BatchNorm statistics, "
                         f"frozen weights)")
        if self.random_weights:
            given = ", ".join(f"model.options.{k}={v!r}" for k, v in self.random_weights.items())
            lines.append(f"  counted on random weights of the same shapes; the run loads {given}")
        return "\n".join(lines)


def resolved_run(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ResolvedRun:
    """The `ResolvedRun` of ``config``, from an abstract model (shapes only: no data read, nothing trained)."""
    config = resolve(config)
    shape, num_classes = input_spec(config.data)
    counted = config.copy_and_resolve_references()
    options = counted.model.options
    blanked = {k: options[k] for k in WEIGHT_FILE_OPTIONS if options.get(k)}
    for key in blanked:
        options[key] = ""
    info = model_info(nnx.eval_shape(lambda: create_model(counted, shape, num_classes)))
    return ResolvedRun(with_solved_width(config, info), shape, num_classes, info, blanked)
