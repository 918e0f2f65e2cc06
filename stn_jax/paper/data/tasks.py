"""The data tasks, by name: the registry `TASKS`, `default_config` and `make_dataset`.

A task is what ``config.data.task`` names: its options with their defaults and
a constructor of the data set. Every data set has the same interface, which the
training loop, `experiments.show_data` and the benchmarks use:

* ``image_shape`` (per example, channels last), ``num_classes``,
  ``element_spec`` (name -> per-example `jax.ShapeDtypeStruct`), ``local_batch_size``;
* ``train_batch(step) -> dict[str, np.ndarray]``: this process's shard of the
  global batch of ``step``, a pure function of ``(seed, step, process)``;
* ``test_size`` and ``test_examples(indices) -> dict[str, np.ndarray]``: the
  fixed evaluation set, read by index (so that no process needs all of it at once).

Adding a task is one `register` call (see `stn_jax.paper.data.mnist_tasks`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from stn_jax.paper.registry import Registry

__all__ = ["EVALUATION_OPTIONS", "TASKS", "DataTask", "Dataset", "default_config", "make_dataset", "register",
           "resolve_options"]

# Options every task has that only `experiments.evaluate` reads; they change no data (no cache fingerprint
# hashes them).
EVALUATION_OPTIONS: Mapping[str, Any] = {
    "test_npz": "",  # score a .npz of `images` and `labels` instead of the test set (`stn_jax.paper.data.npz`)
}


class Dataset(Protocol):
    """What the training loop needs of a data set (see the module docstring)."""

    image_shape: tuple[int, ...]
    num_classes: int
    element_spec: Mapping[str, jax.ShapeDtypeStruct]
    local_batch_size: int
    test_size: int

    def train_batch(self, step: int) -> dict[str, np.ndarray]: ...

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class DataTask:
    """One data task.

    Attributes:
      name: registry key (``config.data.task``).
      title: the paper's name for it (tables and pictures).
      defaults: every option with its default (tags in the defining module's comments).
      make: ``make(options: dict, *, seed, global_batch_size, process_index, process_count, cache_dir) -> Dataset``.
      validate: ``validate(options) -> list of problems`` (empty when the options are fine).
      family: tasks of one family share models and configs (``"mnist"``, ``"addition"``, ...).
    """

    name: str
    title: str
    defaults: Mapping[str, Any]
    make: Callable[..., Dataset]
    validate: Callable[[dict[str, Any]], list[str]] = lambda options: []
    family: str = ""


TASKS: Registry[DataTask] = Registry("data task")


def register(task: DataTask) -> DataTask:
    """Adds ``task`` to `TASKS`, with `EVALUATION_OPTIONS` among its options."""
    return TASKS.register(task.name, dataclasses.replace(task, defaults={**task.defaults, **EVALUATION_OPTIONS}))


def default_config(task: str) -> ml_collections.ConfigDict:
    """The data section for ``task``: ``task`` and every option with its default."""
    return ml_collections.ConfigDict({"task": task, **TASKS.get(task).defaults})


def resolve_options(config_data: Any) -> dict[str, Any]:
    """The task's defaults overlaid with ``config_data`` (a ConfigDict or mapping with ``task``), validated.

    Raises ``ValueError`` in one line for an unknown task, an option the task
    does not have (listing those it has) or an invalid value.
    """
    given = config_data.to_dict() if hasattr(config_data, "to_dict") else dict(config_data)
    task = TASKS.get(given.get("task"))
    params = {"task": task.name, **task.defaults}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"config.data.{unknown[0]} is not an option of data task {task.name!r}; its options are "
                         f"{', '.join(sorted(params))}")
    for key, value in given.items():
        default = params[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"config.data.{key} must be True or False, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"config.data.{key} must be a number, got {value!r}")
        params[key] = value
    problems = task.validate(params)
    if problems:
        raise ValueError(f"config.data (task {task.name!r}): {problems[0]}")
    return params


def make_dataset(config_data: Any, *, seed: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """The data set ``config_data`` (``config.data``) describes.

    Args:
      config_data: a ConfigDict or dict with at least ``task``; missing options take the task's
        defaults; an option the task does not have is an error.
      seed: training seed (the test set does not depend on it).
      global_batch_size: examples per step over all processes.
      process_index, process_count: this process's shard of every batch.
      cache_dir: where fixed test sets and preprocessed data are cached (None: the options' ``cache_dir``).
    """
    params = resolve_options(config_data)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    return TASKS.get(params["task"]).make(params, seed=int(seed), global_batch_size=int(global_batch_size),
                                          process_index=int(process_index), process_count=int(process_count),
                                          cache_dir=cache_dir)
