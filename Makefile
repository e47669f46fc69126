# kubetrain: `make demo` and `make test` bootstrap .venv themselves (README.md).
# torch is pinned here only: 2.13.0 is the CPU build these machines carry; pyproject keeps a wide range.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test lint e2e bench crds chart-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[operator,trainer,dev]"
	touch $@

venv: $(STAMP)

# The tiny three-stage pipeline: from_scratch -> sft -> dpo on the bundled data.
demo: $(STAMP)
	$(BIN)/kubetrain run examples/pipeline-tiny.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Everything but the benchmarks: unit, trainer (real tiny training), operator, chart and
# the end-to-end tests (about 9 minutes on 2 cores). Plain `pytest` skips e2e for speed.
test: lint
	$(BIN)/pytest -m "not bench" --durations=15

e2e: $(STAMP)
	$(BIN)/pytest -m e2e

bench: $(STAMP)
	$(BIN)/pytest -m bench -s tests/bench

crds: $(STAMP)
	$(BIN)/kubetrain crds
	$(BIN)/python scripts/sync_chart.py

chart-test: $(STAMP)
	$(BIN)/python scripts/sync_chart.py --check
	$(BIN)/pytest tests/chart

clean:
	rm -rf $(VENV) .tools outputs .pytest_cache .ruff_cache
