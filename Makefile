# The common commands. `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch (and torchvision: the Qwen2.5-VL image processor of edit models needs it): this
# machine's CPU build lies on local disk, and a range would pull a multi-GB CUDA
# build. On a GPU machine, install the torch build for your CUDA first, or pass TORCH=... to make.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-2.1 screenshots test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --constraint constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job on the embedded defaults: the Prefect flow on Prefect's embedded server, the demo
# manifest (eight rows; one invalid on purpose, so it is reported and skipped and the exit code stays 0),
# the tiny random-weight model, local disk (out/demo). Same as the CLI:
# .venv/bin/qwen-batch run prompts/demo.parquet --output out/demo
demo: install
	$(BIN)/python flows/qwen_image_batch.py --allow-invalid-rows

# Qwen-Image-2.1 on its tiny random-weight model, with the CLI: prompts/qwen_image21_example.parquet (six rows:
# text-only prompts of different lengths, guidance against a negative prompt, one and two condition images, one
# of them RGBA; every row valid) into out/demo-2.1, as RGBA PNGs. 9 s on a 2-core CPU, the tiny model's first
# build included; running it again resumes (nothing to do).
demo-2.1: install
	$(BIN)/qwen-batch run prompts/qwen_image21_example.parquet --output out/demo-2.1 --model tiny-2.1

# docs/img/prefect-*.png: a flow run in the Prefect UI, in headless Chromium (apt-get install chromium).
screenshots: install
	$(BIN)/python scripts/prefect_screenshot.py

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

# The worker image (deployments/Dockerfile), with docker, or podman when docker has no engine:
#   make image IMAGE=registry.example.com/qwen-batch:0.1.0
# BASE_IMAGE, TORCH, TORCH_INDEX_URL, EXTRAS, HOST_CONFIG, IMAGE_BUILD_FLAGS: scripts/build-image.sh.
# Where the CUDA base cannot be pulled (these machines; docs/prefect.md):
#   make image-base && make image BASE_IMAGE=localhost/qwen-batch-base:bookworm TORCH_INDEX_URL= HOST_CONFIG=1
.PHONY: image image-base image-test
image:
	scripts/build-image.sh

image-base:
	scripts/make-debian-base.sh

# The image built and run as a user runs it, no GPU needed: the demo, a Prefect worker in a container
# against a server on the host, S3 (tests/test_worker_image_run.py; skips when no engine answers).
image-test: install
	$(BIN)/python -m pytest -m image tests/test_worker_image_run.py
