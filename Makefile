# Two commands do everything on a fresh machine (see README):
#   make demo   - set up ./.venv and run the CPU toy demo (python toy/toy2d.py)
#   make test   - set up ./.venv and run the whole test suite, notebooks included
# Use an existing environment instead of ./.venv with VENV=/path/to/env (e.g. $CONDA_PREFIX).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test clean

$(VENV)/.minisplam-installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e ".[test]"
	touch $@

setup: $(VENV)/.minisplam-installed

demo: setup
	$(PY) toy/toy2d.py

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) toy/out
