# Two entry points (see README): `make quickstart` and `make test`.
# Both create ./.venv from requirements.txt on first use (PYTHON picks the interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/quickstart
# MNIST for the quickstart: tfds (downloads once) or a folder with the four IDX files (offline).
SOURCE ?= tfds

.PHONY: venv test test-all lint quickstart bench

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -n 2

lint: venv
	$(PY) -m ruff check .

test-all: venv
	$(PY) -m pytest -n 2 -m ''

quickstart: venv
	$(PY) -m experiments.train --config configs/quickstart.py --workdir $(WORKDIR) --config.data.source=$(SOURCE)

bench: venv
	$(PY) benchmarks/sampler.py
