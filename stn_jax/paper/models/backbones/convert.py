"""PyTorch state dicts -> Flax NNX backbones, and the converted weights as an orbax checkpoint.

One converter for every backbone: `load_torch_state_dict(module, state_dict, name_map)` copies
each tensor to the NNX variable that the backbone's name table (``torch name -> "/"-joined NNX
path``, e.g. `efficientnet_lite.torch_name_map`) names, converting the layout by the tensor's rank:

* 4-D conv kernels OIHW -> HWIO (``transpose(2, 3, 1, 0)``); a depthwise kernel ``(C, 1, kh, kw)``
  becomes ``(kh, kw, 1, C)``, the layout of an `nnx.Conv` with ``feature_group_count=C``;
* 2-D linear weights ``(out, in)`` -> ``(in, out)``;
* 1-D tensors (biases, BatchNorm ``weight``/``bias``/``running_mean``/``running_var`` -> ``scale``/
  ``bias``/``mean``/``var``) unchanged; ``num_batches_tracked`` is ignored.

Neither backbone flattens a spatial map before a linear layer (both pool globally), so no
flatten reordering is needed; a table entry may instead be ``(path, fn)`` with ``fn`` mapping the
PyTorch array (NumPy) to the NNX layout, for layers that need one.

Any mismatch raises `StateDictMismatch` (a `ValueError`) with one line naming the first
unexpected key, the first missing key, or the shape expected against the shape found (both in
PyTorch's layout). Nothing is modified unless the whole state dict matches.

`build_from_torch_state_dict(factory, state_dict, name_map)` gives the same module without
random-initialising the weights it then overwrites (``nnx.eval_shape`` plus one jitted call for
the rest): about 2 s instead of 10-20 s for these CNNs on a CPU. `convert_state_dict` only
checks and converts (NNX path -> array).

PyTorch is optional: `read_torch_state_dict` imports it when called (for the legacy non-zip and
the zip formats alike, ``torch.load(..., map_location="cpu", weights_only=True)``, retried with
``encoding="latin1"`` for Python 2 pickles).
`save_converted` / `load_converted` store and restore a module's parameters and batch statistics
with orbax, so the converted weights can be used without PyTorch.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["StateDictMismatch", "read_torch_state_dict", "load_torch_state_dict", "convert_state_dict",
           "build_from_torch_state_dict", "fold_batch_norm", "save_converted", "load_converted", "torch_to_nnx_layout",
           "nnx_to_torch_shape", "IGNORED_SUFFIXES"]

NameMapEntry = str | tuple[str, Callable[[np.ndarray], np.ndarray]]
IGNORED_SUFFIXES = ("num_batches_tracked",)
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


class StateDictMismatch(ValueError):
    """A state dict that does not fit the module (wrong architecture, names or shapes)."""


def torch_to_nnx_layout(value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> NNX layout by rank: OIHW -> HWIO, (out, in) -> (in, out), else unchanged."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def nnx_to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape whose `torch_to_nnx_layout` has NNX ``shape``."""
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return shape[::-1]
    return shape


def check_weights_path(path: str | os.PathLike, how_to_get: str | None = None) -> Path:
    """``path`` as a `Path` if it names a non-empty file; else a one-line error naming it and what is wrong.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message includes ``how_to_get``).
      ValueError: ``path`` is a directory or an empty file.
    """
    path = Path(path).expanduser()
    hint = f" {how_to_get}" if how_to_get else ""
    if path.is_dir():
        raise ValueError(f"weights file {path} is a directory, not a file: pass the .pth file itself.{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found.{hint}")
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes): the download or copy did not complete.{hint}")
    return path


