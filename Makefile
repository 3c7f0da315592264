# The two commands for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment and starts what it needs (the local Kafka broker).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The lock files: every package pinned, the build backend too. requirements.lock is the runtime
# closure (the image installs it); requirements-dev.lock adds the dev and bench extras, resolved
# within the runtime pins, so the venv and the image run the same versions. No hashes: the pins are
# exact and a PyPI release's files cannot be replaced, while hashes of every platform's wheels
# would make the files ten times longer and refuse a local wheel mirror.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet \
	--strip-extras --allow-unsafe --all-build-deps --no-emit-index-url --no-emit-find-links

.PHONY: demo test bench lint typecheck unit integration broker broker-stop clean lock

$(STAMP): pyproject.toml $(LOCK) $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
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

## lock: re-resolve the lock files after a change to pyproject.toml's dependencies (needs the
## package index; run with Python 3.11, the image's). Existing pins are kept where they still fit;
## LOCK_ARGS=--upgrade moves everything to the newest allowed, --upgrade-package NAME one package.
lock:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and \
	  "make lock: the image runs Python 3.11; run with PYTHON=python3.11")'
	test -x $(LOCK_VENV)/bin/pip || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS)
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	$(PIP_COMPILE) $(LOCK_ARGS) --extra dev --extra bench --constraint $(LOCK) \
	  --output-file $(DEV_LOCK) pyproject.toml

broker:
	scripts/kafka-local start

broker-stop:
	scripts/kafka-local stop

clean:
	rm -rf $(VENV) $(LOCK_VENV) .mypy_cache .ruff_cache .pytest_cache .streamer
