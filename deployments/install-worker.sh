#!/usr/bin/env bash
# Install qwen-batch for a GPU worker into a new virtual environment. The worker image runs this as its
# one install step (deployments/Dockerfile), and CI runs it on every change (.ci/run), so the image
# cannot drift from what is tested.
#
#   deployments/install-worker.sh VENV [TORCH REQUIREMENT...]     (default: torch)
#
# TORCH_INDEX_URL: the index of the torch build for your CUDA (https://download.pytorch.org/whl/cu130);
# EXTRAS: the project's extras (default gpu,gguf: torchao, for fp8 compute, and GGUF transformer files; the
# image adds fast: FlashAttention-4).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:?usage: deployments/install-worker.sh VENV [TORCH REQUIREMENT...]}
shift
torch=("${@:-torch}")

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --no-cache-dir)
# torch first, from its CUDA build's index; then the project with the versions pinned in constraints.txt
# (the range in pyproject.toml is then satisfied by the torch already there).
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${torch[@]}"
"${pip[@]}" --constraint "$repo/constraints.txt" "$repo[${EXTRAS:-gpu,gguf}]"

# Bytecode now rather than at every process start: about 3 s of each worker's start-up on a GPU host
# (docs/scale-out.md), and the image's user cannot write __pycache__ folders under /opt. A few packages
# ship files that are not Python 3 (templates, tests): those are skipped, not fatal.
"$venv/bin/python" -m compileall -q -j 0 "$venv/lib" "$repo/flows" >/dev/null || true
compiled=$(find "$venv/lib" -name '*.pyc' | wc -l)

# The worker's entry points must import: the CLI, the engine, the flows' libraries.
"$venv/bin/qwen-batch" --version
"$venv/bin/python" -c "import diffusers, peft, prefect, s3fs, gguf, torchao, qwen_batch.engine, qwen_batch.fusion"
echo "worker environment ready in $venv ($compiled bytecode files)"
