#!/bin/bash
# Issue 7, bf16 (docs/benchmarks.md, H100 history): the GPU tests of the fast paths, the attention
# kernels, the recipe and the engine's bf16 variants in one process (ratios and image differences),
# then GPU busy over a 200-prompt manifest. The FlashAttention-2 varlen kernel of the H100 table is
# gone: the variants are now the engine before issue 17 and the current default. Results:
# $OUT/results.jsonl.
source "$(dirname "$0")/common.sh"
TAIL=40 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -s tests/test_gpu_speed_paths.py tests/test_gpu.py tests/test_memory_modes.py
step $B attention --rows 4 --rounds 3 --json $J
step $B attention --rows 4 --rounds 3 --compile --json $J
step $B versus --steps $S --prompts 4 --variants bf16-compile-before,bf16-compile --compile-cache $W/cc --work $W/vs --json $J
step $B engine --label busy-200 --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 200 --steps ${BUSY_STEPS:-2} --work $W/busy --json $J
echo "=== done $(date +%T)"
