"""A run's orbax checkpoints: the manager, a write that fails in one line, and a restore that skips corrupt ones.

* `checkpoint_manager`: ``W/checkpoints``, synchronous writes, the newest ``keep`` kept;
* `save_checkpoint`: writes a step; an operating-system error (full disk, read-only folder, quota) is one
  `OSError` line naming the step and the folder, without orbax's thread tracebacks;
* `restore_latest`: the newest checkpoint that restores (corrupt ones are skipped, saying so), or the
  initial state; `set_aside_unrestorable` moves the skipped ones out of orbax's way.

A checkpoint holds the `TrainState` (`stn_jax.paper.train_state`), replicated over the run's mesh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

from stn_jax.paper.config import model_and_task
from stn_jax.paper.train_state import TrainState

if TYPE_CHECKING:
    from stn_jax.paper.evaluation import Run

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be restored into the configured model."""


def checkpoint_manager(workdir: Path, keep: int, *, create: bool = True) -> ocp.CheckpointManager:
    """The manager of ``workdir/checkpoints``: synchronous writes, the newest ``keep`` kept (``create``: make the
    folder)."""
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
        log.info("restored the checkpoint of step %d from %s", step, checkpoints.directory)
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
