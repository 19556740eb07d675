# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest PyTorch the project supports (the lower bounds of requirements.txt): `make test-oldest` runs the
# suite on it in a venv of its own. The Slurm tests are left to `make test`.
OLDEST := torch==2.5.1 torchvision==0.20.1
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed

.PHONY: venv demo demo-slurm test test-oldest lint

# requirements-pinned.txt holds the exact versions; requirements.txt the supported range.
$(STAMP): requirements.txt requirements-dev.txt requirements-pinned.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c requirements-pinned.txt
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

# The same pins as .venv except PyTorch's pair (PyPI's wheels, with their CUDA libraries: about 5.5 GB).
$(OLDEST_STAMP): requirements.txt requirements-dev.txt requirements-pinned.txt
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	grep -v '^torch' requirements-pinned.txt > $(OLDEST_VENV)/constraints.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt \
		$(OLDEST) -c $(OLDEST_VENV)/constraints.txt
	@touch $@

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q --ignore=tests/test_slurm.py --ignore=tests/test_multinode.py
	# Twice more, the multi-process runs: this PyTorch could hang at exit in gloo's teardown now and then.
	for i in 1 2; do $(OLDEST_VENV)/bin/python -m pytest -q tests/test_distributed.py -k "ddp or torchrun or rank" \
		|| exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
