# One-stop entry points. Both targets create the virtual environment when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml

.PHONY: setup run test test-fast bench clean-venv

$(BIN)/ampo: pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh

setup: $(BIN)/ampo

run: $(BIN)/ampo
	$(BIN)/ampo run --config $(CONFIG)

test: $(BIN)/ampo
	$(BIN)/python -m pytest tests

test-fast: $(BIN)/ampo
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(BIN)/ampo
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
