#!/bin/bash
# Step caching per row at full size in fp8 (bench/step_cache.py). fp8's cold compiles (about 200 s for the
# blocks, 100 s for each further sub-batch size on an H200) take most of one command: run it again on the same
# warm machine, which reads the compiles back and measures the rest.
source "$(dirname "$0")/env.sh"
bench step_cache --only "${ONLY:-fp8-*}"
