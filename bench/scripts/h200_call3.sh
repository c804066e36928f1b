#!/bin/bash
# Issue 17, call 3 (docs/benchmarks.md): fp8 compiled with the same attention path, against the recipe
# in one process. Needs calls 1 and 2 on the same (warm) machine, or both parts. Each fp8 variant
# compiles cold in about 160 s on an H200 and its full-size model takes about 75 s to build, so one
# call holds one variant: batch 4 by default, FP8_VARIANTS=fp8-compile-b8 in the next call.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TAIL=12 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs tests/test_memory_modes.py -k every_mode
step $B versus --steps $S --prompts ${PROMPTS:-8} --compile-cache $W/cc8 --work $W/vs8 --json $J \
  --variants ${FP8_VARIANTS:-fp8-compile-b4}
echo "=== done $(date +%T)"
