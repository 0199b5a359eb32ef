# Two commands on a fresh clone:  `make run` (the pipeline)  and  `make test` (the test suite).
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup run test test-fast docs lint postgresql

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	. $(BIN)/activate && dvc repro

test: setup postgresql
	$(BIN)/ruff check .
	. $(BIN)/activate && pytest

test-fast: setup
	. $(BIN)/activate && pytest -m "not slow"

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check .

# The team-stack test (tests/test_team.py) runs a PostgreSQL server of its own: Debian's, installed
# here if it is missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends postgresql; }
