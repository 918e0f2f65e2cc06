"""The CUB-200-2011 models (paper Sect. 4.3, Table 3; Appendix A.6 [S]): a pretrained CNN and N parallel attention STs.

==============  ==============================================================
``cub_cnn``     backbone (ImageNet-pretrained) -> global pool -> dropout -> FC (the baseline, 224 px)
``cub_st2``     2 parallel attention transformers with a fixed scale on the input image, one shared
                localisation network; each 224 px crop -> its own part network (a copy of the
                pretrained backbone) -> pooled part features concatenated -> dropout -> FC
``cub_st4``     the same with 4 transformers
==============  ==============================================================

Details (paper Appendix A.6 as reported second-hand [S], our choices [U]):

* Backbones: ``inception_bn`` (the paper's BN-Inception) or ``efficientnet_lite0``
  (`stn_jax.paper.models.backbones`); option ``pretrained``: ``""`` (random
  initialisation), ``"imagenet"`` (the backbone's installed ImageNet file) or the
  path of a PyTorch state dict. Every backbone copy (localisation network and each
  part network) starts from the same weights. Inputs are RGB in [0, 1]; each
  backbone applies its own preprocessing.
* Transformers [S]: attention with the scale fixed at ``scale`` (0.5: crops of half
  the image side), so the localisation network regresses a translation per
  transformer (2N numbers); the crops are ``crop_size`` (224) pixels.
* Localisation network [S]: the backbone without its last pooling (its feature map)
  -> 1x1 conv 128 -> ReLU -> FC 128 -> ReLU -> FC 2N, on a copy of the input
  downsampled to ``crop_size`` (a 448 px input is average-pooled 2x) [U]. Its last
  layer starts with a zero kernel and a bias that places the crops on distinct
  parts of the image [S]: two crops on the upper and lower halves, four on the
  quadrants [U].
* Head [S]: dropout 0.7 before the one softmax layer (``num_classes``). Option ``head_init``
  (a ``head.npz`` of `experiments.linear_probe`; ``""``: random) starts that layer from the frozen
  backbone's linear probe [U] (linear probing then fine-tuning, Kumar et al., ICLR 2022); the ST
  models start each part's share as the probe's kernel divided by N.
* The N part networks are one module whose variables carry a leading axis N
  (`stack_modules`), run with `nnx.vmap`: the same numbers as N separate
  networks (each its own weights and BatchNorm statistics), one part network's
  graph to compile.

The paper reports accuracy; `ModelSpec.paper` holds the error (100 - accuracy) under
the keys ``("cub224", "")`` / ``("cub448", "attention")`` etc., one per Table 3 row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import stn_jax
from stn_jax.layers import Flatten, as_localisation, pool
from stn_jax.paper.models.backbones import BACKBONES, build_from_torch_state_dict, read_torch_state_dict
from stn_jax.paper.models.backbones.convert import check_weights_path, fold_batch_norm
from stn_jax.paper.models.registry import ModelSpec, register

INITIAL_CENTRES = {1: [(0.0, 0.0)], 2: [(0.0, -0.5), (0.0, 0.5)],
                   4: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)]}
"""Initial crop centres (normalised x, y) per number of transformers [U]: halves for 2, quadrants for 4."""


def _backbone_spec(name: str):
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    return BACKBONES[name]


def _weights_path(name: str, pretrained: str) -> Path:
    """The weights file of option ``pretrained`` (``"imagenet"``: the backbone's installed file), checked."""
    spec = _backbone_spec(name)
    path = spec.default_weights_path() if pretrained == "imagenet" else pretrained
    if path is None:
        raise FileNotFoundError(f"no ImageNet weights installed for {name!r}: {spec.how_to_get}")
    return check_weights_path(path, spec.how_to_get)


def _preflight(options) -> None:
    """Reads the pretrained weights and the head files once, so that a bad one fails before the data."""
    if options["pretrained"]:
        read_torch_state_dict(_weights_path(options["backbone"], options["pretrained"]),
                              how_to_get=_backbone_spec(options["backbone"]).how_to_get)
    if options["head_init"]:
        read_head(options["head_init"])


def read_head(path: str) -> dict[str, np.ndarray]:
    """A ``head.npz`` of `experiments.linear_probe`: ``kernel (F, K)``, ``bias (K,)``, ``class_ids (K,)``."""
    where = Path(path).expanduser()
    if not where.is_file():
        raise FileNotFoundError(f"head_init file {where} not found: write it with python -m "
                                f"experiments.linear_probe (its workdir's head.npz)")
    try:
        with np.load(where, allow_pickle=False) as f:
            head = {k: f[k] for k in ("kernel", "bias", "class_ids")}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"head_init file {where} is not a head.npz of experiments.linear_probe ({e})") from None
    k = head["bias"].shape
    if head["kernel"].ndim != 2 or head["kernel"].shape[1:] != k or head["class_ids"].shape != k:
        raise ValueError(f"head_init file {where}: kernel {head['kernel'].shape}, bias {k} and class_ids "
                         f"{head['class_ids'].shape} do not describe one classifier")
    return head


