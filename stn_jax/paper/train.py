"""The training loop: one loop for every experiment config and objective.

``train_and_evaluate(config, workdir)`` trains the model a config describes on
the data it describes, with the objective it names, on every device of every
process, and evaluates it.

* **Parallelism.** The run's 1-D ``"data"`` mesh (`stn_jax.paper.evaluation.Run`):
  each batch is sharded along its first axis, the state is replicated; one
  `jax.jit`-compiled step. Each process builds only its shard of every batch,
  and the global batch is the same whatever the number of processes or
  devices, so losses match a single-device run to float tolerance.
* **Optimiser.** optax SGD with momentum (or Adam, ``optimizer.name``) and the paper's step schedule
  (``optimizer.decay_boundaries``), learning-rate multipliers for the localisation networks and the
  pretrained backbones (each group's rate is logged), optional
  weight decay (`stn_jax.paper.train_state`).
* **Determinism and resumption.** Per-step randomness is a function of (seed,
  step) and a batch is a pure function of (seed, step), so a run restarted from
  its latest checkpoint sees exactly what an uninterrupted run would: on CPU
  the final parameters are bit-identical. Orbax checkpoints
  (`stn_jax.paper.checkpoints`) are written every ``checkpoint_every`` steps, at
  the end, and when the run is interrupted (SIGINT / SIGTERM); a run started
  again in the same workdir resumes, from the newest checkpoint that restores
  (a corrupt one is skipped, saying so).
* **Safety** (docs/robustness.md). The config is checked completely before
  anything is written; the workdir is locked against a second run; resuming
  with another model or data task is refused, changed settings are announced
  and kept in ``config_history.jsonl`` (`stn_jax.paper.workdir`); a non-finite
  loss stops the run naming the step, discarding that update and keeping the
  last good checkpoint.
* **Records.** The resolved config and the model's parameters per group are
  logged at the start (`stn_jax.paper.resolved`, the text of
  `experiments.show_config`); ``config.json`` (the resolved config, widths
  solved), ``versions.json``, ``metrics.jsonl``, TensorBoard events (loss,
  metrics, learning rate, images/s, transform-parameter statistics and
  histograms, pictures of the transformers at work) and the pictures as PNGs
  under ``images/``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from PIL import Image

from stn_jax.paper.checkpoints import checkpoint_manager, restore_latest, save_checkpoint, set_aside_unrestorable
from stn_jax.paper.config import model_and_task, resolve
from stn_jax.paper.evaluation import Run, check_batch_sizes, evaluate, open_run
from stn_jax.paper.resolved import ResolvedRun
from stn_jax.paper.summaries import MetricsWriter, Progress
from stn_jax.paper.train_state import Setup, TrainState
from stn_jax.paper.workdir import (
    check_same_experiment,
    config_changes,
    prepare_workdir,
    workdir_lock,
    write_records,
)
from stn_jax.visualize import transformer_panel

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT/SIGTERM after saving a checkpoint of the current step."""


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, eval, checkpoint) runs after ``step`` steps: every ``every`` and at the end."""
    return step % every == 0 or step == total


# ----------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------


def make_train_step(s: Setup):
    """``(state, batch) -> (state, metrics)``; a non-finite loss or gradient discards the update."""

    def loss_fn(params, model_state, batch, step):
        model = s.merge(params, model_state, train=True, step=step)
        loss, metrics = s.objective.loss(model, batch)
        new_model_state = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))
        return loss, (metrics, new_model_state)

    def train_step(state: TrainState, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, state.step)
        updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # One reduction over every gradient: a NaN or inf anywhere (or a norm beyond float32) makes it
        # non-finite. A check and a select per leaf instead (about a thousand leaves in the CUB models) make
        # XLA:CPU compile the step for over ten minutes; the norm and one `cond` compile in seconds.
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, model_state, opt_state = jax.lax.cond(
            finite, lambda: (params, model_state, opt_state),
            lambda: (state.params, state.model_state, state.opt_state))
        new_state = TrainState(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
            first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                           state.first_nonfinite_step))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, **s.learning_rates(state.step))
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def write_pictures(run: Run, state: TrainState, images: np.ndarray, step: int, writer: MetricsWriter,
                   workdir: Path) -> None:
    """Inputs with the sampling grids beside the transformer outputs, to TensorBoard and images/.

    Every process computes them (the parameters are global arrays); process 0 writes them.
    """
    transform = run.config.model.transform
    if not transform or not run.setup.objective.pictures:
        return
    thetas, warped = jax.device_get(run.picture_step(
        state.params, state.model_state, jax.make_array_from_process_local_data(run.replicated, images)))
    if not writer.enabled:
        return
    panel = transformer_panel(images, [np.asarray(t) for t in thetas], [np.asarray(w) for w in warped], transform,
                              align_corners=bool(run.config.model.options.get("align_corners", False)))
    writer.image(step, "transformer/inputs_grids_outputs", panel)
    (workdir / "images").mkdir(exist_ok=True)
    Image.fromarray(panel).save(workdir / "images" / f"transformer_step{step:07d}.png")
    for k, theta in enumerate(thetas):
        writer.histogram(step, f"theta/{k}", np.asarray(theta))


def _check_finite(state: TrainState, checkpoints: ocp.CheckpointManager) -> None:
    bad = int(jax.device_get(state.first_nonfinite_step))
    if bad >= 0:
        last = checkpoints.latest_step()
        where = (f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None
                 else "no checkpoint was written yet")
        raise NonFiniteLossError(f"the loss became non-finite at step {bad} (that update was discarded); {where}")


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Catches SIGINT and SIGTERM during the block: the list receives the signal numbers instead."""
    received: list[int] = []
    handler = lambda signum, frame: received.append(signum)
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and returns the final test metrics."""
    config = resolve(config)
    check_batch_sizes(config)
    workdir = prepare_workdir(workdir)
    lead = jax.process_index() == 0
    lock = workdir_lock(workdir) if lead else contextlib.nullcontext()
    with lock:
        check_same_experiment(config, workdir)
        run = open_run(config, workdir)
        changes = config_changes(run.config, workdir)
        for change in changes:
            log.warning("resuming with a changed setting: %s", change)
        if lead:
            log.info("%s", ResolvedRun.of_setup(run.setup).text())
            write_records(run.config, workdir, changes)
        return _train(run, workdir, lead)


def _train(run: Run, workdir: Path, lead: bool) -> dict[str, float]:
    config = run.config
    checkpoints = checkpoint_manager(workdir, config.keep_checkpoints)
    state = restore_latest(run, checkpoints, run.setup.state)
    start = int(jax.device_get(state.step))
    checkpoints = set_aside_unrestorable(checkpoints, start, workdir, lead, config.keep_checkpoints)
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start)
    train_step = jax.jit(make_train_step(run.setup), donate_argnums=0,
                         out_shardings=(run.replicated, run.replicated))
    dataset = run.setup.dataset
    pictures = np.asarray(dataset.test_examples(np.arange(min(8, dataset.test_size)))["image"])
    devices = jax.device_count()
    log.info("training %s, steps %d -> %d on %d device%s", model_and_task(config), start, config.total_steps,
             devices, "s" if devices > 1 else "")
    progress = Progress(config.total_steps, config.batch_size, start_step=start, enabled=lead)
    history: list[dict] = []
    total = config.total_steps
    # The bar and the logs are closed however the loop ends, so that an error's line is the last one printed.
    with _stop_requests() as stop, contextlib.closing(progress), contextlib.closing(writer):
        for step in range(start, total):
            batch = run.global_batch(dataset.train_batch(step))
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch)
            history.append(metrics)
            done = step + 1
            if due(done, config.log_every, total):
                _check_finite(state, checkpoints)
                scalars = _mean_metrics(history)
                history.clear()
                scalars["images_per_second"] = progress.images_per_second(done)
                writer.scalars(done, scalars)
                progress.update(done, {"loss": scalars["loss"], **{k: scalars[k] for k in ("error",) if k in scalars}})
            if due(done, config.eval_every, total):
                _check_finite(state, checkpoints)
                result = evaluate(run, state)
                writer.scalars(done, {f"test_{k}": v for k, v in result.items()})
                write_pictures(run, state, pictures, done, writer, workdir)
                writer.flush()
            if due(done, config.checkpoint_every, total) or stop:
                _check_finite(state, checkpoints)
                if checkpoints.latest_step() != done:
                    save_checkpoint(checkpoints, done, state)
            if stop:
                raise Interrupted(f"stopped by signal {signal.Signals(stop[0]).name} after step {done}; saved the "
                                  f"checkpoint of step {done} in {checkpoints.directory}: run the same command "
                                  f"to resume")
    checkpoints.wait_until_finished()
    return evaluate(run, state)
