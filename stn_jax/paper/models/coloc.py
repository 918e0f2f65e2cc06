"""Co-localisation model (paper Appendix A.2): ``coloc_st``.

    84x84 image -> attention ST (loc: conv 8@9x9 stride 4, padded > ReLU > max-pool 2 (ceil) > FC 8 > ReLU
                                  > FC 8 > ReLU > FC 3; (s, t) clipped to their range)
               -> 28x28 crop -> the FROZEN Sect. 4.1 CNN (the ``encoder`` run) -> descriptor
                  (its two hidden layers' activations and its logits, concatenated)

``model(x)`` returns the descriptors ``(B, D)`` of the crops; ``model(x, return_aux=True)``
adds the attention parameters (``aux["theta"][0]``, ``(B, 3)`` = ``(s, t_x, t_y)``) and the crops;
``model.describe_patches(x, theta)`` encodes other crops of the same images (the
triplet loss's random patches, `stn_jax.paper.objectives.Triplet`).

The encoder is a finished training run of ours, named by the ``encoder`` option (a workdir:
``configs/colocalisation.py:encoder``, or any run of model ``cnn`` or ``st_cnn``). The model
reads that run and no other, and trains nothing: a missing or unfinished run stops the build
(and `stn_jax.paper.models.preflight`, before any data) with one line naming the path and the
command that trains it. Its weights become `Frozen` variables (not `nnx.Param`): the trainer
puts them in ``model_state`` (carried, checkpointed, never optimised). Shape-only builds
(`nnx.eval_shape`: docs tables) read no run and use zeros of the default CNN's shapes.

Our choices where the paper says nothing [U] (docs/coloc.md lists them all):

* **Every input pixel reaches the localisation network** (`ColocLocalisation`): the conv is
  "same"-padded (84 px, 9x9 stride 4: 2 px before and 3 after, 21 positions whose windows
  span pixels -2..86) and the max-pool keeps its incomplete last window (ceil mode: 21 -> 11),
  so the FC layers see 11x11x8 = 968 features. (Unpadded with a floor-mode pool, 19 -> 9
  positions would leave rows and columns 77-83 unseen.)
* **The crop's range is a clip whose gradient can bring the crop back** (`ColocBound`, `clip_back`):
  ``s = clip(raw_s, low, high)``, ``t = clip(raw_t, -t_max, t_max)`` in the forward pass; in the
  backward pass the gradient reaches the raw output unchanged (straight through) except the part
  that would push a value already beyond a bound further out, which is dropped. A crop at a bound
  therefore moves back as soon as the loss prefers a value inside (a sigmoid or tanh saturates
  there: its gradient vanishes and the crop is stuck), and the raw output does not drift beyond
  the bound while the loss pushes outwards.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax.conv import conv_general_dilated
from stn_jax.layers import Bound, Flatten, LocalisationParam, SpatialTransformer, count_params, pool, pooled_size
from stn_jax.paper.data import TASKS
from stn_jax.paper.data.mnist_tasks import MNIST_TASKS
from stn_jax.paper.models.classifiers import CNNClassifier
from stn_jax.paper.models.registry import ModelSpec, PaperModel, create_model, module_params, register, solve_width

log = logging.getLogger(__name__)

ENCODER_COMMAND = ("python -m experiments.train --config configs/colocalisation.py:encoder --workdir {workdir} "
                   "--config.data.source=<MNIST: tfds or the IDX folder>")
"""How the encoder's run is made (the errors of `read_encoder` name it with the missing workdir)."""


class Frozen(nnx.Variable):
    """A fixed weight: not an `nnx.Param`, so no optimiser sees it (it lives in the train state's ``model_state``)."""


