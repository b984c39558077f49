# `make test` and `make demo` set up (or reuse) a virtual environment, then run.
# The environment lives under the user's cache, keyed by a hash of the dependency spec, so clones share
# one copy of torch (about 5.5 GB) instead of one each. Override with `make test VENV=/path/to/venv`.
# The shared environment holds the dependencies only: every target runs this clone's own source through
# PYTHONPATH (inherited by subprocesses and DDP workers), never whichever clone installed last.

PYTHON ?= python3
CACHE_DIR := $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/semisparse
SPEC_HASH := $(shell $(PYTHON) scripts/spec_hash.py)
VENV ?= $(CACHE_DIR)/venv-$(SPEC_HASH)
BIN := $(VENV)/bin
STAMP := $(VENV)/.semisparse-deps-ok
PYTEST_ARGS ?=
RUN := PYTHONPATH="$(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))" $(BIN)/python

.PHONY: setup test test-slow lint demo bench clean-venv

$(STAMP): pyproject.toml
	@if [ ! -f "$(STAMP)" ]; then rm -rf "$(VENV)"; fi
	@mkdir -p "$(CACHE_DIR)"
	@[ -x "$(BIN)/python" ] || $(PYTHON) -m venv "$(VENV)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch "$(STAMP)"

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(RUN) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(RUN) -m pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(RUN) -m semisparse demo

bench: setup
	$(RUN) -m semisparse bench

clean-venv:
	rm -rf "$(VENV)"