def _start_head(fc: nnx.Linear, path: str, parts: int, num_classes: int) -> None:
    """Sets ``fc`` (``parts`` x F inputs) from a probe's head (F inputs): the kernel divided by ``parts`` for
    each part's features, so the logits start as the mean of the probe's logits on the parts [U]."""
    head = read_head(path)
    kernel, bias = head["kernel"], head["bias"]
    if kernel.shape[1] != num_classes or parts * kernel.shape[0] != fc.kernel.shape[0]:
        raise ValueError(f"head_init file {path} holds a head for {kernel.shape[0]} features and {kernel.shape[1]} "
                         f"classes; this model needs {fc.kernel.shape[0] // parts} features and {num_classes} classes")
    fc.kernel.set_value(jnp.asarray(np.tile(kernel / parts, (parts, 1))))
    fc.bias.set_value(jnp.asarray(bias))


class _Backbones:
    """Makes backbone copies, reading a pretrained state dict once (``fold``: `fold_batch_norm` applied)."""

    def __init__(self, name: str, pretrained: str, *, fold: bool = False):
        self.spec = _backbone_spec(name)
        path = _weights_path(name, pretrained) if pretrained else None
        self.state_dict = None
        if path is not None:
            self.state_dict = read_torch_state_dict(path, how_to_get=self.spec.how_to_get)
            if fold:
                self.state_dict = fold_batch_norm(self.state_dict, self.spec.torch_name_map(None),
                                                  epsilon=self.spec.bn_epsilon)

    def make(self, rngs: nnx.Rngs) -> nnx.Module:
        if self.state_dict is None:
            return self.spec.create(None, rngs=rngs)
        keys = dict(params=rngs.params(), dropout=rngs.dropout())
        return build_from_torch_state_dict(lambda: self.spec.create(None, rngs=nnx.Rngs(**keys)), self.state_dict,
                                           self.spec.torch_name_map(None), skip=(self.spec.classifier_prefix,))


def _check_input(x: jax.Array, input_shape: tuple[int, ...], name: str) -> None:
    if x.shape[1:] != input_shape:
        raise ValueError(f"{name}: expected inputs of shape (B, {', '.join(map(str, input_shape))}) "
                         f"(RGB in [0, 1], channels last), got {tuple(x.shape)}")


BATCH_NORM_MODES = ("train", "frozen", "folded")


class _BatchNormMode(nnx.Module):
    """``batch_norm`` option of the CUB models: how the backbones' BatchNorm layers train.

    ``"train"``: batch statistics in training, running statistics updated (``model.train()`` as usual);
    ``"frozen"``: the running statistics the backbones start with (the pretrained ImageNet ones) in
    training too, never updated; their scale and offset are still trained (docs/models.md, CUB);
    ``"folded"``: ``"frozen"`` on pretrained weights whose statistics and scale are folded into the
    convolutions (`fold_batch_norm`: the same network, SGD without the per-channel gain squared;
    without pretrained weights it is ``"frozen"``).
    Evaluation uses the running statistics in all three.
    """

    batch_norm: str = "train"

    def train(self, **attributes):
        super().train(**attributes)
        if self.batch_norm in ("frozen", "folded"):
            self.set_attributes(nnx.BatchNorm, use_running_average=True, raise_if_not_found=False)


