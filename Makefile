# Set-up is part of every target: the first run creates .venv from requirements.txt (pinned) and
# installs cll into it in editable mode. Use another interpreter with `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
# the test lanes (markers in pyproject.toml; CONTRIBUTING.md): make test-fast runs none of them
FAST   := not slow and not workflow and not slurm and not data

.PHONY: demo test test-fast lint format schema clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

## demo: the embedded grid (config/config.yaml) through the workflow: two-moons slack sweep and a
## digits GloRo/CLL table, trained, certified, audited, tabulated and plotted; CPU only, about 10 minutes
demo: $(STAMP)
	$(VENV)/bin/snakemake --cores 2 all_tables
	@cat results/tables/*.md

## test: the whole test suite on two processes (every lane; what CI runs), about 5 minutes.
## worksteal: an idle worker takes tests queued on the other (tests/conftest.py orders them)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist worksteal -q

## test-fast: everything but the slow, workflow, slurm and data lanes, under a minute
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist worksteal -q -m "$(FAST)"

## lint: ruff (lint + format check) on Python, snakefmt on the workflow; `make format` rewrites
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile workflow/

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/snakefmt Snakefile workflow/

## schema: rewrite what the run-config declarations (src/cll/config.py) and the grid format
## (src/cll/schema.py) generate: workflow/schemas/config.schema.yaml and the README's key table
schema: $(STAMP)
	$(VENV)/bin/python -m cll.workflow

clean-demo:
	rm -rf results/runs results/summary.csv results/tables results/figures results/demo logs
