# nanopipe: `make run` trains the whole pipeline on the tiny preset; `make test` runs the tests
# (`make test-fast`: those not marked e2e, the inner loop while editing).
# They run setup first (idempotent: venv, pinned deps, Rust crates, release build of rustbpe).
SHELL := /bin/bash
PY := .venv/bin/python
PRESET ?= tiny
ARGS ?=
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup run test test-fast test-deps bench ui clean
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m nanopipe run --preset $(PRESET) $(ARGS)

test-deps: setup
	@SETUP_TEST_DEPS=1 bash scripts/setup.sh

# --durations: the slowest tests, in CI output too (.ci/run is `make test`).
test: test-deps
	$(PY) -m pytest -q --durations=25 $(ARGS)

test-fast: test-deps
	$(PY) -m pytest -q -m "not e2e" --durations=10 $(ARGS)

ui: setup
	$(PY) -m nanopipe ui $(ARGS)

bench: setup
	$(PY) bench/tokenizer.py
	$(PY) bench/pipeline.py
	$(PY) bench/train.py
	$(PY) bench/inference.py
	$(PY) bench/data_stage.py
	$(PY) bench/gpu_check.py

clean:
	rm -rf .venv .setup-stamps rustbpe/target .prefect
