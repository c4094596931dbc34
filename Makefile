# The README's two commands: `make demo` (the main job) and `make test`.
# Every target sets itself up: a virtual environment is made when there is none.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: install test check lint typecheck proto proto-check baseline bench demo clean \
	phoenix demo-tracing e2e screenshot

$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[services,dev]'
	touch $@

install: $(READY)

# tests/e2e needs Phoenix: `make e2e` runs it.
test: $(READY)
	$(BIN)/python -m pytest --ignore=tests/e2e

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
	$(BIN)/buf breaking build/contract.binpb --path envelope_grpc --path services --against proto/baseline.binpb

# Accept the current contract as the baseline for `buf breaking`.
baseline: $(READY)
	$(BIN)/python tools/genproto.py --out build/gen --image proto/baseline.binpb

check: lint typecheck proto-check test

# The gRPC bench, then ledger write throughput (SQLite; PostgreSQL when one can run).
bench: $(READY)
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.ledger

demo: $(READY)
	$(BIN)/envelope-grpc demo

# Phoenix, an OTLP tracing backend with a web UI, in a virtual environment of
# its own (~850 MB; its packages pinned by tools/phoenix-constraints.txt).
# The `*` .gitignore inside keeps git and ruff out of it.
PHOENIX_VERSION := 20.26.1
PHOENIX_VENV ?= .venv-phoenix
PHOENIX_READY := $(PHOENIX_VENV)/.ready-$(PHOENIX_VERSION)

$(PHOENIX_READY): tools/phoenix-constraints.txt
	test -x $(PHOENIX_VENV)/bin/python || $(PYTHON) -m venv $(PHOENIX_VENV)
	echo '*' > $(PHOENIX_VENV)/.gitignore
	$(PHOENIX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install --quiet -c tools/phoenix-constraints.txt 'arize-phoenix==$(PHOENIX_VERSION)'
	touch $@

phoenix: $(PHOENIX_READY)

# The demo's spans in Phoenix, on loopback; it prints the UI's address and runs until Ctrl-C.
demo-tracing: $(READY) $(PHOENIX_READY)
	$(BIN)/python tools/phoenix.py --venv $(PHOENIX_VENV) demo

# Phoenix, the demo's traffic into it, and the envelopes read back (tests/e2e).
e2e: $(READY) $(PHOENIX_READY)
	ENVELOPE_GRPC_E2E=1 PHOENIX_VENV=$(PHOENIX_VENV) $(BIN)/python -m pytest tests/e2e

# docs/phoenix-trace.png: the agent run's trace in Phoenix's UI, by Debian's headless Chromium.
screenshot: $(READY) $(PHOENIX_READY)
	command -v chromium >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	$(BIN)/python tools/phoenix.py --venv $(PHOENIX_VENV) screenshot docs/phoenix-trace.png

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
