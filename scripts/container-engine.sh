#!/usr/bin/env bash
# Print the container engine to use: docker if its engine answers, else podman if it works, else fail
# with what to install. Docker's client alone (no daemon, as on these machines) does not count.
#   ENGINE=podman scripts/container-engine.sh    prints podman if it works (a choice, still checked)
set -euo pipefail
for engine in ${ENGINE:-docker podman}; do
    if command -v "$engine" >/dev/null && "$engine" info >/dev/null 2>&1; then
        echo "$engine"
        exit 0
    fi
done
echo "no container engine answers (tried: ${ENGINE:-docker podman}): start Docker's daemon, or apt-get install podman" >&2
exit 1
