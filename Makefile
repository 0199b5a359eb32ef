# Two commands on a fresh clone:  `make run` (the pipeline)  and  `make test` (the test suite).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast docs lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	. $(BIN)/activate && dvc repro

test: setup
	$(BIN)/ruff check .
	. $(BIN)/activate && pytest

test-fast: setup
	. $(BIN)/activate && pytest -m "not slow"

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check .
