"""Shared command-line plumbing: config-file flags whose errors list the valid choices.

`run(main)` is `absl.app.run` with a flag parser that turns a bad
``--config.<key>=...`` override, or a config file that rejects its arguments
(unknown task, model or transform), into a one-line error naming the valid
choices instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Callable

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


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error:
        raise
    except (AttributeError, KeyError) as e:
        message = _override_error(argv)
        raise SystemExit(f"error: {message or e}") from None
    except ValueError as e:  # the config file rejected its arguments: its message lists the choices
        raise SystemExit(f"error: {e}") from None


def run(main: Callable[[list[str]], None]) -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    sys.exit("experiments.cli is a library module")
