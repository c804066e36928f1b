#!/bin/bash
# GPU busy over a 200-prompt manifest at BUSY_STEPS (2) steps, bf16 compiled, batch 4: the issue's 97%
# target, from the second batch on; alone on the host, since a second process's compile would steal
# the CPU that feeds the GPU. Called by h200_call2.sh and by h200_pair.sh's AFTER.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
step $B engine --label busy-200 --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 200 \
  --steps ${BUSY_STEPS:-2} --work $W/busy --json $J
# TRACE=1: also a profiled 12-prompt run, whose result line lists the GPU's idle gaps (the trace stays there).
[ -n "${TRACE:-}" ] && step $B engine --label trace --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 \
  --prompts 12 --steps 2 --trace /tmp/trace.json --work $W/trace --json $J
echo "=== busy done $(date +%T)"
