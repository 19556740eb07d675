# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-slurm test lint

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded synthetic dataset: teacher and student through profiles 1 -> 2, then the report.
demo: $(STAMP)
	PYTHON=$(PY) bash demo.sh

# The same, as Slurm jobs chained by submit_curriculum.sh on a one-node Slurm started here (root; installs it).
demo-slurm: $(STAMP)
	PYTHON=$(PY) $(PY) tools/demo_slurm.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
