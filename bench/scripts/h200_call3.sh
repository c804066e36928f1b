#!/bin/bash
# Issue 17, call 3 (docs/benchmarks.md): fp8 compiled at batch 4 and 8 with the same attention path,
# against the recipe in one process. Needs calls 1 and 2 on the same (warm) machine, or both parts.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
step $B versus --steps $S --prompts ${PROMPTS:-8} --compile-cache $W/cc8 --work $W/vs8 --json $J \
  --variants ${FP8_VARIANTS:-fp8-compile-b4,fp8-compile-b8}
echo "=== done $(date +%T)"
