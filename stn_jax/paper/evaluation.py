"""A run on the device mesh (`Run`, `open_run`) and its evaluation: a test set's metrics, a saved run's score.

* **Mesh.** A 1-D device mesh with axis ``"data"`` over all devices of all
  processes; each batch is sharded along its first axis, the state is
  replicated. Each process builds only its shard of every batch.
* `evaluate(run, state)`: the objective's metrics over the whole test set (or
  a `stn_jax.paper.data.npz.ArrayTestSet`), every example counted once.
* `evaluate_checkpoint(config, workdir)`: the newest restorable checkpoint of a
  training run, scored on its test set or on ``config.data.test_npz``; each
  setting that differs from the run's ``config.json`` is announced as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stn_jax.paper.checkpoints import checkpoint_manager, restore_latest
from stn_jax.paper.config import resolve
from stn_jax.paper.data.npz import ArrayTestSet, load_npz_test_set
from stn_jax.paper.train_state import Setup, TrainState, setup
from stn_jax.paper.workdir import check_same_experiment, config_changes

log = logging.getLogger(__name__)


def make_mesh() -> Mesh:
    """All devices of all processes on one ``"data"`` axis (Auto: the compiler propagates shardings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Every batch size divides over the devices (so that no example is dropped and no step fails late)."""
    n = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n:
            raise ValueError(f"config.{key}={config[key]} must be divisible by the number of devices ({n})")


def make_eval_step(s: Setup) -> Callable:
    """``(params, model_state, batch) -> sums`` of the objective's metrics over the batch (jitted)."""

    @jax.jit
    def eval_step(params, model_state, batch):
        return s.objective.eval_sums(s.merge(params, model_state, train=False), batch)

    return eval_step


def make_picture_step(s: Setup) -> Callable:
    """``(params, model_state, images) -> (thetas, warped)``: each transformer's parameters and output (jitted)."""

    @jax.jit
    def picture_step(params, model_state, images):
        _, aux = s.merge(params, model_state, train=False)(images, return_aux=True)
        return aux["theta"], aux["warped"]

    return picture_step


@dataclasses.dataclass
class Run:
    """A run's set-up, its mesh, its evaluation step and its picture step (`make_eval_step`, `make_picture_step`)."""

    setup: Setup
    mesh: Mesh
    eval_step: Callable
    picture_step: Callable

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The resolved config, with the width the model solved (`stn_jax.paper.train_state.Setup`)."""
        return self.setup.config

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's shard -> a global array sharded over the mesh's data axis."""
        return {k: jax.make_array_from_process_local_data(self.sharded, np.asarray(v)) for k, v in local.items()}


def open_run(config: ml_collections.ConfigDict, workdir: Path) -> Run:
    """Builds the run of a resolved config: data (cached under ``config.data.cache_dir``, else ``workdir/data``),
    model, mesh, steps."""
    s = setup(config, cache_dir=str(workdir / "data"))
    return Run(s, make_mesh(), make_eval_step(s), make_picture_step(s))


def evaluate(run: Run, state: TrainState, dataset=None) -> dict[str, float]:
    """The objective's metrics over a whole test set (default the run's); each process feeds its share.

    Batches of ``eval_batch_size`` cover indices ``[start, start + eval_batch_size)``;
    padding examples past the end have ``mask`` 0, so every example counts once.
    """
    dataset = dataset or run.setup.dataset
    n = dataset.test_size
    batch_size = run.config.eval_batch_size
    per_process = batch_size // jax.process_count()
    me = jax.process_index()
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = start + np.arange(me * per_process, (me + 1) * per_process)
        valid = idx < n
        local = dict(dataset.test_examples(np.where(valid, idx, 0)))
        local["mask"] = valid.astype(np.float32)
        out = jax.device_get(run.eval_step(state.params, state.model_state, run.global_batch(local)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return run.setup.objective.summarize(totals)


def npz_test_set(path: str | Path, run: Run) -> ArrayTestSet:
    """``config.data.test_npz`` checked against the run's data set (image shape, label shape, classes) by
    `load_npz_test_set`; refused for objectives that score more than images and labels (co-localisation's
    triplet objective reads boxes)."""
    objective = run.setup.objective
    if not objective.scores_labels:
        raise ValueError(f"config.data.test_npz: objective {objective.name!r} scores more than images and labels, "
                         f"so a file of images and labels cannot be evaluated; leave test_npz unset")
    dataset = run.setup.dataset
    return load_npz_test_set(path, tuple(dataset.image_shape), dataset.num_classes,
                             tuple(dataset.element_spec["label"].shape))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Restores the newest restorable checkpoint in ``workdir`` and evaluates it (test set or ``data.test_npz``).

    Refuses (`stn_jax.paper.workdir.WorkdirError`) a config of another model or data task than the run's;
    warns about each other setting that differs from the run's ``config.json``.
    """
    config = resolve(config)
    check_batch_sizes(config)
    workdir = Path(workdir).expanduser().absolute()
    directory = workdir / "checkpoints"
    if not directory.is_dir() or not checkpoint_manager(workdir, 1, create=False).all_steps():
        raise FileNotFoundError(f"no checkpoint in {directory}: train first with "
                                f"`python -m experiments.train --config ... --workdir {workdir}`")
    check_same_experiment(config, workdir)
    run = open_run(config, workdir)
    for change in config_changes(run.config, workdir):
        log.warning("evaluating with a setting other than the run's config.json: %s", change)
    npz = config.data.get("test_npz")
    test = npz_test_set(npz, run) if npz else None
    state = restore_latest(run, checkpoint_manager(workdir, config.keep_checkpoints, create=False), run.setup.state)
    return evaluate(run, state, test)
