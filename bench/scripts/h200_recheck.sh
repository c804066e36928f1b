#!/bin/bash
# Issue 17 (docs/benchmarks.md): the GPU checks of the blocks' compile-once marking for packed text, run
# in session 6 as processes h200-14 and -15. GPU busy over 200 prompts with packed text (the default;
# process 13 lost 76.5% to a recompile before the padded layout's length was marked) with the idle-gap
# trace, then every memory mode (fp8 on every linear too) and the fast-path tests under
# FlashAttention-4. Run after a call that carried `.whl` and `.fa4a`, carrying `.fa4b` (fast_env.sh).
# The busy run and the trace take about 4.5 minutes; the tests did not finish within one 10-minute
# call after them, so session 6 reran them in the next call.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TRACE=1 bash "$(dirname "$0")/h200_busy.sh"  # the same deadline (CALL_START)
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs \
  tests/test_memory_modes.py tests/test_gpu_speed_paths.py tests/test_attention.py
echo "=== done $(date +%T)"
