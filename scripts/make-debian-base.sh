#!/usr/bin/env bash
# A local base image for deployments/Dockerfile, made from Debian's packages alone: for machines that
# cannot pull the default CUDA runtime base (no route to Docker Hub or nvcr.io). torch's wheels bring
# their own CUDA libraries, so the image built on it runs on GPUs too; the CUDA base stays the default.
#
#   scripts/make-debian-base.sh [TAG]        (default localhost/qwen-batch-base:bookworm)
#   make image BASE_IMAGE=localhost/qwen-batch-base:bookworm
#
# It holds what deployments/install-worker.sh needs: python3 with venv (3.11 in bookworm) and the CA
# certificates. Needs mmdebstrap (apt-get install mmdebstrap) and docker or podman; about 30 s, 225 MB.
set -euo pipefail
tag=${1:-localhost/qwen-batch-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
engine=$("$(dirname "$0")/container-engine.sh")
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 1; }

tarball=$(mktemp --suffix .tar)
trap 'rm -f "$tarball"' EXIT
# minbase: essential packages and apt, nothing else. The package lists are dropped: the Dockerfile runs
# apt-get update itself before it installs anything.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$suite" "$tarball"
imported=$("$engine" import --change 'CMD ["/bin/bash"]' "$tarball" "$tag" 2>&1) || { echo "$imported" >&2; exit 1; }
echo "base image $tag from Debian $suite: $("$engine" image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec)B"
