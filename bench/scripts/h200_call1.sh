#!/bin/bash
# Issue 17, call 1 of the H200 series (docs/benchmarks.md): install what the image lacks, leave part aa
# of FlashAttention-4's CuTe DSL libraries in /tmp for call 2, and run the GPU tests, which need no
# FlashAttention-4 (its own tests skip here and run in call 2); then the GEMM microbenchmark.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs tests/test_gpu.py tests/test_gpu_adapters.py tests/test_gpu_speed_paths.py tests/test_memory_modes.py
step $B linear --json $J  # each block GEMM: Inductor against cuBLASLt's bias and GELU epilogues, fp8 formats
echo "=== done $(date +%T)"
