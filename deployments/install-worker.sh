#!/usr/bin/env bash
# Install qwen-batch for a GPU worker into a new virtual environment. The worker image runs this as its
# only install step (deployments/Dockerfile), and CI runs it on every change (.ci/run), so the image
# cannot drift from what is tested.
#
#   deployments/install-worker.sh VENV [TORCH REQUIREMENT...]     (default: torch) everything, in two stages:
#   deployments/install-worker.sh --dependencies VENV [TORCH...]  1. torch and the project's pinned dependencies
#   deployments/install-worker.sh --project VENV                  2. the project itself, into that environment
#
# The image runs the two stages as two layers: the first needs only pyproject.toml and constraints.txt,
# so a change to the source rebuilds the second alone (seconds) and keeps the first (minutes, GBs).
#
# TORCH_INDEX_URL: the index of the torch build for your CUDA (https://download.pytorch.org/whl/cu130);
# EXTRAS: the project's extras (default gpu,gguf,control: torchao, for fp8 compute, GGUF transformer files,
# and OpenCV for canny control images; the image adds fast: FlashAttention-4).
set -euo pipefail
stage=all
case ${1:-} in --dependencies | --project) stage=${1#--} && shift ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:?usage: deployments/install-worker.sh [--dependencies | --project] VENV [TORCH REQUIREMENT...]}
shift
torch=("${@:-torch}")
extras=${EXTRAS:-gpu,gguf,control}
pip=("$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check)

dependencies() {
    python3 -m venv "$venv"
    # torch first, from its CUDA build's index; then the project's dependencies with the versions pinned in
    # constraints.txt (the range in pyproject.toml is then satisfied by the torch already there).
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${torch[@]}"
    # What pyproject.toml asks for, read from it rather than by building the project (its source is not
    # there yet in the image's first stage): the dependencies, the extras' and the build backend's.
    mapfile -t requirements < <(python3 - "$repo/pyproject.toml" "$extras" <<'PYTHON'
import sys, tomllib
with open(sys.argv[1], "rb") as file:
    pyproject = tomllib.load(file)
optional = pyproject["project"].get("optional-dependencies", {})
unknown = [extra for extra in sys.argv[2].split(",") if extra and extra not in optional]
if unknown:
    sys.exit(f"EXTRAS names {unknown}, which pyproject.toml does not define (it has {sorted(optional)})")
requirements = pyproject["build-system"]["requires"] + pyproject["project"]["dependencies"]
requirements += [r for extra in sys.argv[2].split(",") if extra for r in optional[extra]]
print("\n".join(requirements))
PYTHON
    )
    "${pip[@]}" --constraint "$repo/constraints.txt" "${requirements[@]}"
    # The dependencies' own test suites (numpy's, pyarrow's, sympy's...) are never imported at run time:
    # about 80 MB the image need not carry.
    find "$venv/lib" -type d -name tests -prune -exec rm -rf {} +
    # Bytecode now rather than at every process start: about 3 s of each worker's start-up on a GPU host
    # (docs/scale-out.md), and the image's user cannot write __pycache__ folders under /opt. A few packages
    # ship files that are not Python 3 (templates, tests): those are skipped, not fatal.
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null || true
}

project() {
    # No build isolation: the build backend is already in the environment (stage 1), so this stage
    # needs no download at all. No dependencies: stage 1 has them; `pip check` proves it.
    "${pip[@]}" --no-deps --no-build-isolation "$repo"
    "$venv/bin/python" -m pip check --disable-pip-version-check
    # Both copies of the library: the CLI imports the installed one, while flow runs, whose working
    # directory is the repository (Prefect's pull step), import the one beside flows/.
    site=$(cd / && "$venv/bin/python" -c 'import qwen_batch, os; print(os.path.dirname(qwen_batch.__file__))')
    "$venv/bin/python" -m compileall -q "$site" "$repo/qwen_batch" "$repo/flows" >/dev/null
    compiled=$(find "$venv/lib" -name '*.pyc' | wc -l)

    # The worker's entry points must import: the CLI, the engine, the flows' libraries and each extra's.
    "$venv/bin/qwen-batch" --version
    "$venv/bin/python" -c "import diffusers, peft, prefect, s3fs, qwen_batch.run.engine, qwen_batch.adapters.fusion"
    case ",$extras," in *,gguf,*) "$venv/bin/python" -c "import gguf" ;; esac
    case ",$extras," in *,gpu,*) "$venv/bin/python" -c "import torchao" ;; esac
    case ",$extras," in *,control,*) "$venv/bin/python" -c "import cv2" ;; esac
    echo "worker environment ready in $venv ($compiled bytecode files)"
}

case $stage in
dependencies) dependencies ;;
project) project ;;
all) dependencies && project ;;
esac
