# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Each creates or refreshes the local virtual environment first, so a fresh clone needs nothing else.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medlens-installed

.PHONY: demo test lint env clean

demo: $(STAMP)
	$(PY) -m medlens demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

env: $(STAMP)

# Pinned versions in requirements.lock; the package itself is installed editable on top, without deps.
$(STAMP): pyproject.toml requirements.lock scripts/setup-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	bash scripts/setup-system.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