# ----------------------------------------------------------------------------
# The localisation network and the crop's range.
# ----------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(before, after)`` padding of a side of ``size`` pixels that gives ``ceil(size / stride)`` positions.

    ``total = (positions - 1) * stride + kernel - size`` (at least 0), ``before = total // 2``: the
    first window starts ``before`` pixels before the image and the last one ends ``after`` pixels
    past it, so with ``kernel >= stride`` every pixel lies in some window (84, 9, 4: ``(2, 3)``).
    """
    positions = -(-size // stride)
    total = max((positions - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ColocLocalisation(nnx.Module):
    """conv ``channels``@``kernel_size`` stride ``stride`` (same padding) > ReLU > max-pool ``pool`` (ceil) >
    [FC > ReLU]* (paper A.2, its padding and pooling mode [U]).

    Input ``(B, H, W, C)``, output ``(B, fc[-1])``. Coverage: the "same" padding (`same_padding`)
    gives ``ceil(H / stride)`` conv positions whose windows cover every row (and column: the same
    for W) when ``kernel_size >= stride``, and the ceil-mode pool keeps every position (its last
    window may hold one). On 84x84 with the paper's 9x9 stride 4 and pool 2: 21x21 -> 11x11x8 = 968
    features, every input pixel among their inputs.
    """

    def __init__(self, input_shape: Sequence[int], channels: int = 8, kernel_size: int = 9, stride: int = 4,
                 pool: int = 2, fc: Sequence[int] = (8, 8), *, rngs: nnx.Rngs):
        h, w, c = (int(s) for s in input_shape)
        kernel_size, stride = int(kernel_size), int(stride)
        if not 1 <= stride <= kernel_size:
            raise ValueError(f"localisation: stride {stride} must be between 1 and kernel_size {kernel_size}, or "
                             f"some input pixels would reach no window")
        padding = [same_padding(n, kernel_size, stride) for n in (h, w)]
        self.conv = nnx.Conv(c, int(channels), (kernel_size,) * 2, strides=stride, padding=padding,
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        size = [-(-n // stride) for n in (h, w)]
        self.pool_size = int(pool)
        if self.pool_size > 1:
            size = [pooled_size(n, self.pool_size, True) for n in size]
        self.flatten = Flatten(3)
        features = size[0] * size[1] * int(channels)
        fcs = []
        for n in fc:
            fcs.append(nnx.Linear(features, int(n), rngs=rngs))
            features = int(n)
        self.fcs = nnx.List(fcs)
        self.out_features = features
        self.text = (f"conv {channels}@{kernel_size}x{kernel_size} stride {stride} same > ReLU"
                     + (f" > max-pool {pool} (ceil)" if self.pool_size > 1 else "")
                     + f" [{size[0]}x{size[1]}x{channels}]"
                     + "".join(f" > FC {n} > ReLU" for n in fc))

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        if self.pool_size > 1:
            x = pool(x, self.pool_size, kind="max", ceil=True)
        x = self.flatten(x)
        for layer in self.fcs:
            x = jax.nn.relu(layer(x))
        return x


@jax.custom_vjp
def clip_back(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """``clip(x, low, high)`` whose gradient can always bring ``x`` back inside (the crop's range [U]).

    Forward: ``clip(x, low, high)`` (broadcasting). Backward: the incoming gradient ``g`` passes to
    ``x`` unchanged (straight through), except where ``x`` is already beyond a bound and a descent
    step (``x - lr * g``) would take it further out (``x > high`` and ``g < 0``, or ``x < low`` and
    ``g > 0``): there it is 0. The bounds receive no gradient.
    """
    return jnp.clip(x, low, high)


def _clip_back_fwd(x, low, high):
    return jnp.clip(x, low, high), (x, low, high)


def _clip_back_bwd(residuals, g):
    x, low, high = residuals
    outwards = ((x > high) & (g < 0)) | ((x < low) & (g > 0))
    return jnp.where(outwards, 0.0, g), jnp.zeros_like(low), jnp.zeros_like(high)


clip_back.defvjp(_clip_back_fwd, _clip_back_bwd)


class ColocBound(Bound):
    """The crop's range [U]: ``s`` in ``scale = (low, high)``, ``|t| <= translation`` per axis, by `clip_back`.

    ``scale`` need not contain 1 (the crop starts at ``init_scale``, not at the identity).
    ``translation = -1`` means "inside the image": ``|t| <= 1 - s`` (the crop never leaves it;
    this bound moves with ``s`` and passes no gradient to it). Raw outputs ``(..., 3)`` =
    ``(s, t_x, t_y)`` become ``theta`` of the same shape; `inverse` of a theta inside the range
    is itself.
    """

    def apply(self, raw: jax.Array, transform: str) -> jax.Array:
        s, t = raw[..., :1], raw[..., 1:]
        if self.scale is not None:
            s = clip_back(s, *(jnp.float32(v) for v in self.scale))
        if self.translation is not None:
            room = jnp.clip(1.0 - jnp.abs(s), 0.0) if self.translation < 0 else jnp.float32(self.translation)
            t = clip_back(t, -room, room)
        return jnp.concatenate([s, t], -1)

    def inverse(self, theta, transform: str) -> np.ndarray:
        """The raw outputs that `apply` maps to ``theta`` ``(..., 3)``: ``theta`` clipped to the range, float64."""
        raw = np.array(theta, np.float64)
        if self.scale is not None:
            raw[..., 0] = np.clip(raw[..., 0], *self.scale)
        if self.translation is not None:
            room = np.clip(1.0 - np.abs(raw[..., :1]), 0.0, None) if self.translation < 0 else self.translation
            raw[..., 1:] = np.clip(raw[..., 1:], -room, room)
        return raw

    def check(self, transform: str) -> None:
        if transform != "attention":
            raise ValueError(f"the co-localisation bound applies to the attention transform only, not {transform!r}")
        if self.offset is not None:
            raise ValueError("the co-localisation bound takes scale and translation, not offset")
        if self.scale is not None:
            lo, hi = self.scale
            if not 0 < lo < hi:
                raise ValueError(f"bound 'scale' must be (low, high) with 0 < low < high, got {self.scale}")
        if self.translation is not None and not (self.translation > 0 or self.translation == -1):
            raise ValueError(f"bound 'translation' must be positive, or -1 (inside the image), got "
                             f"{self.translation}")


# ----------------------------------------------------------------------------
# The frozen encoder.
# ----------------------------------------------------------------------------


DESCRIPTOR_PARTS = ("hidden1", "hidden2", "logits")


class FrozenCNN(nnx.Module):
    """The Sect. 4.1 CNN (`CNNClassifier`'s computation) with `Frozen` weights; returns a descriptor.

    ``weights``: ``{"conv1": (kernel, bias), "conv2": ..., "out": ...}`` (NumPy), or None for
    zeros of the shapes of a CNN of ``width`` (shape-only builds). The descriptor ``(B, D)`` of
    inputs ``(B, *input_shape)`` concatenates the ``parts`` of: ``hidden1`` (conv 1 > ReLU >
    max-pool), ``hidden2`` (conv 2 > ReLU > max-pool), ``logits``, each flattened; ``part_sizes``
    gives their lengths in that order (28x28 inputs: 10x10xW, 2x2xW, 10).
    """

    def __init__(self, input_shape: Sequence[int], weights: dict | None = None, *, width: int = 8,
                 num_classes: int = 10, parts: Sequence[str] = DESCRIPTOR_PARTS):
        self.input_shape = tuple(int(s) for s in input_shape)
        if weights is None:
            k1, k2 = CNNClassifier.KERNELS
            fh, fw, _ = CNNClassifier.feature_shape(self.input_shape, width)
            c = self.input_shape[-1]
            weights = {"conv1": (np.zeros((k1, k1, c, width)), np.zeros(width)),
                       "conv2": (np.zeros((k2, k2, width, width)), np.zeros(width)),
                       "out": (np.zeros((fh * fw * width, num_classes)), np.zeros(num_classes))}
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        self.conv1_kernel, self.conv1_bias = (Frozen(f32(a)) for a in weights["conv1"])
        self.conv2_kernel, self.conv2_bias = (Frozen(f32(a)) for a in weights["conv2"])
        self.out_kernel, self.out_bias = (Frozen(f32(a)) for a in weights["out"])
        self.width = int(np.shape(weights["conv1"][0])[-1])
        unknown = [p for p in parts if p not in DESCRIPTOR_PARTS]
        if not parts or unknown:
            raise ValueError(f"descriptor parts must be a non-empty subset of {DESCRIPTOR_PARTS}, got {list(parts)}")
        self.parts = tuple(parts)
        shapes = jax.eval_shape(self._features, jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32))
        self.part_sizes = tuple(int(shapes[p].shape[-1]) for p in self.parts)

    def _features(self, x) -> dict[str, jax.Array]:
        """Every part, flattened: ``{"hidden1": (B, ...), "hidden2": (B, ...), "logits": (B, 10)}``."""
        w = lambda v: jax.lax.stop_gradient(v.get_value())
        conv = lambda x, k, b: conv_general_dilated(x, w(k), (1, 1), "VALID",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + w(b)
        h1 = pool(jax.nn.relu(conv(x, self.conv1_kernel, self.conv1_bias)), 2, kind="max", ceil=True)
        h2 = pool(jax.nn.relu(conv(h1, self.conv2_kernel, self.conv2_bias)), 2, kind="max", ceil=True)
        flat = lambda a: a.reshape(a.shape[0], math.prod(a.shape[1:]))
        logits = flat(h2) @ w(self.out_kernel) + w(self.out_bias)
        return {"hidden1": flat(h1), "hidden2": flat(h2), "logits": logits}

    def __call__(self, x):
        out = self._features(x)
        return jnp.concatenate([out[p] for p in self.parts], -1)

    def logits(self, x):
        """The CNN's logits (for checks against the classifier it came from)."""
        parts, self.parts = self.parts, ("logits",)
        try:
            return self(x)
        finally:
            self.parts = parts


def _missing(workdir: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"model.options.encoder: {workdir} {what}; train it with: "
                             f"{ENCODER_COMMAND.format(workdir=workdir)}")


def _encoder_run(workdir: str | Path) -> tuple[Path, dict[str, Any], int]:
    """``(workdir, its config.json, its final step)``; one-line errors naming the path and the command."""
    workdir = Path(workdir).expanduser()
    if not str(workdir) or str(workdir) == ".":
        raise ValueError(f"model.options.encoder is not set: name the workdir of the encoder's run "
                         f"({ENCODER_COMMAND.format(workdir='workdirs/coloc_encoder')})")
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise _missing(workdir, "is not a training run's workdir (no config.json)" if workdir.exists() else
                       "does not exist")
    config = json.loads(config_path.read_text())
    steps = int(config["total_steps"])
    checkpoints = workdir / "checkpoints"
    done = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if steps not in done:
        raise _missing(workdir, f"has not finished (checkpoints at steps {done or 'none'} of {steps}; the "
                                f"command resumes it)")
    if config["model"]["name"] not in ("cnn", "st_cnn"):
        raise ValueError(f"model.options.encoder: {workdir} holds model {config['model']['name']!r}; the encoder "
                         f"must be the CNN (cnn or st_cnn)")
    if config["data"]["task"] not in MNIST_TASKS:
        raise ValueError(f"model.options.encoder: {workdir} trained on {config['data']['task']!r}, not an MNIST "
                         f"task ({', '.join(MNIST_TASKS)})")
    return workdir, config, steps


def read_encoder(workdir: str | Path) -> dict[str, Any]:
    """The CNN weights of a finished training run (its final checkpoint) as NumPy arrays.

    The run (``workdir``: ``config.json`` and ``checkpoints/<total_steps>``) must be of model
    ``cnn`` or ``st_cnn`` on an MNIST task; its `CNNClassifier` (the last layer; its input is what
    the encoder takes) is read. Returns ``{"conv1": (kernel (9, 9, C, W), bias (W,)), "conv2":
    (kernel (7, 7, W, W), bias), "out": (kernel (F, 10), bias (10,)), "input_shape": (H, W, C),
    "workdir": str, "step": int, "model": str, "task": str}``. Raises ``FileNotFoundError`` (a
    missing or unfinished run) or ``ValueError`` (another model or task) in one line naming the path.
    """
    import orbax.checkpoint as ocp

    workdir, config, step = _encoder_run(workdir)
    task = config["data"]["task"]
    data = {**TASKS.get(task).defaults, **config["data"]}
    model = config["model"]
    abstract = nnx.eval_shape(lambda: create_model(
        model["name"], transform=model.get("transform") or None, input_shape=MNIST_TASKS[task].image_shape(data),
        num_classes=MNIST_TASKS[task].num_classes, rngs=nnx.Rngs(0), **model.get("options", {})))
    _, loc, main, _ = nnx.split(abstract, LocalisationParam, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          {"params": {"loc": loc, "main": main}})
    manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=ocp.CheckpointManagerOptions(
        create=False, enable_async_checkpointing=False))
    restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)  # only the parameters (not the optimiser's state)
    params = manager.restore(step, args=restore)["params"]
    head = abstract.layers[-1]
    if not isinstance(head, CNNClassifier):
        raise ValueError(f"model.options.encoder: the last layer of {workdir}'s model is not the CNN classifier")
    weights = params["main"]["layers"][len(abstract.layers) - 1]
    get = lambda layer: tuple(np.asarray(weights[layer][k].get_value()) for k in ("kernel", "bias"))
    return {"conv1": get("conv1"), "conv2": get("conv2"), "out": get("out"), "input_shape": tuple(head.input_shape),
            "workdir": str(workdir), "step": step, "model": model["name"], "task": task}


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


