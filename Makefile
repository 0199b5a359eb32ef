# Two commands on a fresh clone:  `make run` (the pipeline)  and  `make test` (the test suite).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint

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

lint: setup
	$(BIN)/ruff check .
