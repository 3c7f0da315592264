# The two commands for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment and starts what it needs (the local Kafka broker).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck unit integration broker broker-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## demo: start the local broker, train if no model exists, stream 20,000 events, print a summary
demo: $(STAMP)
	scripts/kafka-local start
	$(BIN)/streamer train --if-missing
	$(BIN)/streamer demo

## test: lint, type-check, then every test (integration tests start their own broker)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests"; status=0; fi; \
	  exit $$status

## bench: the performance bench on a private broker (README "Performance"); ARGS=--quick for a short run
bench:
	scripts/bench $(ARGS)

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

broker:
	scripts/kafka-local start

broker-stop:
	scripts/kafka-local stop

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .streamer
