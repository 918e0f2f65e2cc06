"""The training and evaluation loop: one loop for every experiment config and objective.

``train_and_evaluate(config, workdir)`` trains the model a config describes on
the data it describes, with the objective it names, on every device of every
process, and evaluates it.

* **Parallelism.** A 1-D device mesh with axis ``"data"`` over all devices of
  all processes; each batch is sharded along its first axis, the state is
  replicated; one `jax.jit`-compiled step. Each process builds only its shard
  of every batch, and the global batch is the same whatever the number of
  processes or devices, so losses match a single-device run to float tolerance.
* **Optimiser.** optax SGD with momentum (or Adam, ``optimizer.name``) and the paper's step schedule
  (``optimizer.decay_boundaries``), learning-rate multipliers for the localisation networks and the
  pretrained backbones (each group's rate is logged), optional
  weight decay (`stn_jax.paper.train_state`).
* **Determinism and resumption.** Per-step randomness is a function of (seed,
  step) and a batch is a pure function of (seed, step), so a run restarted from
  its latest checkpoint sees exactly what an uninterrupted run would: on CPU
  the final parameters are bit-identical. Orbax checkpoints are written every
  ``checkpoint_every`` steps, at the end, and when the run is interrupted
  (SIGINT / SIGTERM); a run started again in the same workdir resumes, from the
  newest checkpoint that restores (a corrupt one is skipped, saying so).
* **Safety** (docs/robustness.md). The config is checked completely before
  anything is written; the workdir is locked against a second run; resuming
  with another model or data task is refused, changed settings are announced
  and kept in ``config_history.jsonl``; a non-finite loss stops the run naming
  the step, discarding that update and keeping the last good checkpoint.
* **Records.** ``config.json`` (resolved), ``versions.json``,
  ``metrics.jsonl``, TensorBoard events (loss, metrics, learning rate,
  images/s, transform-parameter statistics and histograms, pictures of the
  transformers at work) and the pictures as PNGs under ``images/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import re
import signal
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
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

from stn_jax.paper.config import model_and_task, resolve
from stn_jax.paper.objectives import check_labels
from stn_jax.paper.summaries import MetricsWriter, Progress
from stn_jax.paper.train_state import Setup, TrainState, setup
from stn_jax.visualize import transformer_panel

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be restored into the configured model."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used: locked by another run, holding another experiment, or not writable."""


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


def make_eval_step(s: Setup):
    @jax.jit
    def eval_step(params, model_state, batch):
        return s.objective.eval_sums(s.merge(params, model_state, train=False), batch)

    return eval_step


def make_picture_step(s: Setup):
    @jax.jit
    def picture_step(params, model_state, images):
        _, aux = s.merge(params, model_state, train=False)(images, return_aux=True)
        return aux["theta"], aux["warped"]

    return picture_step


# ----------------------------------------------------------------------------
# Mesh, records, workdir.
# ----------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """All devices of all processes on one ``"data"`` axis (Auto: the compiler propagates shardings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    """Every batch size divides over the devices (so that no example is dropped and no step fails late)."""
    n = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n:
            raise ValueError(f"config.{key}={config[key]} must be divisible by the number of devices ({n})")


