"""A run's workdir: its lock, its records and the comparison of a new config with the one it holds.

* `prepare_workdir` creates the folder (one-line `WorkdirError` when it is a file or not writable);
* `workdir_lock` holds ``W/.lock`` while a run trains (a second run stops naming the holder);
* `check_same_experiment` refuses a config of another model or data task before anything is built;
  `config_changes` lists the settings that differ from ``W/config.json`` (announced by the caller);
* `read_config` reads ``W/config.json`` back (e.g. ``experiments.evaluate --workdir W``);
* `write_records` writes ``config.json`` (the config in force), ``versions.json`` and a line of
  ``config_history.jsonl`` (time, changes, config).

docs/robustness.md describes what each guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from stn_jax.paper.config import model_and_task


class WorkdirError(RuntimeError):
    """The workdir cannot be used: locked by another run, holding another experiment, or not writable."""


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates ``workdir`` (absolute path returned); one-line `WorkdirError` if it is a file or not writable."""
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


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run recorded in ``workdir/config.json`` (resolved, widths solved); a one-line
    `FileNotFoundError` when the folder holds none."""
    path = Path(workdir).expanduser().absolute() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no config.json: pass the --workdir of a training run")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def recorded_config(workdir: Path) -> dict[str, Any] | None:
    """``workdir/config.json`` of a run that has checkpoints, or None (nothing to compare with)."""
    path = workdir / "config.json"
    if not path.exists() or not (workdir / "checkpoints").exists():
        return None
    return json.loads(path.read_text())


def check_same_experiment(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Raises `WorkdirError` when ``workdir``'s checkpoints are of another model, transform or data task (they
    cannot be restored into this one)."""
    saved = recorded_config(workdir)
    if saved is None:
        return
    saved_model, saved_data = saved.get("model", {}), saved.get("data", {})
    if (saved_model.get("name"), saved_model.get("transform", ""), saved_data.get("task")) != (
            config.model.name, config.model.transform, config.data.task):
        raise WorkdirError(f"this workdir holds {model_and_task(saved)}, not {model_and_task(config)}: use another "
                           f"--workdir, or delete {workdir} to start over")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


SOLVED_KEYS = ("model.options.width",)
"""Settings a config may leave to the model (``None``: solved from the parameter budget): a recorded ``None``
equals the value the model solved."""


def config_changes(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
    """The settings of ``config`` that differ from ``workdir/config.json`` (``"optimizer.learning_rate: 0.01 ->
    0.02"``), sorted by key; ``[]`` for a workdir without checkpoints."""
    saved = recorded_config(workdir)
    if saved is None:
        return []
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    for key in SOLVED_KEYS:
        if key in old and old[key] is None:
            old[key] = new.get(key)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


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


def write_records(config: ml_collections.ConfigDict, workdir: Path, changes: list[str]) -> None:
    """``config.json`` (the config in force), ``versions.json`` and a line in ``config_history.jsonl``."""
    text = config.to_json_best_effort(indent=2) + "\n"
    (workdir / "config.json").write_text(text)
    (workdir / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    with open(workdir / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes,
                            "config": json.loads(text)}) + "\n")
