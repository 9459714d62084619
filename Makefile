# The two commands: `make run` (the daemon on its embedded dev stack) and `make test`.
# `make bench` measures what the node costs (never part of `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit soak bench clean

$(STAMP): pyproject.toml
	@echo "Installing nodeprov and its dependencies into $(VENV) (a minute or two the first time)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nodeprov start --dev

lint: $(STAMP)
	$(BIN)/ruff check nodeprov tests bench
	$(BIN)/ruff format --check nodeprov tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

# A seeded fault-injection soak of a real node: SOAK_SECONDS (default 120), SOAK_SEED (random).
soak: $(STAMP)
	$(BIN)/python -m tests.soak

# What the node costs against direct requests: writes bench/results/<date>.md.
# BENCH_QUICK=1 (a few seconds per measure), BENCH_ONLY=latency,throughput,streaming,dm,ledger,streams
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

test: lint typecheck
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