def _check_batch_norm(mode: str) -> str:
    if mode not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, got {mode!r}")
    return mode


class CubCNN(_BatchNormMode):
    """backbone -> pooled features -> dropout -> FC(num_classes); ``model(x)`` -> logits ``(B, num_classes)``."""

    backbone_attributes = ("backbone",)  # the pretrained part (its own learning rate, train_state.GROUPS)

    def __init__(self, input_shape, num_classes: int, *, backbone: str, pretrained: str, dropout: float,
                 batch_norm: str, head_init: str, rngs: nnx.Rngs):
        self.batch_norm = _check_batch_norm(batch_norm)
        maker = _Backbones(backbone, pretrained, fold=batch_norm == "folded")
        self.input_shape, self.preprocess = tuple(input_shape), maker.spec.preprocess
        self.backbone = maker.make(rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(maker.spec.num_features, num_classes, rngs=rngs)
        if head_init:
            _start_head(self.fc, head_init, 1, num_classes)

    def __call__(self, x, *, return_aux: bool = False):
        _check_input(x, self.input_shape, "CubCNN")
        logits = self.fc(self.dropout(self.backbone(self.preprocess(x)).features))
        if not return_aux:
            return logits
        return logits, {"theta": [], "warped": [], "identity_penalty": jnp.zeros(())}


class CubSTCNN(_BatchNormMode):
    """N attention transformers with a fixed scale, one shared localisation network, N part networks.

    ``model(x)``: ``x`` ``(B, S, S, 3)`` RGB in [0, 1] -> logits ``(B, num_classes)``;
    ``return_aux=True`` adds ``aux["theta"]`` (N arrays ``(B, 3)`` of attention parameters
    ``(scale, tx, ty)``) and ``aux["warped"]`` (the N crops ``(B, crop, crop, 3)``).
    """

    backbone_attributes = ("parts",)  # the pretrained part networks (the localisation network is group "loc")

    def __init__(self, input_shape, num_classes: int, *, num_transformers: int, backbone: str, pretrained: str,
                 dropout: float, batch_norm: str, head_init: str, scale: float, crop_size: int, loc_channels: int,
                 loc_hidden: int, rngs: nnx.Rngs):
        self.batch_norm = _check_batch_norm(batch_norm)
        n = int(num_transformers)
        if n not in INITIAL_CENTRES:
            raise ValueError(f"num_transformers must be one of {sorted(INITIAL_CENTRES)}, got {n}")
        size = int(input_shape[0])
        if size % crop_size or tuple(input_shape) != (size, size, 3):
            raise ValueError(f"input must be (S, S, 3) with S a multiple of crop_size {crop_size}, got "
                             f"{tuple(input_shape)}")
        maker = _Backbones(backbone, pretrained, fold=batch_norm == "folded")
        self.input_shape, self.preprocess = tuple(input_shape), maker.spec.preprocess
        self.num_transformers, self.scale, self.crop_size = n, float(scale), int(crop_size)
        self.downsample = size // crop_size
        loc_backbone = maker.make(rngs)
        loc_backbone.eval()  # shape inference must not touch the batch statistics
        fmap = jax.eval_shape(lambda: loc_backbone.feature_map(jnp.zeros((1, crop_size, crop_size, 3))))
        loc_backbone.train()
        self.loc = as_localisation(_LocHead(loc_backbone, fmap.shape[1:], loc_channels, loc_hidden, n, rngs=rngs))
        # The N part networks are one module whose variables have a leading axis N, run with `nnx.vmap`:
        # the compiled step holds one part network's graph instead of N (compile time), same numbers.
        self.parts = stack_modules([maker.make(rngs) for _ in range(n)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(n * maker.spec.num_features, num_classes, rngs=rngs)
        if head_init:
            _start_head(self.fc, head_init, n, num_classes)

    def __call__(self, x, *, return_aux: bool = False):
        _check_input(x, self.input_shape, "CubSTCNN")
        small = pool(x, self.downsample, kind="avg") if self.downsample > 1 else x
        translations = self.loc(self.preprocess(small)).reshape(x.shape[0], self.num_transformers, 2)
        thetas, crops = [], []
        for k in range(self.num_transformers):
            theta = jnp.concatenate([jnp.full((x.shape[0], 1), self.scale, x.dtype), translations[:, k]], -1)
            grid = stn_jax.attention_grid(theta, (self.crop_size, self.crop_size))
            thetas.append(theta)
            crops.append(stn_jax.grid_sample(x, grid))
        features = _part_features(self.parts, self.preprocess(jnp.stack(crops)))  # (N, B, F)
        logits = self.fc(self.dropout(jnp.concatenate(list(features), -1)))
        if not return_aux:
            return logits
        return logits, {"theta": thetas, "warped": crops, "identity_penalty": jnp.zeros(())}


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure -> one module whose every variable (parameters, BatchNorm statistics,
    random-number streams) gains a leading axis, module k's values at index k; run it with `nnx.vmap`."""
    graphdef = nnx.graphdef(modules[0])
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules]))


