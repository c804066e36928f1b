# The common commands. `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch: this machine's CPU build lies on local disk, and a range would pull a multi-GB CUDA
# build. On a GPU machine, install the torch build for your CUDA first, or pass TORCH=... to make.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job on the embedded defaults: the tiny random-weight model, on local disk.
demo: install
	$(BIN)/qwen-batch run prompts/example.parquet --output out/demo

test: install lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf out .pytest_cache .ruff_cache
