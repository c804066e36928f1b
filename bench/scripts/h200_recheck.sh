#!/bin/bash
# Issue 17, after session 5 (docs/benchmarks.md): the checks the blocks' compile-once marking for packed
# text still needs on a GPU. GPU busy over 200 prompts with packed text (the default; process 13 lost
# 76.5% to a recompile before the padded layout's length was marked) with the idle-gap trace, then
# every memory mode (fp8 on every linear too) and the fast-path tests under FlashAttention-4. Run
# after a call that carried `.whl` and `.fa4a`, carrying `.fa4b` (fast_env.sh). About 9 minutes.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TRACE=1 bash "$(dirname "$0")/h200_busy.sh"  # the same deadline (CALL_START)
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs \
  tests/test_memory_modes.py tests/test_gpu_speed_paths.py tests/test_attention.py
echo "=== done $(date +%T)"