@nnx.vmap(in_axes=(0, 0), out_axes=0)
def _part_features(part: nnx.Module, crops: jax.Array) -> jax.Array:
    """Part network k on crops k: stacked parts, ``(N, B, S, S, 3)`` -> pooled features ``(N, B, F)``."""
    return part(crops).features


class _LocHead(nnx.Module):
    """backbone feature map -> 1x1 conv -> ReLU -> FC -> ReLU -> FC 2N (initialised to `INITIAL_CENTRES`)."""

    def __init__(self, backbone: nnx.Module, fmap_shape, channels: int, hidden: int, n: int, *, rngs: nnx.Rngs):
        h, w, f = fmap_shape
        self.backbone = backbone
        self.conv = nnx.Conv(f, channels, (1, 1), rngs=rngs)
        self.flatten = Flatten(3)
        self.fc = nnx.Linear(h * w * channels, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 2 * n, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.out.bias.set_value(jnp.asarray(np.asarray(INITIAL_CENTRES[n], np.float32).ravel()))

    def __call__(self, x):
        x = jax.nn.relu(self.conv(self.backbone.feature_map(x)))
        return self.out(jax.nn.relu(self.fc(self.flatten(x))))


_COMMON: dict[str, Any] = {"backbone": "efficientnet_lite0", "pretrained": "", "dropout": 0.7, "batch_norm": "train",
                           "head_init": ""}
_ST: dict[str, Any] = {"scale": 0.5, "crop_size": 224, "loc_channels": 128, "loc_hidden": 128}


def _build_cnn(input_shape, num_classes, transform, rngs, **o):
    return CubCNN(input_shape, num_classes, rngs=rngs, **o)


def _build_st(n: int):
    def build(input_shape, num_classes, transform, rngs, **o):
        return CubSTCNN(input_shape, num_classes, num_transformers=n, rngs=rngs, **o)
    return build


# Table 3: accuracy % -> error %.
register(ModelSpec("cub_cnn", _build_cnn, dict(_COMMON), (), "CNN", ("cub",), {("cub224", ""): round(100 - 82.3, 1)},
                   preflight=_preflight))
register(ModelSpec("cub_st2", _build_st(2), {**_COMMON, **_ST}, ("attention",), "2xST-CNN", ("cub",),
                   {("cub224", "attention"): round(100 - 83.1, 1), ("cub448", "attention"): round(100 - 83.9, 1)},
                   preflight=_preflight))
register(ModelSpec("cub_st4", _build_st(4), {**_COMMON, **_ST}, ("attention",), "4xST-CNN", ("cub",),
                   {("cub448", "attention"): round(100 - 84.1, 1)}, preflight=_preflight))
