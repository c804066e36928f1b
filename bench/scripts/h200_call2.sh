#!/bin/bash
# Issue 17, call 2 (docs/benchmarks.md): FlashAttention-4 installed (part ab arrives now); the GPU tests
# that need it (the fast paths, and fp8 on a padded batch under it); the recipe against the engine
# before issue 17 and with the levers, bf16, in one process (ratios, image differences); then GPU busy
# over a 200-prompt manifest (BUSY_STEPS=0 skips it). About 9 minutes at the defaults.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs -s tests/test_gpu_speed_paths.py tests/test_attention.py
step $B versus --steps $S --prompts ${PROMPTS:-8} --compile-cache $W/cc --work $W/vs --json $J \
  --variants ${BF16_VARIANTS:-bf16-compile-before,bf16-compile-nopack,bf16-compile}
[ "${BUSY_STEPS:-2}" != 0 ] && bash "$(dirname "$0")/h200_busy.sh"  # the same deadline (CALL_START)
echo "=== done $(date +%T)"
