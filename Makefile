# Set-up and everyday targets.  `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PLUGINS := $(sort $(wildcard plugins/dcpx-*))

.PHONY: install demo test bench fuzz docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so nothing else pulls in a different build.
install: $(BIN)/python
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]' $(foreach p,$(PLUGINS),-e ./$(p))

demo: install
	$(BIN)/python -m dcpx.demo

test: install
	$(BIN)/python -m mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q

# A long fuzzing run of every parser a reader feeds with checkpoint bytes.
fuzz: install
	DCPX_FUZZ_ITERATIONS=$${DCPX_FUZZ_ITERATIONS:-50000} $(BIN)/python -m pytest -q tests/test_fuzz.py

bench: install
	$(BIN)/python benchmarks/run.py

docs: install
	$(BIN)/python -m mkdocs build --strict

lint: install
	$(BIN)/python -m compileall -q core plugins tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info core/*.egg-info
