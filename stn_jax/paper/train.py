"""The training and evaluation loop: one loop for every experiment config.

``train_and_evaluate(config, workdir)`` trains the model a config describes on
the data it describes, on every device of every process, and evaluates it.

* **Parallelism.** A 1-D device mesh with axis ``"data"`` over all devices of
  all processes; each batch is sharded along its first axis, parameters and
  optimiser state are replicated; one `jax.jit`-compiled step. Each process
  builds only its shard of every batch (`stn_jax.data`), and the global batch
  is the same whatever the number of processes or devices, so losses match a
  single-device run to float tolerance.
* **Optimiser.** optax SGD with momentum and the paper's step schedule
  (``lr * decay_factor ** (step // decay_every)``), a separate learning-rate
  multiplier for the localisation networks (their parameters are
  `stn_jax.layers.LocalisationParam`), optional weight decay.
* **Determinism and resumption.** Per-step randomness is
  ``fold_in(key(seed), step)`` and a batch is a pure function of (seed, step),
  so a run restarted from its latest checkpoint sees exactly what an
  uninterrupted run would: on CPU the final parameters are bit-identical.
  Orbax checkpoints are written every ``checkpoint_every`` steps and at the
  end; a run started again in the same workdir resumes.
* **Safety.** A non-finite loss stops the run with a message naming the step;
  the update of that step is discarded and nothing after the last good
  checkpoint is saved. Implicit host-device transfers inside the loop are
  errors (``jax.transfer_guard("disallow")``).
* **Records.** The workdir gets the resolved config (``config.json``), the
  package versions (``versions.json``), ``metrics.jsonl``, TensorBoard events
  (loss, errors, learning rate, images/s, transform-parameter statistics and
  histograms, input/transformer-output pictures with the sampling grid drawn)
  and the same pictures as PNGs under ``images/``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from stn_jax import data as data_lib
from stn_jax import models
from stn_jax.layers import LocalisationParam
from stn_jax.summaries import MetricsWriter, Progress
from stn_jax.visualize import transformer_panel

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into the configured model."""


# ----------------------------------------------------------------------------
# Model, optimiser, state.
# ----------------------------------------------------------------------------


def make_schedule(opt: ml_collections.ConfigDict):
    """``learning_rate * decay_factor ** (step // decay_every)``: the paper's step schedule."""
    return optax.exponential_decay(opt.learning_rate, transition_steps=opt.decay_every,
                                   decay_rate=opt.decay_factor, staircase=True)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum; localisation parameters get ``loc_lr_multiplier`` times the rate."""
    schedule = make_schedule(opt)

    def sgd(multiplier: float):
        scaled = lambda step: multiplier * schedule(step)
        parts = [optax.add_decayed_weights(opt.weight_decay)] if opt.weight_decay else []
        return optax.chain(*parts, optax.sgd(scaled, momentum=opt.momentum or None, nesterov=opt.nesterov))

    return optax.multi_transform({"loc": sgd(opt.loc_lr_multiplier), "main": sgd(1.0)},
                                 {"loc": "loc", "main": "main"})


def create_model(config: ml_collections.ConfigDict, dataset) -> nnx.Module:
    return models.create_model(config.model.name, transform=config.model.transform or None,
                               input_shape=tuple(dataset.image_shape), num_classes=dataset.num_classes,
                               rngs=nnx.Rngs(config.seed), **config.model.options.to_dict())


def split_model(model: nnx.Module):
    """``graphdef, {"loc": ..., "main": ...}, rest``: the two parameter groups and the other state."""
    graphdef, loc, main, rest = nnx.split(model, LocalisationParam, nnx.Param, ...)
    return graphdef, {"loc": loc, "main": main}, rest


# ----------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------


def _theta_stats(thetas) -> dict[str, jax.Array]:
    """Mean and std over the batch of every transform parameter, per transformer."""
    stats = {}
    for k, theta in enumerate(thetas):
        theta = theta.reshape(theta.shape[0], -1)
        for i in range(theta.shape[1]):
            stats[f"theta/{k}/{i}/mean"] = theta[:, i].mean()
            stats[f"theta/{k}/{i}/std"] = theta[:, i].std()
    return stats


def make_train_step(graphdef, tx, schedule, config: ml_collections.ConfigDict):
    penalty = config.identity_penalty

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params["loc"], params["main"], rest)
        logits, aux = model(batch["image"], return_aux=True)
        labels = batch["label"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss = ce + penalty * aux["identity_penalty"]
        error = (logits.argmax(-1) != labels).mean()
        return loss, dict(cross_entropy=ce, error=error, identity_penalty=aux["identity_penalty"],
                          **_theta_stats(aux["theta"]))

    def train_step(state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["rest"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        step = state["step"]
        new_state = dict(
            params=keep(params, state["params"]), rest=state["rest"], opt_state=keep(opt_state, state["opt_state"]),
            step=step + 1,
            first_nonfinite_step=jnp.where((state["first_nonfinite_step"] < 0) & ~finite, step,
                                           state["first_nonfinite_step"]))
        metrics = dict(metrics, loss=loss, learning_rate=schedule(step),
                       grad_norm=optax.tree.norm(grads))
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    @jax.jit
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params["loc"], params["main"], rest)
        logits = model(batch["image"])
        labels, mask = batch["label"], batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        wrong = logits.argmax(-1) != labels
        return dict(loss=(ce * mask).sum(), errors=(wrong * mask).sum(), count=mask.sum())

    return eval_step


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything a training run holds apart from its state."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    dataset: Any
    graphdef: Any
    train_step: Any
    eval_step: Any
    picture_step: Any
    checkpoints: ocp.CheckpointManager
    writer: MetricsWriter

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's shard -> a global array sharded over the mesh's data axis."""
        return {k: jax.make_array_from_process_local_data(self.sharded, np.asarray(v)) for k, v in local.items()}