class ColocModel(PaperModel):
    """``[SpatialTransformer (attention), FrozenCNN]`` plus `describe_patches`, `crop` and `descriptor_sizes`."""

    @property
    def descriptor_sizes(self) -> tuple[int, ...]:
        """The lengths of the descriptor's parts (``descriptor`` option order; the triplet objective's
        ``normalize_parts`` normalises each separately)."""
        return self.layers[-1].part_sizes

    def describe_patches(self, x, theta):
        """Descriptors ``(B, D)`` of the crops of ``x`` ``(B, H, W, C)`` at attention parameters ``theta (B, 3)``."""
        st, encoder = self.layers[0], self.layers[-1]
        return encoder(st.sample(x, st.grid(theta)))

    def crop(self, x, theta):
        """The crops ``(B, h, w, C)`` of ``x`` at ``theta`` ``(B, 3)`` (h x w: the encoder's input)."""
        st = self.layers[0]
        return st.sample(x, st.grid(theta))


def _tracing() -> bool:
    """Whether we are inside a shape-only trace (`nnx.eval_shape`): then no encoder is read."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _default_width(input_shape) -> int:
    from stn_jax.paper.models.mnist import PARAM_BUDGET

    return solve_width(lambda w: module_params(CNNClassifier, tuple(input_shape), w, 10), PARAM_BUDGET, "encoder")


OPTIONS: dict[str, Any] = {
    "encoder": "",             # the workdir of a finished cnn / st_cnn run (configs/colocalisation.py:encoder)
    "descriptor": "hidden1,hidden2,logits",  # [P] the two hidden layers' activations and the logits
    "output_size": 0,          # crop size; 0 = the encoder's input (28x28) [U]
    "localisation": {"channels": 8, "kernel_size": 9, "stride": 4, "pool": 2, "fc": (8, 8)},  # [P] list; ~8.5k params
    "init_scale": 0.5,         # [U] the crop starts centred with this scale (1 = the whole image)
    "bound": {"scale": (0.1, 1.2), "translation": 1.0},  # [U] s in [0.1, 1.2], |t| <= 1, clipped (`ColocBound`)
    "head_init_std": 0.0,      # 0: zero regression kernel (every image starts with the same crop)
    "align_corners": False,
}


def _preflight(options: Mapping[str, Any]) -> None:
    """Checks the encoder's run before a training run builds anything else (one line naming path and command)."""
    _encoder_run(options["encoder"])