def versions() -> dict[str, str]:
    """The versions of Python, the project and its main packages, and the devices (``versions.json``)."""
    out = {"python": platform.python_version()}
    for name in ("stn_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections",
                 "tensorflow-datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes)"
    return out


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates ``workdir``; one-line `WorkdirError` if it is a file or not writable."""
    path = Path(workdir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir {path} is a file, not a directory; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"  # one per process: no races
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot write to --workdir {path}: {e.strerror or e}; choose a writable folder") from None
    return path


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir/.lock`` (released when the process ends, even if killed)."""
    path = workdir / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirError(f"workdir {workdir} is in use by {holder}; wait for it to finish or use another "
                           f"--workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def check_resume_config(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
    """Compares ``config`` with the one a workdir's checkpoints were trained with.

    Returns the changed settings (``"optimizer.learning_rate: 0.01 -> 0.02"``);
    raises `WorkdirError` when the model or data task differs (its checkpoints
    cannot be restored into another model).
    """
    saved_path = workdir / "config.json"
    if not saved_path.exists() or not (workdir / "checkpoints").exists():
        return []
    saved = json.loads(saved_path.read_text())
    new = json.loads(config.to_json_best_effort())
    if saved.get("model", {}).get("name") != new["model"]["name"] or \
            saved.get("model", {}).get("transform", "") != new["model"]["transform"] or \
            saved.get("data", {}).get("task") != new["data"]["task"]:
        raise WorkdirError(f"this workdir holds {model_and_task(saved)}, not {model_and_task(new)}: use another "
                           f"--workdir, or delete {workdir} to start over")
    old, cur = _flat(saved), _flat(new)
    return [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)]


def write_records(config: ml_collections.ConfigDict, workdir: Path, changes: list[str]) -> None:
    """``config.json`` (the config in force), ``versions.json`` and a line in ``config_history.jsonl``."""
    text = config.to_json_best_effort(indent=2) + "\n"
    (workdir / "config.json").write_text(text)
    (workdir / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    with open(workdir / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes,
                            "config": json.loads(text)}) + "\n")


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A run's set-up, its mesh and its steps."""

    setup: Setup
    mesh: Mesh
    eval_step: Any
    picture_step: Any

    @property
    def config(self) -> ml_collections.ConfigDict:
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
    model, steps."""
    s = setup(config, cache_dir=str(workdir / "data"))
    return Run(s, make_mesh(), make_eval_step(s), make_picture_step(s))


def checkpoint_manager(workdir: Path, keep: int, *, create: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False))


@contextlib.contextmanager
def _held_back_noise() -> Iterator[None]:
    """Holds back what orbax's writer threads log (absl) and the unraisable exceptions they leave while a
    checkpoint is written: a failed write raises in the caller too, and that one message is enough (a full
    disk otherwise adds two thread tracebacks and "Event loop is closed" ones, which go on arriving until the
    process ends). After a write that succeeds, the held-back records and exceptions are reported as usual."""
    records: list[logging.LogRecord] = []
    unraisable: list[Any] = []

    def hold(record: logging.LogRecord) -> bool:
        records.append(record)
        return False

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(hold)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        yield
    except BaseException:
        sys.unraisablehook = _without_closed_loop_errors(previous_hook)
        raise
    finally:
        absl_logger.removeFilter(hold)
    sys.unraisablehook = previous_hook
    for record in records:
        absl_logger.handle(record)
    for item in unraisable:
        previous_hook(item)


def _without_closed_loop_errors(hook: Callable[[Any], object]) -> Callable[[Any], None]:
    """``hook`` for every unraisable exception but the "Event loop is closed" RuntimeErrors that the
    callbacks of an aborted orbax write raise."""

    def filtered(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            hook(unraisable)

    return filtered


def _os_error_code(message: str) -> int | None:
    """The operating-system error number that tensorstore reports in an error's message
    (``... No space left on device [os_error_code='28']``), or None."""
    code = re.search(r"os_error_code='?(\d+)", message)
    return int(code.group(1)) if code else None


def save_checkpoint(checkpoints: ocp.CheckpointManager, step: int, state: TrainState) -> None:
    """Writes the checkpoint of ``step`` and waits for it.

    A write that fails for an operating-system reason (a full disk, a read-only folder, a quota) raises an
    `OSError` with that error number, naming the step and the folder, in one line (tensorstore reports them
    as a ValueError in its status text, without the number the CLI reads to add what to do); orbax's thread
    tracebacks are held back (`_held_back_noise`).
    """
    try:
        with _held_back_noise():
            checkpoints.save(step, args=ocp.args.StandardSave(state))
            checkpoints.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - tensorstore reports OS errors as ValueError and others
        code = None if isinstance(e, OSError) else _os_error_code(str(e))
        if code is None:
            raise
        raise OSError(code, f"{os.strerror(code)}: could not write the checkpoint of step {step}",
                      str(checkpoints.directory)) from None


def restore_step(run: Run, checkpoints: ocp.CheckpointManager, step: int, state: TrainState) -> TrainState:
    """The checkpoint of ``step``, restored into the structure of ``state`` (replicated over the run's mesh)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.replicated), state)
    return checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(run: Run, checkpoints: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """The newest checkpoint that restores (older ones are tried when the newest is corrupt), or ``state``."""
    steps = sorted(checkpoints.all_steps(), reverse=True)
    for step in steps:
        try:
            restored = restore_step(run, checkpoints, step, state)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
            log.warning("checkpoint %d in %s cannot be restored (%s: %s); trying an older one", step,
                        checkpoints.directory, type(e).__name__, str(e).splitlines()[0][:200])
            continue
        log.info("resumed from the checkpoint at step %d in %s", step, checkpoints.directory)
        return restored
    if steps:
        raise CheckpointError(f"none of the checkpoints {steps} in {checkpoints.directory} can be restored into "
                              f"{model_and_task(run.config)}; delete the folder to start over")
    return jax.device_put(state, run.replicated)


def set_aside_unrestorable(checkpoints: ocp.CheckpointManager, restored: int, workdir: Path, lead: bool,
                           keep: int) -> ocp.CheckpointManager:
    """Moves checkpoints newer than the restored step (they did not restore) to ``unrestorable_checkpoints/``,
    so that training can write those steps again; returns the manager to use from now on."""
    newer = [s for s in checkpoints.all_steps() if s > restored]
    if not newer:
        return checkpoints
    aside = workdir / "unrestorable_checkpoints"
    if lead:
        aside.mkdir(exist_ok=True)
        for s in newer:
            target = aside / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            Path(checkpoints.directory, str(s)).rename(target)
            log.warning("moved the unrestorable checkpoint %d to %s; it will be written again", s, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("stn_jax: unrestorable checkpoints moved")
    return checkpoint_manager(workdir, keep)


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
        changes = check_resume_config(config, workdir)
        for change in changes:
            log.warning("resuming with a changed setting: %s", change)
        run = open_run(config, workdir)
        if lead:
            write_records(config, workdir, changes)
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
    progress = Progress(config.total_steps, config.batch_size, start_step=start, enabled=lead)
    history: list[dict] = []
    log.info("training %s, steps %d -> %d on %d devices", model_and_task(config), start, config.total_steps,
             jax.device_count())
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


# ----------------------------------------------------------------------------
# Evaluation of a saved run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class ArrayTestSet:
    """A test set held in memory (e.g. a user's ``.npz``), with the data-set interface `evaluate` reads."""

    arrays: dict[str, np.ndarray]

    @property
    def test_size(self) -> int:
        return len(self.arrays["label"])

    def test_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


def load_npz_test_set(path: str | Path, image_shape: tuple[int, ...] | None = None,
                      num_classes: int | None = None, label_shape: tuple[int, ...] = ()) -> ArrayTestSet:
    """Reads ``images`` ((N, H, W) or (N, H, W, C); uint8 in [0, 255] or float in [0, 1]) and ``labels``
    ((N, *label_shape): ``(N,)`` for a classifier, ``(N, 5)`` for SVHN's five digit positions).

    Checks, each failing in one line: the file is a readable ``.npz`` without
    pickled objects; both arrays are present and non-empty; the pixels are
    finite and in range; the labels are integers of shape ``(N, *label_shape)`` in
    ``[0, num_classes)``; the images have ``image_shape``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config.data.test_npz: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise ValueError(f"{path} must hold arrays 'images' and 'labels'; missing {sorted(missing)}, "
                                 f"found {f.files}")
            images, labels = f["images"], f["labels"]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise ValueError(f"{path} holds pickled objects; save plain numeric arrays (np.savez)") from None
        raise
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim not in (4, 5) or len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"{path}: expected images (N, H, W[, C]) with N > 0 and N labels, got "
                         f"{images.shape} and {labels.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise ValueError(f"{path}: images hold {int((~np.isfinite(images)).sum())} non-finite values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"{path}: float images must lie in [0, 1], got [{images.min()}, {images.max()}]")
    else:
        raise ValueError(f"{path}: images must be uint8 or float, got {images.dtype}")
    if num_classes is not None:
        check_labels(labels, num_classes, str(path), label_shape)
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise ValueError(f"{path}: images have shape {images.shape[1:]}, the model expects {tuple(image_shape)}")
    return ArrayTestSet({"image": images, "label": labels.astype(np.int32)})


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Restores the newest restorable checkpoint in ``workdir`` and evaluates it (test set or ``data.test_npz``)."""
    config = resolve(config)
    check_batch_sizes(config)
    workdir = Path(workdir).expanduser().absolute()
    directory = workdir / "checkpoints"
    if not directory.is_dir() or not checkpoint_manager(workdir, 1, create=False).all_steps():
        raise FileNotFoundError(f"no checkpoint in {directory}: train first with "
                                f"`python -m experiments.train --config ... --workdir {workdir}`")
    for change in check_resume_config(config, workdir):
        log.warning("evaluating with a setting other than the run's config.json: %s", change)
    run = open_run(config, workdir)
    npz = config.data.get("test_npz")
    test = npz_test_set(npz, run) if npz else None
    state = restore_latest(run, checkpoint_manager(workdir, config.keep_checkpoints, create=False), run.setup.state)
    return evaluate(run, state, test)


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
