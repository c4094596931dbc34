# The README's two commands: `make demo` (the main job) and `make test`.
# Every target sets itself up: a virtual environment is made when there is none.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: install test check lint typecheck proto proto-check baseline bench demo clean

$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[services,dev]'
	touch $@

install: $(READY)

test: $(READY)
	$(BIN)/python -m pytest

lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(READY)
	$(BIN)/mypy envelope_grpc services benchmarks

# The generated code under envelope_grpc/ and services/ comes from proto/ only.
proto: $(READY)
	$(BIN)/python tools/genproto.py

# Regenerate into build/ and fail on any difference from the committed code;
# then lint, check formatting, and check for breaking changes against the
# committed baseline image of the contract.
proto-check: $(READY)
	rm -rf build/gen && mkdir -p build/gen
	$(BIN)/python tools/genproto.py --out build/gen --image build/contract.binpb
	$(BIN)/python tools/gencheck.py build/gen
	$(BIN)/buf lint build/contract.binpb --path envelope_grpc --path services
	$(BIN)/buf format --diff --exit-code proto
	$(BIN)/buf breaking build/contract.binpb --path envelope_grpc --against proto/baseline.binpb

# Accept the current contract as the baseline for `buf breaking`.
baseline: $(READY)
	$(BIN)/python tools/genproto.py --out build/gen --image proto/baseline.binpb

check: lint typecheck proto-check test

bench: $(READY)
	$(BIN)/python -m benchmarks

demo: $(READY)
	$(BIN)/envelope-grpc demo

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
