"""Shared command-line plumbing: config-file flags whose errors list the valid choices, and a quiet terminal.

`run(main)` is `absl.app.run` with a flag parser that turns a bad
``--config.<key>=...`` override, or a config file that rejects its arguments
(unknown task, model or transform), into a one-line error naming the valid
choices instead of a traceback. Errors that report bad input or a stopped run
(``ValueError``, ``FileNotFoundError``, a non-finite loss, missing data, an
unreadable checkpoint, a locked or unusable workdir, a full disk) are printed the
same way, with exit status 1; a Ctrl-C (an interrupted run after its checkpoint is
saved, an interrupted cache build, or anything else) is one ``interrupted: ...``
line with exit status 130. Set ``STN_JAX_TRACEBACK=1`` to see their tracebacks.

The terminal is quiet unless ``--verbosity`` (``-v``) is given: the project's
own lines (``stn_jax`` loggers: progress, caches, the resolved config) are
printed as plain text (warnings as ``warning: ...``), other libraries' records
(orbax's checkpoint INFO lines, JAX's accelerator probe) only from WARNING up,
and JAX's backend-probe messages not at all. With ``--verbosity=N`` every
library logs through absl at that level, as absl apps do.

`positional_config` and `config_from_workdir` adapt ``argv`` for entry points
that take the config file as their first argument (``experiments.show_config``)
or read it from a run's workdir (``experiments.evaluate --workdir W``).
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_stn_config", path)
    if module_spec is None:
        raise SystemExit(f"error: cannot read config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _override_error(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=...`` whose key does not exist, with the keys that do."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        i = argv.index("--config") if "--config" in argv else -1
        spec = argv[i + 1] if 0 <= i < len(argv) - 1 else None
    if spec is None:
        return None
    config = _load_config(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        keys = arg[len("--config."):].split("=", 1)[0].split(".")
        node, seen = config, []
        for key in keys:
            if not hasattr(node, "keys") or key not in node:
                where = f"under 'config.{'.'.join(seen)}'" if seen else "at the top level"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none: it is a value)"
                return f"unknown config key 'config.{'.'.join(keys)}'; valid keys {where}: {valid}"
            node = node[key]
            seen.append(key)
    return None


def _config_file_error(argv: list[str]) -> str | None:
    """The message of a config file that rejects its arguments (ml_collections wraps it with a traceback)."""
    for i, arg in enumerate(argv):
        spec = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if spec:
            try:
                _load_config(spec)
            except (ValueError, FileNotFoundError) as e:
                return str(e)
    return None


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad flag value, a missing required flag, a config file rejecting its arguments
        message = _config_file_error(argv)
        raise SystemExit(f"error: {message or e}") from None
    except (AttributeError, KeyError) as e:
        message = _override_error(argv)
        raise SystemExit(f"error: {message or e}") from None
    except ValueError as e:  # the config file rejected its arguments: its message lists the choices
        raise SystemExit(f"error: {e}") from None


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that carry a complete message for the user (bad input, missing files, a stopped run)."""
    from stn_jax.paper.checkpoints import CheckpointError
    from stn_jax.paper.data import MnistSourceError
    from stn_jax.paper.train import NonFiniteLossError
    from stn_jax.paper.workdir import WorkdirError

    return (ValueError, FileNotFoundError, NonFiniteLossError, MnistSourceError, CheckpointError, WorkdirError,
            KeyboardInterrupt, OSError)


def _reporting(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    @functools.wraps(main)
    def wrapped(argv):
        try:
            main(argv)
        except _user_errors() as e:
            if os.environ.get("STN_JAX_TRACEBACK"):
                raise
            if isinstance(e, KeyboardInterrupt):  # train.Interrupted, files.CacheBuildInterrupted: a message
                print(f"interrupted: {str(e) or _PLAIN_INTERRUPT}", file=sys.stderr)
                raise SystemExit(130) from None
            raise SystemExit(f"error: {e}{_advice(e)}") from None

    return wrapped


_PLAIN_INTERRUPT = ("stopped by Ctrl-C (SIGINT) outside the training loop; run the same command to go on (training "
                    "resumes from its last checkpoint)")


def _advice(e: BaseException) -> str:
    """What to do about an operating-system error, appended to its message."""
    hints = {errno.ENOSPC: "free disk space (or use a --workdir on another disk) and rerun the same command "
                           "to resume from the last checkpoint",
             errno.EROFS: "choose a writable --workdir", errno.EACCES: "choose a --workdir you may write to",
             errno.EDQUOT: "free disk space within your quota and rerun the same command to resume"}
    hint = hints.get(getattr(e, "errno", None)) if isinstance(e, OSError) else None
    return f"; {hint}" if hint else ""


class _PlainFormatter(logging.Formatter):
    """The message alone; ``warning: ...`` / ``error: ...`` above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def _quiet_logging() -> None:
    """The quiet terminal of the module docstring; nothing changes when ``--verbosity`` was given."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.root.setLevel(logging.WARNING)  # absl's handler; orbax logs through the "absl" logger
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "Unable to initialize backend 'tpu'"...
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    project = logging.getLogger("stn_jax")
    project.addHandler(handler)
    project.setLevel(logging.INFO)
    project.propagate = False


def _quiet(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    @functools.wraps(main)
    def wrapped(argv):
        _quiet_logging()
        main(argv)

    return wrapped


def positional_config(argv: list[str]) -> list[str]:
    """``prog CONFIG[:ARGS] [flags]`` -> ``prog --config=CONFIG[:ARGS] [flags]`` (``argv`` unchanged when its first
    argument is a flag)."""
    if len(argv) < 2 or argv[1].startswith("-"):
        return argv
    return [argv[0], f"--config={argv[1]}", *argv[2:]]


WORKDIR_CONFIG = Path(__file__).with_name("workdir_config.py")
"""The config file that reads a run's ``config.json`` (``--config experiments/workdir_config.py:W``)."""


def config_from_workdir(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=experiments/workdir_config.py:W`` added when it has ``--workdir W`` and no
    ``--config``: the run's recorded config, to which ``--config.<key>=<value>`` overrides apply."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
    if workdir is None and "--workdir" in argv[:-1]:
        workdir = argv[argv.index("--workdir") + 1]
    return argv if workdir is None else [argv[0], f"--config={WORKDIR_CONFIG}:{workdir}", *argv[1:]]


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """`absl.app.run` of ``main`` on ``argv`` (default ``sys.argv``): one-line errors, a quiet terminal."""
    app.run(_quiet(_reporting(main)), argv=argv, flags_parser=_parse)


if __name__ == "__main__":
    sys.exit("experiments.cli is a library module")
