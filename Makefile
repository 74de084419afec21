# Two commands on a fresh machine:
#   make demo   create .venv, install crosstrain, train the demo model on the built-in corpus, sample from it
#   make test   create .venv, install crosstrain with its dev, tpu, cuda and cloud extras, run the whole test suite
#               (in parallel: a pytest-xdist worker per core, at most 4)
# and, for the inner loop of development:
#   make test-fast   the same without the tests marked slow (multi-process, whole runs, AOT, parity)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test test-fast install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -e .

install-dev: $(PY)
	$(PIP) install --quiet -e '.[dev,tpu,cuda,cloud]'

demo: install
	rm -rf runs/demo
	$(VENV)/bin/crosstrain train --preset demo --run-dir runs/demo
	$(VENV)/bin/crosstrain generate --run-dir runs/demo --prompt "def " --max-new-tokens 80 --temperature 0.8 --top-k 40

test: install-dev
	$(PY) -m pytest -q -n auto --maxprocesses 4 --durations=15

test-fast: install-dev
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow"

clean:
	rm -rf runs .pytest_cache
