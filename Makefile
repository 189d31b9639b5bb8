# Set-up is part of every target: the first run creates .venv from requirements.txt (pinned) and
# installs cll into it in editable mode. Use another interpreter with `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
CLL    := $(VENV)/bin/cll

.PHONY: demo test clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

## demo: the two-moons slack sweep of the poster (eps 0.15, four slacks), CPU only, about 2 minutes
demo: $(STAMP)
	@for p in 0.75 0.25 0.01 0.0001; do \
	  $(CLL) train --config examples/moons.yaml --out results/demo/moons/p$$p --set p=$$p && \
	  $(CLL) certify --run results/demo/moons/p$$p || exit 1; \
	done

## test: the whole test suite on two processes
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q

clean-demo:
	rm -rf results/demo
