#!/usr/bin/env bash
# The worker image as its tests run it (tests/test_worker_image_run.py), tagged localhost/qwen-batch:test:
# on the Debian base, made here when missing (BASE_IMAGE picks another base), with torch from the host's
# pip index (TORCH_INDEX_URL=URL for another) and, with podman, the host's network and certificates
# (HOST_CONFIG, scripts/build-image.sh). The tests call it; .ci/run calls it first, before .venv exists,
# because the build's peak is the run's largest use of disk, and the tests then find every layer cached.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=$(scripts/container-engine.sh)
export ENGINE=$engine IMAGE=localhost/qwen-batch:test TORCH_INDEX_URL=${TORCH_INDEX_URL-}
if [[ ! -v BASE_IMAGE ]]; then
    export BASE_IMAGE=localhost/qwen-batch-base:bookworm
    "$engine" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || scripts/make-debian-base.sh "$BASE_IMAGE"
fi
if [[ ! -v HOST_CONFIG ]]; then
    export HOST_CONFIG=$([[ $engine == podman ]] && echo 1 || true)
fi
# The free disk where the engine keeps images, before the build: a cold build needs about 19 GB at its
# peak (deployments/install-worker.sh says why), so a build that runs out of disk says how much there was.
root=$("$engine" info --format "$([[ $engine == podman ]] && echo '{{.Store.GraphRoot}}' || echo '{{.DockerRootDir}}')")
free=$(df -h "$root")
echo "free disk where $engine keeps images, before the build:"$'\n'"$free"
scripts/build-image.sh || { echo "the build failed; before it, the engine's storage had:"$'\n'"$free" >&2; exit 1; }
