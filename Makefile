# nerve — the two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit slow bench bench-all clean services

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml hatch_build.py nerve/_speedups.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nerve demo

lint: $(STAMP)
	$(BIN)/ruff check nerve tests examples benchmarks hatch_build.py
	$(BIN)/ruff format --check nerve

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not slow" -q

slow: $(STAMP)
	$(BIN)/pytest -m slow -q

test: lint typecheck $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks embedded

# Everything side by side (nerve, raw clients, FastStream, Dramatiq, Celery, taskiq) ->
# benchmarks/RESULTS.md; needs the local brokers (`make services`). ARGS=--quick: smoke run.
bench-all: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,peers]'
	$(BIN)/python -m benchmarks compare $(ARGS)

services:
	bash scripts/services

clean:
	rm -rf $(VENV) .nerve .mypy_cache .ruff_cache .pytest_cache
