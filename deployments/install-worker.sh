#!/usr/bin/env bash
# Install qwen-batch for a GPU worker into a new virtual environment. The worker image runs this as its
# only install step (deployments/Dockerfile), and CI runs it on every change (.ci/run), so the image
# cannot drift from what is tested.
#
#   deployments/install-worker.sh VENV [TORCH REQUIREMENT...]     (default: torch) everything, in three stages:
#   deployments/install-worker.sh --torch VENV [TORCH...]         1. a new environment with torch (4.5 GB of 6)
#   deployments/install-worker.sh --dependencies VENV             2. the project's pinned dependencies
#   deployments/install-worker.sh --project VENV                  3. the project itself, into that environment
#
# The image runs the stages as three layers. The first two need only pyproject.toml and constraints.txt,
# so a change to the source rebuilds the third alone (seconds); a change to the dependencies keeps torch's
# layer (the download of several GB). Separate layers also halve the disk a build needs at its peak: an
# engine commits a layer by writing it out whole while the step's own copy still exists, so the peak is
# about three times the largest layer (podman here: 24 GB with one 6.2 GB layer, 19 GB with torch apart).
#
# TORCH_INDEX_URL: the index of the torch build for your CUDA (https://download.pytorch.org/whl/cu130);
# EXTRAS: the project's extras (default gpu,gguf,control: torchao, for fp8 compute, GGUF transformer files,
# and OpenCV for canny control images; the image adds fast: FlashAttention-4).
set -euo pipefail
stage=all
case ${1:-} in --torch | --dependencies | --project) stage=${1#--} && shift ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:?usage: deployments/install-worker.sh [--torch | --dependencies | --project] VENV [TORCH REQUIREMENT...]}
shift
torch=("${@:-torch}")
extras=${EXTRAS:-gpu,gguf,control}
pip=("$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check)

install_torch() {
    python3 -m venv "$venv"
    # From its CUDA build's index; the project's dependencies (stage 2) then find the range pyproject.toml
    # asks for satisfied by the torch already there.
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${torch[@]}"
    tidy
}

dependencies() {
    [[ -x $venv/bin/python ]] || { echo "no environment at $venv: run the --torch stage first" >&2; exit 1; }
    # What pyproject.toml asks for, read from it rather than by building the project (its source is not
    # there yet in the image's second stage): the dependencies, the extras' and the build backend's.
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
    tidy
}

tidy() {
    # The dependencies' own test suites (numpy's, pyarrow's, sympy's...) are never imported at run time:
    # about 80 MB the image need not carry.
    find "$venv/lib" -type d -name tests -prune -exec rm -rf {} +
    # Bytecode now rather than at every process start: about 3 s of each worker's start-up on a GPU host
    # (docs/scale-out.md), and the image's user cannot write __pycache__ folders under /opt. A few packages
    # ship files that are not Python 3 (templates, tests): those are skipped, not fatal. Files compiled by
    # an earlier stage are up to date, so they are not written again into a later layer.
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null || true
}

project() {
    # No build isolation: the build backend is already in the environment (stage 2), so this stage
    # needs no download at all. No dependencies: stages 1 and 2 have them; `pip check` proves it.
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
torch) install_torch ;;
dependencies) dependencies ;;
project) project ;;
all) install_torch && dependencies && project ;;
esac
