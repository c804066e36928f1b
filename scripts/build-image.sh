#!/usr/bin/env bash
# Build the worker image (deployments/Dockerfile) from the repository root with docker, or podman when
# docker has no engine (scripts/container-engine.sh), and print the time it took and the image's size.
# `make image` runs it; every setting comes from the environment:
#
#   IMAGE            the tag (default localhost/qwen-batch:dev)
#   BASE_IMAGE       the base (default the Dockerfile's: CUDA's runtime; scripts/make-debian-base.sh makes
#                    a Debian one where that cannot be pulled)
#   TORCH, TORCH_INDEX_URL, EXTRAS   as the Dockerfile's build arguments, passed when set (even empty:
#                    TORCH_INDEX_URL= takes torch from the host's pip index instead of PyTorch's)
#   HOST_CONFIG=1    podman only: the build uses the host's network, CA certificates and pip
#                    configuration (mounted read-only; nothing of them stays in the image), for hosts
#                    behind a TLS proxy or with their own package index, as these machines are. With the
#                    Debian base only: the CUDA base installs ca-certificates, which cannot write there
#   IMAGE_BUILD_FLAGS  more flags for `docker build` / `podman build`, word-split
set -euo pipefail
cd "$(dirname "$0")/.."
engine=$(scripts/container-engine.sh)  # ENGINE=podman picks one
image=${IMAGE:-localhost/qwen-batch:dev}

flags=(-f deployments/Dockerfile -t "$image")
for name in BASE_IMAGE TORCH TORCH_INDEX_URL EXTRAS; do
    [[ -v $name ]] && flags+=(--build-arg "$name=${!name}")
done
if [[ ${HOST_CONFIG:-} == 1 ]]; then
    [[ $engine == podman ]] || { echo "HOST_CONFIG=1 needs podman: docker build cannot mount host files" >&2; exit 1; }
    flags+=(--network host -v /etc/ssl/certs:/etc/ssl/certs:ro)
    [[ -f /etc/pip.conf ]] && flags+=(-v /etc/pip.conf:/etc/pip.conf:ro)
fi
# shellcheck disable=SC2206  # word-split on purpose: several flags in one variable
flags+=(${IMAGE_BUILD_FLAGS:-})

start=$SECONDS
"$engine" build "${flags[@]}" .
size=$("$engine" image inspect --format '{{.Size}}' "$image")
echo "built $image with $engine in $((SECONDS - start)) s: $(numfmt --to=iec --suffix=B "$size") ($size bytes)"