def build(input_shape, num_classes, transform, rngs: nnx.Rngs, **o) -> ColocModel:
    input_shape = tuple(input_shape)
    parts = tuple(p.strip() for p in str(o["descriptor"]).split(",") if p.strip())
    if _tracing():
        source = "shapes only"
        enc_shape = (28, 28, input_shape[-1])
        encoder = FrozenCNN(enc_shape, None, width=_default_width(enc_shape), parts=parts)
    else:
        weights = read_encoder(o["encoder"])
        enc_shape = weights["input_shape"]
        if enc_shape[-1] != input_shape[-1]:
            raise ValueError(f"the encoder takes {enc_shape[-1]} channel(s), the images have {input_shape[-1]}")
        encoder = FrozenCNN(enc_shape, weights, parts=parts)
        source = f"{weights['model']} on {weights['task']}, {weights['workdir']} step {weights['step']}"
        log.info("co-localisation encoder: %s", source)
    out = int(o["output_size"]) or enc_shape[0]
    if (out, out) != tuple(enc_shape[:2]):
        raise ValueError(f"output_size {out} must match the encoder's input {enc_shape[:2]} (or be 0)")
    body = ColocLocalisation(input_shape, **dict(o["localisation"]), rngs=rngs)
    bound = ColocBound.create(dict(o["bound"])) if o["bound"] else None
    s0 = float(o["init_scale"])
    if bound is not None and bound.scale is not None and not bound.scale[0] <= s0 <= bound.scale[1]:
        raise ValueError(f"init_scale {s0} must lie inside bound.scale {bound.scale}")
    st = SpatialTransformer(input_shape, transform, output_size=(out, out), localisation=body, bound=bound,
                            head_init_std=float(o["head_init_std"]), align_corners=bool(o["align_corners"]),
                            rngs=rngs)
    st.head.linear.bias.set_value(jnp.asarray([s0, 0.0, 0.0], jnp.float32))  # inside the range: raw = theta
    loc_params = count_params(st, LocalisationParam)
    summary = (f"ST-coloc on {'x'.join(map(str, input_shape))}: ST attention to {out}x{out} (loc: {body.text} > "
               f"FC 3; {loc_params:,} params; starts at s={s0:g}) -> frozen CNN {encoder.width}@9x9 > pool > "
               f"{encoder.width}@7x7 > pool > FC 10 (descriptor: {'+'.join(parts)}; {source})")
    return ColocModel([st, encoder], model_name="coloc_st", display_name="ST-coloc", transform=transform,
                      width=encoder.width, input_shape=input_shape, num_classes=num_classes, summary=summary)


register(ModelSpec("coloc_st", build, OPTIONS, ("attention",), "ST-coloc", ("coloc_set",), preflight=_preflight))
