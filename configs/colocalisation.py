"""Co-localisation (paper Appendix A.2): ``get_config("t")`` or ``get_config("tc")``.

A 28x28 digit at a random place in an 84x84 image (``t``), plus sixteen 6x6
clutter crops of training digits (``tc``). Batches carry ``box`` and
``ink_box`` (normalised [-1, 1] ``(x0, y0, x1, y1)``) for the IoU metric; each
paper run uses one digit class: ``--config.data.digit_class=8``.

Data only: this config feeds `experiments.show_data` and the data tests. The
co-localisation objective (a triplet hinge loss over image pairs, no labels) is
not a classification run, and `experiments.train` does not implement it (it
rejects ``model.name = "coloc"`` with the list of models it trains).
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config

VARIANTS = {"t": 0, "tc": 16}  # number of clutter crops [P]


def get_config(arg: str = "t") -> ml_collections.ConfigDict:
    variant = (arg or "t").strip()
    if variant not in VARIANTS:
        raise ValueError(f"unknown co-localisation variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 100                # [P] 100 images per run
    c.model = ml_collections.ConfigDict()
    c.model.name = "coloc"
    c.model.transform = "attention"   # [P] attention (s, t_x, t_y)
    c.data = data_config("coloc", num_clutter=VARIANTS[variant])
    return c
