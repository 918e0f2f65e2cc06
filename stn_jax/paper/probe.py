"""A linear probe: the frozen pretrained backbone's features and a multinomial logistic regression on them.

The anchor a fine-tuned CUB model is read against (docs/results.md): what the
pretrained features give without any fine-tuning, on the same data and split.

* Features: the config's CUB CNN (``cub_cnn``, its pretrained backbone) in
  evaluation mode (running BatchNorm statistics), the pooled features ``(N, F)``
  of the centre crops of every training and test image (no augmentation).
* Classifier: features standardised with the training set's mean and standard
  deviation; softmax regression ``W (F, K), b (K,)`` minimising the mean
  cross-entropy ``+ l2 / 2 * |W|^2``, full batch, L-BFGS in float64 (scipy). The
  ``l2`` of `L2_GRID` with the best 5-fold cross-validated accuracy on the
  training set is refitted on all of it; the test set is used once, at the end.

`recipe_classifier` trains the fine-tuning recipe's own classifier (dropout, one
linear layer, the config's SGD) alone on the same frozen features: what the
recipe could reach if the backbone did not move.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.optimize
from flax import nnx

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 5


def backbone_features(setup, images_of, count: int, batch_size: int) -> np.ndarray:
    """Pooled backbone features ``(count, F)`` of ``images_of(indices)`` (``(B, S, S, 3)`` RGB in [0, 1]),
    evaluation mode; ``setup`` is a `stn_jax.paper.train_state.Setup` of a ``cub_cnn`` config."""
    model = setup.merge(setup.state.params, setup.state.model_state, train=False)
    if not hasattr(model, "backbone"):
        raise ValueError(f"the linear probe needs a model with one backbone (cub_cnn), got {setup.config.model.name!r}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state, x):
        m = nnx.merge(graphdef, state)
        return m.backbone(m.preprocess(x)).features

    out = []
    for start in range(0, count, batch_size):
        idx = np.arange(start, min(start + batch_size, count))
        out.append(np.asarray(features(state, images_of(idx))))
    return np.concatenate(out).astype(np.float64)


def _loss_and_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, k: int, l2: float) -> tuple[float, np.ndarray]:
    f = x.shape[1]
    weights, bias = w[:f * k].reshape(f, k), w[f * k:]
    logits = x @ weights + bias
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-300).mean() + 0.5 * l2 * np.sum(weights ** 2)
    p[np.arange(n), y] -= 1
    p /= n
    return loss, np.concatenate([(x.T @ p + l2 * weights).ravel(), p.sum(0)])


@dataclasses.dataclass
class SoftmaxRegression:
    """A fitted probe: ``mean``, ``std`` (standardisation), ``weights (F, K)``, ``bias (K,)``, its ``l2``."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    l2: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std) @ self.weights + self.bias

    def raw_head(self) -> tuple[np.ndarray, np.ndarray]:
        """``(kernel (F, K), bias (K,))`` acting on unstandardised features: the same logits as `logits`."""
        kernel = self.weights / self.std[:, None]
        return kernel, self.bias - self.mean @ kernel

    def save_head(self, path, class_ids) -> None:
        """``head.npz``: ``kernel``, ``bias`` (`raw_head`, float32) and ``class_ids``, to start a classifier from
        (the CUB models' ``head_init`` option)."""
        kernel, bias = self.raw_head()
        np.savez(path, kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                 class_ids=np.asarray(class_ids, np.int64))

    def evaluate(self, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """``error`` (fraction wrong) and ``loss`` (mean cross-entropy) on ``features (N, F)``, ``labels (N,)``."""
        z = self.logits(features)
        z = z - z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return {"error": float(np.mean(z.argmax(1) != labels)),
                "loss": float(-log_p[np.arange(len(labels)), labels].mean())}


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> SoftmaxRegression:
    """Softmax regression on standardised ``features (N, F)`` with penalty ``l2`` (module docstring)."""
    mean, std = features.mean(0), features.std(0) + 1e-8
    x = (features - mean) / std
    f = x.shape[1]
    result = scipy.optimize.minimize(_loss_and_grad, np.zeros(f * num_classes + num_classes), jac=True,
                                     args=(x, labels, num_classes, l2), method="L-BFGS-B",
                                     options={"maxiter": 2000})
    return SoftmaxRegression(mean, std, result.x[:f * num_classes].reshape(f, num_classes),
                             result.x[f * num_classes:], l2)


def choose_l2(features: np.ndarray, labels: np.ndarray, num_classes: int, *, seed: int = 0,
              grid: tuple[float, ...] = L2_GRID, folds: int = FOLDS) -> tuple[float, dict[float, float]]:
    """The ``l2`` of ``grid`` with the best ``folds``-fold cross-validated accuracy on the training set, and
    every candidate's accuracy."""
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = np.array_split(order, folds)
    scores = {}
    for l2 in grid:
        right = 0
        for k in range(folds):
            train = np.concatenate([p for j, p in enumerate(parts) if j != k])
            model = fit(features[train], labels[train], num_classes, l2)
            right += (1 - model.evaluate(features[parts[k]], labels[parts[k]])["error"]) * len(parts[k])
        scores[l2] = right / len(labels)
    return max(grid, key=lambda l2: (scores[l2], l2)), scores


def recipe_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      optimizer: ml_collections.ConfigDict, *, steps: int, batch_size: int, dropout: float,
                      start: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The CUB CNN's classifier (dropout ``dropout``, then ``kernel (F, K)``, ``bias (K,)``) trained alone on
    frozen ``features (N, F)`` with the mean cross-entropy and the config's ``optimizer`` (its base rate and
    schedule, momentum and weight decay: `stn_jax.paper.train_state.make_optimizer`, group ``main``), for
    ``steps`` batches of ``batch_size`` (a new permutation of the examples each epoch).

    ``start``: a ``(kernel, bias)`` to start from (`SoftmaxRegression.raw_head`: the probe's), else
    `nnx.Linear`'s initialisation (LeCun normal kernel, zero bias). Returns the trained ``(kernel, bias)``.
    """
    from stn_jax.paper.train_state import make_optimizer

    key = jax.random.key(seed)
    if start is None:
        kernel = nnx.initializers.lecun_normal()(jax.random.fold_in(key, 0), (features.shape[1], num_classes))
        params = {"kernel": kernel, "bias": jnp.zeros(num_classes)}
    else:
        params = {"kernel": jnp.asarray(start[0], jnp.float32), "bias": jnp.asarray(start[1], jnp.float32)}
    tx = make_optimizer(optimizer, {"main": {"kernel": "main", "bias": "main"}, "loc": {}})
    x_all, y_all = jnp.asarray(features, jnp.float32), jnp.asarray(labels)

    def loss(p, x, y, k):
        keep = jax.random.bernoulli(k, 1.0 - dropout, x.shape)
        z = jnp.where(keep, x / (1.0 - dropout), 0.0) @ p["kernel"] + p["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    @jax.jit
    def step(carry, inputs):
        p, opt_state = carry
        idx, k = inputs
        grads = jax.grad(loss)(p, x_all[idx], y_all[idx], k)
        updates, opt_state = tx.update({"main": grads, "loc": {}}, opt_state, {"main": p, "loc": {}})
        return (optax.apply_updates(p, updates["main"]), opt_state), None

    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // len(labels))
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(epochs)])[:steps * batch_size]
    keys = jax.random.split(jax.random.fold_in(key, 1), steps)
    (params, _), _ = jax.lax.scan(step, (params, tx.init({"main": params, "loc": {}})),
                                  (jnp.asarray(order.reshape(steps, batch_size)), keys))
    return np.asarray(params["kernel"]), np.asarray(params["bias"])


def head_error(kernel: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of ``features (N, F)`` that the linear classifier ``kernel (F, K)``, ``bias (K,)`` gets wrong."""
    return float(np.mean(np.argmax(features @ kernel + bias, 1) != labels))