def make_mesh() -> Mesh:
    """All devices of all processes on one ``"data"`` axis (Auto: the compiler propagates shardings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("stn_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections",
                 "tensorflow-datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes)"
    return out


def _write_records(config: ml_collections.ConfigDict, workdir: Path) -> None:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    (workdir / "versions.json").write_text(json.dumps(_versions(), indent=2) + "\n")


def initial_state(run: Run, params, rest, tx) -> dict:
    state = dict(params=params, rest=rest, opt_state=tx.init(params), step=jnp.int32(0),
                 first_nonfinite_step=jnp.int32(-1))
    return jax.device_put(state, run.replicated)


def restore_or_init(run: Run, state: dict) -> dict:
    latest = run.checkpoints.latest_step()
    if latest is None:
        return state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.replicated), state)
    restored = run.checkpoints.restore(latest, args=ocp.args.StandardRestore(abstract))
    log.info("resumed from the checkpoint at step %d in %s", latest, run.checkpoints.directory)
    return restored


def evaluate(run: Run, params, rest, test: dict[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """Loss and error over a whole test set; each process feeds its shard of each batch."""
    n = len(test["label"])
    procs, me = jax.process_count(), jax.process_index()
    per_process = batch_size // procs
    totals = dict(loss=0.0, errors=0.0, count=0.0)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[me * per_process:(me + 1) * per_process]
        valid = idx < n
        idx = np.where(valid, idx, 0)
        local = {"image": test["image"][idx], "label": test["label"][idx].astype(np.int32),
                 "mask": valid.astype(np.float32)}
        out = jax.device_get(run.eval_step(params, rest, run.global_batch(local)))
        for k in totals:
            totals[k] += float(out[k])
    return dict(loss=totals["loss"] / totals["count"], error=totals["errors"] / totals["count"])


def make_picture_step(graphdef):
    @jax.jit
    def picture_step(params, rest, images):
        model = nnx.merge(graphdef, params["loc"], params["main"], rest)
        _, aux = model(images, return_aux=True)
        return aux["theta"], aux["warped"]

    return picture_step


def write_pictures(run: Run, params, rest, images: np.ndarray, step: int) -> None:
    """Inputs with the sampling grids beside the transformer outputs, to TensorBoard and images/.

    Every process computes them (the parameters are global arrays); process 0 writes them.
    """
    if not run.config.model.transform:
        return
    thetas, warped = jax.device_get(
        run.picture_step(params, rest, jax.make_array_from_process_local_data(run.replicated, images)))
    if not run.writer.enabled:
        return
    panel = transformer_panel(images, [np.asarray(t) for t in thetas], [np.asarray(w) for w in warped],
                              run.config.model.transform, align_corners=bool(run.config.model.options.get(
                                  "align_corners", False)))
    run.writer.image(step, "transformer/inputs_grids_outputs", panel)
    (run.workdir / "images").mkdir(exist_ok=True)
    Image.fromarray(panel).save(run.workdir / "images" / f"transformer_step{step:07d}.png")
    for k, theta in enumerate(thetas):
        run.writer.histogram(step, f"theta/{k}", np.asarray(theta))


def _check_finite(state: dict, checkpoints: ocp.CheckpointManager) -> None:
    bad = int(jax.device_get(state["first_nonfinite_step"]))
    if bad >= 0:
        last = checkpoints.latest_step()
        raise NonFiniteLossError(
            f"the loss became non-finite at step {bad} (that update was discarded); "
            f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None else
            f"the loss became non-finite at step {bad} (that update was discarded); no checkpoint was written yet")


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and returns the final test metrics."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:
        _write_records(config, workdir)
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")

    mesh = make_mesh()
    dataset = data_lib.make_dataset(config.data, seed=config.seed, global_batch_size=config.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    cache_dir=config.data.get("cache_dir") or str(workdir / "data"))
    model = create_model(config, dataset)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(config.optimizer)
    schedule = make_schedule(config.optimizer)
    checkpoints = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False))
    run = Run(config, workdir, mesh, dataset, graphdef, make_train_step(graphdef, tx, schedule, config),
              make_eval_step(graphdef), make_picture_step(graphdef), checkpoints, MetricsWriter(workdir, enabled=lead))

    state = restore_or_init(run, initial_state(run, params, rest, tx))
    start = int(jax.device_get(state["step"]))
    train_step = jax.jit(run.train_step, donate_argnums=0, out_shardings=(run.replicated, run.replicated))
    test = dataset.test_set()
    pictures = test["image"][:8]
    progress = Progress(config.total_steps, config.batch_size, start_step=start, enabled=lead)
    history: list[dict] = []
    log.info("training %s steps %d -> %d on %d devices", config.model.name, start, config.total_steps,
             jax.device_count())

    for step in range(start, config.total_steps):
        batch = run.global_batch(dataset.train_batch(step))
        with jax.transfer_guard("disallow"):
            state, metrics = train_step(state, batch)
        history.append(metrics)
        done = step + 1
        if done % config.log_every == 0 or done == config.total_steps:
            _check_finite(state, checkpoints)
            scalars = _mean_metrics(history)
            history.clear()
            scalars["images_per_second"] = progress.images_per_second(done)
            run.writer.scalars(done, scalars)
            progress.update(done, {"loss": scalars["loss"], "err": scalars["error"]})
        if done % config.eval_every == 0 or done == config.total_steps:
            _check_finite(state, checkpoints)
            result = evaluate(run, state["params"], state["rest"], test, config.eval_batch_size)
            run.writer.scalars(done, {"test_loss": result["loss"], "test_error": result["error"]})
            write_pictures(run, state["params"], state["rest"], pictures, done)
            run.writer.flush()
        if done % config.checkpoint_every == 0 or done == config.total_steps:
            _check_finite(state, checkpoints)
            checkpoints.save(done, args=ocp.args.StandardSave(state))
    progress.close()
    checkpoints.wait_until_finished()

    result = evaluate(run, state["params"], state["rest"], test, config.eval_batch_size)
    run.writer.close()
    return result


# ----------------------------------------------------------------------------
# Evaluation of a saved run.
# ----------------------------------------------------------------------------


def load_npz_test_set(path: str | Path) -> dict[str, np.ndarray]:
    """Reads ``images`` ((N, H, W) or (N, H, W, C); uint8 in [0, 255] or float in [0, 1]) and ``labels`` (N,)."""
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path} must hold arrays 'images' and 'labels'; missing {sorted(missing)}, "
                             f"found {f.files}")
        images, labels = f["images"], f["labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{path}: expected images (N, H, W[, C]) and labels (N,), got {images.shape} and {labels.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{path}: float images must lie in [0, 1], got [{images.min()}, {images.max()}]")
    else:
        raise ValueError(f"{path}: images must be uint8 or float, got {images.dtype}")
    return {"image": images, "label": labels.astype(np.int32)}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Restores the latest checkpoint in ``workdir`` and evaluates it on the configured test set."""
    workdir = Path(workdir).absolute()
    directory = workdir / "checkpoints"
    checkpoints = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    latest = checkpoints.latest_step() if directory.exists() else None
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first with "
                                f"`python -m experiments.train --config ... --workdir {workdir}`")
    mesh = make_mesh()
    dataset = data_lib.make_dataset(config.data, seed=config.seed, global_batch_size=config.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    cache_dir=config.data.get("cache_dir") or str(workdir / "data"))
    model = create_model(config, dataset)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(config.optimizer)
    run = Run(config, workdir, mesh, dataset, graphdef, None, make_eval_step(graphdef), None, checkpoints,
              MetricsWriter(workdir, enabled=False))
    try:
        state = restore_or_init(run, initial_state(run, params, rest, tx))
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: say which and why
        raise CheckpointError(f"cannot restore the checkpoint at step {latest} in {directory}: {e}") from e
    npz = config.data.get("test_npz")
    test = load_npz_test_set(npz) if npz else dataset.test_set()
    if test["image"].shape[1:] != tuple(dataset.image_shape):
        raise ValueError(f"test images have shape {test['image'].shape[1:]}, the model expects "
                         f"{tuple(dataset.image_shape)}")
    return evaluate(run, state["params"], state["rest"], test, config.eval_batch_size)
