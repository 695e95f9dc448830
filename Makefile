# One-stop entry points. Both targets create the virtual environment when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml

.PHONY: setup run test test-unit test-fast bench clean-venv

$(BIN)/ampo: pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh

# Always runs the script (AMPO_EXTRA=gpu make setup must not be a no-op on an existing .venv: the script refuses to
# mix extras and says how to switch).
setup:
	PY=$(PY) bash scripts/setup.sh

run: $(BIN)/ampo
	$(BIN)/ampo run --config $(CONFIG)

test: $(BIN)/ampo
	$(BIN)/python -m pytest tests

# The unit layer: pure functions and single objects, under a minute, no Ray, server or engine (tests/conftest.py).
test-unit: $(BIN)/ampo
	$(BIN)/python -m pytest tests -m "not slow and not integration"

# Unit and integration layers: everything but the whole-flow tests marked slow.
test-fast: $(BIN)/ampo
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(BIN)/ampo
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
