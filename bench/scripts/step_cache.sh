#!/bin/bash
# Issue 28 (see docs/benchmarks.md#step-caching-issue-28): step caching per row at full size with forced
# fractions of computed steps, one memory mode per device call: MODE=bf16 (about 5 minutes on an H200) or
# MODE=fp8 (its cold compiles, about 200 s for the blocks and 100 s for each further sub-batch size, overran
# one 8-minute call in session 10: run it twice on the same warm machine; the second call reads the compiles
# back from $W/cc-fp8 and measures all). Results: $OUT/results.jsonl, one line per configuration and a
# summary line; the log shows progress. STEPS (10): steps run of the 50-step configurations. ONLY: a comma list
# of configuration labels to run (e.g. ONLY=cfg-row-40%,cfg-staggered-40%), default all.
source "$(dirname "$0")/fast_env.sh"  # on the lent device: the carried wheels, FlashAttention-4 included
source "$(dirname "$0")/common.sh"
MODE=${MODE:-bf16}
TAIL=60 step python3 bench/step_cache_gpu.py --mode $MODE --steps ${STEPS:-10} --compile-cache $W/cc-$MODE \
  --budget $(( deadline - $(date +%s) - 45 )) ${ONLY:+--only $ONLY} --json $J
echo "=== done $(date +%T)"
