"""The paper's models, by name: the registry `MODELS` and `create_model`.

``create_model(name, transform=..., input_shape=..., num_classes=..., rngs=..., **options)``
builds a registered model. Every model is a `PaperModel` (a
`stn_jax.layers.TransformerSequential` with its name and a one-line summary):
``model(x)`` returns the outputs (logits ``(B, num_classes)`` for classifiers);
``model(x, return_aux=True)`` returns ``(outputs, aux)`` with ``aux["theta"]``
(list of ``(B, num_params)``), ``aux["warped"]`` (list of transformer outputs)
and ``aux["identity_penalty"]``.

Adding a model is one `register` call next to its factory (see
`stn_jax.paper.models.mnist` for examples): the configs, the study runner, the
docs tables and the tests read the registry. docs/models.md lists every model
with its options and parameter counts (``python -m experiments.model_tables``).
"""

from stn_jax.paper.models.registry import (
    MODELS,
    ModelSpec,
    PaperModel,
    abstract_model,
    check_transform,
    create_model,
    describe,
    merge_options,
    model_options,
    module_params,
    preflight,
    register,
    solve_width,
    transforms_with_dims,
)

__all__ = [
    "MODELS", "ModelSpec", "PaperModel", "abstract_model", "check_transform", "create_model", "describe",
    "merge_options", "model_options", "module_params", "preflight", "register", "solve_width",
    "transforms_with_dims",
]

# The model families register themselves on import.
from stn_jax.paper.models import coloc, cub, mnist, svhn  # noqa: E402,F401
