"""`experiments.show_config`: the resolved config and the parameters per group of every variant of every config file.

Abstract models only (`nnx.eval_shape`): nothing is trained, read or downloaded. The default suite checks every
variant of every config file but CUB's, one variant of each file in more depth (`FAST`, CUB's included) and the
command line; ``pytest -m slow`` adds CUB's variants (its BN-Inception models take up to a minute each to build
abstractly on a busy 2-core machine).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from stn_jax.layers import LocalisationParam, count_params
from stn_jax.paper import models
from stn_jax.paper.config import resolve
from stn_jax.paper.data import make_dataset
from stn_jax.paper.models.mnist import BUDGET_TOLERANCE
from stn_jax.paper.resolved import WEIGHT_FILE_OPTIONS, input_spec, resolved_run
from stn_jax.paper.train_state import GROUPS

CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
# One cheap variant per config file (None: a file whose get_config takes no argument).
FAST = {
    "colocalisation": "tc,3",
    "cub": "efficientnet_lite0,cnn224",
    "distorted_mnist": "rts,st_cnn,tps",
    "mnist_3d": "st3d",
    "mnist_addition": "add_2st_fcn,tps,tiny",
    "quickstart": None,
    "svhn": "st_multi,64",
}


def variants(name: str) -> list[str | None]:
    """Every argument ``configs/<name>.py`` accepts: its ``VARIANTS`` and their ``tiny`` versions (co-localisation:
    each variant with each digit class); ``[None]`` for a file whose ``get_config`` takes no argument."""
    module = importlib.import_module(f"configs.{name}")
    if not inspect.signature(module.get_config).parameters:
        return [None]
    if name == "colocalisation":  # VARIANTS: t, tc; each takes a digit class 0-9
        base = [f"{v},{digit}" for v in module.VARIANTS for digit in range(10)]
    else:
        base = list(module.VARIANTS)
    return base + [f"{arg},tiny" for arg in base]


def get_config(name: str, arg: str | None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)


def config_block(text: str) -> dict:
    """The JSON config at the start of `ResolvedRun.text`."""
    header, rest = text.split("\n", 1)
    assert header == "config (every default filled, widths solved):", header
    return json.loads(rest.split("\nmodel: ", 1)[0])


def check_text(name: str, arg: str | None) -> tuple:
    """What show_config prints for one variant: a loadable resolved config with no width left to solve, the model,
    and one line per parameter group whose counts add up to the total."""
    run = resolved_run(get_config(name, arg))
    text = run.text()
    recorded = config_block(text)
    assert json.loads(resolve(recorded).to_json_best_effort()) == recorded, (name, arg)  # config.json loads back
    assert recorded["model"]["options"].get("width", 1) is not None, (name, arg)
    groups = dict(re.findall(r"^  (\w+) +([\d,]+)  learning rate x", text, re.M))
    assert set(groups) <= set(GROUPS) and groups, (name, arg, text)
    assert {g: int(n.replace(",", "")) for g, n in groups.items()} == run.info.parameters, (name, arg)
    total = sum(run.info.parameters.values())
    assert f"\nparameters: {total:,} trained\n" in text + "\n", (name, arg)
    pretrained = {k for k in WEIGHT_FILE_OPTIONS if recorded["model"]["options"].get(k)}
    assert ("counted on random weights" in text) == bool(pretrained), (name, arg)
    return run, recorded


def test_every_config_file_lists_its_variants():
    """Each config file either takes no argument or lists them in ``VARIANTS``, each one accepted; a new file
    needs a `FAST` entry."""
    assert set(FAST) == set(CONFIG_FILES)
    counts = {name: len(variants(name)) for name in CONFIG_FILES}
    assert counts["distorted_mnist"] == 2 * 5 * (2 + 2 * 4)  # 5 tasks x (fcn, cnn, 2 ST models x 4 transforms)
    assert counts["cub"] == 2 * 2 * 4 and counts["svhn"] == 2 * 3 * 2 * 2 and counts["colocalisation"] == 2 * 2 * 10
    for name in CONFIG_FILES:
        for arg in variants(name):
            get_config(name, arg)  # raises for an argument the file does not accept


@pytest.mark.parametrize("name", sorted(FAST))
def test_one_variant_of_each_config_file(name):
    """The counts agree with the model registry's abstract model, counted another way (`count_params`); the
    distorted-MNIST family's solved width meets the parameter budget."""
    run, recorded = check_text(name, FAST[name])
    options = {k: ("" if k in WEIGHT_FILE_OPTIONS else v) for k, v in recorded["model"]["options"].items()}
    model = models.abstract_model(recorded["model"]["name"], recorded["model"]["transform"] or None, run.input_shape,
                                  run.num_classes, **options)
    assert sum(run.info.parameters.values()) == count_params(model)
    assert run.info.parameters.get("loc", 0) == count_params(model, LocalisationParam)
    if "param_budget" in options:
        budget = options["param_budget"]
        assert abs(count_params(model) - budget) <= BUDGET_TOLERANCE * budget
        assert recorded["model"]["options"]["width"] == model.width
    if name == "cub":
        assert run.info.parameters["backbone"] > run.info.parameters["main"] > 0 and run.info.other_variables > 0


# CUB's 16 variants build up to five ImageNet backbones each: about 3 minutes on an idle 2-core machine (every other
# file's variants together take about 15 s).
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n == "cub")) for n in CONFIG_FILES])
def test_every_variant_of_every_config_file(name):
    for arg in variants(name):
        check_text(name, arg)


def test_input_spec_is_the_data_sets(synthetic_mnist):
    """`input_spec` (options alone) gives the shapes the data sets have, for every task buildable offline."""
    offline = [("distorted_mnist", f"{task},cnn") for task in ("r", "rts", "tc")] + [
        ("mnist_addition", "add_cnn"), ("mnist_3d", "st3d"), ("svhn", "cnn,128,synthetic"), ("colocalisation", "t")]
    for name, arg in offline:
        data = resolve(get_config(name, arg)).data.to_dict()
        data["source"] = synthetic_mnist
        dataset = make_dataset(data, seed=0, global_batch_size=2)  # reads no data: shapes only
        assert input_spec(data) == (tuple(dataset.image_shape), dataset.num_classes), (name, arg)
    cub = resolve(get_config("cub", "efficientnet_lite0,st2_448")).data.to_dict()
    assert input_spec(cub) == ((448, 448, 3), 200)
    assert input_spec(dict(cub, classes="1-30,41"))[1] == 31


def test_the_command_prints_the_resolved_config_with_overrides():
    """``python -m experiments.show_config FILE:ARGS --config.x=y``: the override is in the config and solves the
    width; the terminal shows nothing else (no INFO lines)."""
    out = subprocess.run([sys.executable, "-m", "experiments.show_config", "configs/mnist_3d.py:st3d,tiny",
                          "--config.model.options.param_budget=100000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""
    recorded = config_block(out.stdout)
    assert recorded["model"]["options"]["param_budget"] == 100_000 and recorded["total_steps"] == 20
    total = int(re.search(r"^parameters: ([\d,]+) trained$", out.stdout, re.M).group(1).replace(",", ""))
    assert abs(total - 100_000) <= BUDGET_TOLERANCE * 100_000
    assert "st3d/affine3d" in out.stdout and "input 60x60x60x1, 10 classes" in out.stdout
