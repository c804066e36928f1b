#!/bin/bash
# Issue 17, call 2 (docs/benchmarks.md): FlashAttention-4 installed (part ab arrives now); the GPU tests
# that need it (the fast paths, and fp8 on a padded batch under it); the recipe against the engine
# before issue 17 and with the levers, bf16, in one process (ratios, image differences); then GPU busy
# over a 200-prompt manifest. About 9 minutes at the defaults.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs -s tests/test_gpu_speed_paths.py tests/test_attention.py
step $B versus --steps $S --prompts ${PROMPTS:-8} --compile-cache $W/cc --work $W/vs --json $J \
  --variants ${BF16_VARIANTS:-bf16-compile-before,bf16-compile,bf16-compile-pack,bf16-compile-aten-autotune,bf16-compile-aten-autotune-pack}
step $B engine --label busy-200 --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 200 \
  --steps ${BUSY_STEPS:-2} --work $W/busy --json $J
# TRACE=1: also a profiled 12-prompt run, whose result line lists the GPU's idle gaps (the trace stays there).
[ -n "${TRACE:-}" ] && step $B engine --label trace --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 \
  --prompts 12 --steps 2 --trace /tmp/trace.json --work $W/trace --json $J
echo "=== done $(date +%T)"