def read_torch_state_dict(path: str | os.PathLike, *, how_to_get: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch ``.pth`` state dict (legacy or zip format) as NumPy arrays, on the CPU.

    Loaded with ``weights_only=True`` (no code from the file runs). A file holding
    ``{"state_dict": ...}`` is unwrapped.

    Raises:
      FileNotFoundError: ``path`` does not exist; the message includes ``how_to_get``.
      ValueError: ``path`` is a directory, empty, or not a readable PyTorch file (truncated, corrupt,
        another format); one line naming the file and the reader's complaint.
      ImportError: PyTorch is not installed.
    """
    path = check_weights_path(path, how_to_get)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the PyTorch weights file {path} needs PyTorch (an optional dependency): "
                          f"pip install torch (CPU build is enough), or load an orbax checkpoint written by "
                          f"save_converted instead") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, UnicodeDecodeError):
            # Files pickled by Python 2 (the Caffe ports of pretrainedmodels) may need latin-1 for their strings.
            obj = torch.load(path, map_location="cpu", weights_only=True, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - whatever the reader trips on, the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:160]
        hint = f" {how_to_get}" if how_to_get else ""
        raise ValueError(f"weights file {path} is not a readable PyTorch state dict ({type(e).__name__}"
                         f"{': ' + first if first else ''}); it may be truncated or of another format.{hint}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise StateDictMismatch(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
                                f"tensors)")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


def fold_batch_norm(state_dict: Mapping[str, np.ndarray], name_map: Mapping[str, NameMapEntry], *,
                    epsilon: float) -> dict[str, np.ndarray]:
    """The same network with each BatchNorm's statistics and scale folded into the convolution before it.

    With ``g = scale / sqrt(running_var + epsilon)`` per output channel, the convolution's weight (and bias,
    where it has one) and the running mean are multiplied by ``g``; the BatchNorm keeps its bias, its scale
    becomes 1 and its running variance ``1 - epsilon``, so that in evaluation mode (running statistics)
    every output is unchanged up to rounding. Frozen statistics then train the folded weights: an SGD step
    on them moves a channel's output by the learning rate times its gradient, where on the unfolded
    weights it is multiplied by ``g ** 2`` (docs/models.md, CUB: ``g`` reaches 75 in EfficientNet-Lite0).

    ``state_dict`` is a PyTorch one (output channels first); ``name_map`` is the backbone's
    ``torch_name_map``, whose order pairs each BatchNorm (``.../scale``) with the last convolution
    (``.../kernel``) listed before it. Returns a new dict; ``state_dict`` is not changed.
    """
    out = dict(state_dict)
    conv = None
    for torch_name, entry in name_map.items():
        path = entry if isinstance(entry, str) else entry[0]
        if path.endswith("/kernel") and np.ndim(state_dict[torch_name]) == 4:
            conv = torch_name.removesuffix(".weight")
        elif path.endswith("/scale"):
            if conv is None:
                raise StateDictMismatch(f"BatchNorm {torch_name} has no convolution before it to fold into")
            bn = torch_name.removesuffix(".weight")
            scale = np.asarray(state_dict[f"{bn}.weight"], np.float64)
            g = scale / np.sqrt(np.asarray(state_dict[f"{bn}.running_var"], np.float64) + epsilon)
            weight = state_dict[f"{conv}.weight"]
            out[f"{conv}.weight"] = (weight * g.reshape(-1, 1, 1, 1)).astype(weight.dtype)
            if f"{conv}.bias" in state_dict:
                out[f"{conv}.bias"] = (state_dict[f"{conv}.bias"] * g).astype(weight.dtype)
            out[f"{bn}.running_mean"] = (state_dict[f"{bn}.running_mean"] * g).astype(weight.dtype)
            out[f"{bn}.running_var"] = np.full_like(state_dict[f"{bn}.running_var"], 1.0 - epsilon)
            out[f"{bn}.weight"] = np.ones_like(state_dict[f"{bn}.weight"])
            conv = None
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _module_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, path)): var for path, var in nnx.iter_graph(module)
            if isinstance(var, (nnx.Param, nnx.BatchStat))}


def convert_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], name_map: Mapping[str, NameMapEntry],
                       *, skip: Iterable[str] = (), strip_prefix: str = "module.") -> dict[str, np.ndarray]:
    """The arrays that `load_torch_state_dict` would write: NNX path -> array in NNX layout.

    ``module`` may be abstract (`nnx.eval_shape`): only its variables' shapes are read. Checks
    everything `load_torch_state_dict` documents; the paths of skipped entries are absent.
    """
    skip = tuple(skip)
    targets = _module_variables(module)
    name = type(module).__name__
    new: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for key, value in state_dict.items():
        key = str(key)
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        if key.rsplit(".", 1)[-1] in IGNORED_SUFFIXES or key.startswith(skip):
            continue
        if key not in name_map:
            raise StateDictMismatch(f"state dict does not fit {name}: unexpected key {key!r} (not in its name "
                                    f"table; wrong architecture or a renamed layer?)")
        entry = name_map[key]
        path, fn = (entry, torch_to_nnx_layout) if isinstance(entry, str) else entry
        if path not in targets:
            raise StateDictMismatch(f"state dict does not fit {name}: key {key!r} maps to {path!r}, which this "
                                    f"module lacks (built without that layer? pass skip=)")
        expected = tuple(targets[path].get_value().shape)
        array = _to_numpy(value)
        converted = fn(array)
        if tuple(converted.shape) != expected:
            want = nnx_to_torch_shape(expected) if fn is torch_to_nnx_layout else expected
            raise StateDictMismatch(f"state dict does not fit {name}: shape mismatch for {key!r} -> {path!r}: "
                                    f"expected {tuple(want)}, got {tuple(array.shape)}")
        new[path] = converted
        seen.add(key)
    skipped = set()
    for key, entry in name_map.items():
        path = entry if isinstance(entry, str) else entry[0]
        if skip and key.startswith(skip):
            skipped.add(path)
        elif key not in seen and path in targets:
            raise StateDictMismatch(f"state dict does not fit {name}: missing key {key!r} (needed for {path!r})")
    uncovered = sorted(set(targets) - set(new) - skipped)
    if uncovered:
        raise StateDictMismatch(f"state dict does not fit {name}: no entry loads {uncovered[0]!r} "
                                f"({len(uncovered)} variables left unset; incomplete name table or skip=)")
    return new


def load_torch_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], name_map: Mapping[str, NameMapEntry],
                          *, skip: Iterable[str] = (), strip_prefix: str = "module.") -> nnx.Module:
    """Copies a PyTorch state dict into ``module`` (in place) through ``name_map``; returns ``module``.

    Args:
      module: the NNX module (e.g. `EfficientNetLite0`); every `nnx.Param` and `nnx.BatchStat`
        in it must be the target of one ``name_map`` entry.
      state_dict: torch name -> tensor or array (e.g. from `read_torch_state_dict` or
        ``torch_model.state_dict()``).
      name_map: torch name -> NNX path (``"/"``-joined), or ``(path, fn)`` with a custom layout
        function.
      skip: torch-name prefixes to leave out (e.g. ``("_fc.",)`` for a module built without its
        classifier, or with another number of classes); they are neither loaded nor reported as
        unexpected, and the module's variables they would fill keep their values.
      strip_prefix: removed from the start of every torch name first (``DataParallel``'s
        ``"module."``).

    Raises:
      StateDictMismatch: one line naming the first key of ``state_dict`` that the table does
        not know, the first table key absent from ``state_dict``, a table entry whose NNX path
        the module lacks, or the first shape mismatch (expected against found, PyTorch layout).
    """
    new = convert_state_dict(module, state_dict, name_map, skip=skip, strip_prefix=strip_prefix)
    targets = _module_variables(module)
    for path, array in new.items():
        var = targets[path]
        var.set_value(jnp.asarray(array, dtype=var.get_value().dtype))
    return module


def build_from_torch_state_dict(factory: Callable[[], nnx.Module], state_dict: Mapping[str, Any],
                                name_map: Mapping[str, NameMapEntry], *, skip: Iterable[str] = (),
                                strip_prefix: str = "module.") -> nnx.Module:
    """``factory()``'s module with its weights from ``state_dict``, without random-initialising them first.

    Same result as ``load_torch_state_dict(factory(), ...)``, but the module is traced abstractly
    (`nnx.eval_shape`) and only what the state dict does not provide (RNG state, skipped layers
    such as a new classifier) is computed, in one jitted call: a few seconds instead of the
    10-20 s that eager initialisation of a large CNN takes on a CPU. ``factory`` must build its own
    `nnx.Rngs` from fixed keys (it runs twice, under tracing).
    """
    module = nnx.eval_shape(factory)
    new = convert_state_dict(module, state_dict, name_map, skip=skip, strip_prefix=strip_prefix)
    variables = {"/".join(map(str, path)): var for path, var in nnx.iter_graph(module)
                 if isinstance(var, nnx.Variable)}
    rest = sorted(set(variables) - set(new))

    def init_rest() -> dict[str, jax.Array]:
        made = {"/".join(map(str, path)): var for path, var in nnx.iter_graph(factory())
                if isinstance(var, nnx.Variable)}
        return {path: made[path].get_value() for path in rest}

    values = jax.jit(init_rest)() if rest else {}
    for path, var in variables.items():
        if path in new:
            var.set_value(jnp.asarray(new[path], dtype=var.get_value().dtype))
        else:
            var.set_value(values[path])
    return module


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save_converted(module: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``module``'s parameters and batch statistics as an orbax checkpoint at ``path`` (a new folder).

    Returns the absolute path. `load_converted` reads it back into a module of the same
    architecture. An existing ``path`` is an error unless ``overwrite``.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    state = nnx.to_pure_dict(nnx.state(module, _WEIGHTS))
    ckpt = _checkpointer()
    ckpt.save(path, state, force=overwrite)
    ckpt.wait_until_finished()
    return path


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    def key(k) -> str:
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    return {"/".join(key(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_converted(module: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Fills ``module`` (in place; it may be abstract) from a checkpoint written by `save_converted`; returns it.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      StateDictMismatch: the checkpoint was written for another architecture (one line naming
        the first variable missing on either side, or the first shape mismatch).
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"converted checkpoint {path} not found (write one with save_converted)")
    state = nnx.state(module, _WEIGHTS)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    ckpt = _checkpointer()
    where = f"checkpoint {path} does not fit {type(module).__name__}"
    metadata = ckpt.metadata(path)
    stored = _flat_shapes(getattr(metadata, "item_metadata", metadata))
    wanted = _flat_shapes(target)
    for name in wanted:
        if name not in stored:
            raise StateDictMismatch(f"{where}: it lacks {name!r}")
        if stored[name] != wanted[name]:
            raise StateDictMismatch(f"{where}: shape mismatch for {name!r}: expected {wanted[name]}, "
                                    f"got {stored[name]}")
    for name in stored:
        if name not in wanted:
            raise StateDictMismatch(f"{where}: it has {name!r}, which this module lacks")
    restored = ckpt.restore(path, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)
    return module
