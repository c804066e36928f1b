#!/bin/bash
# Issue 26, device call 3: which shapes eager fp8 runs (call 2's 24 GiB tier hit CUBLAS_STATUS_NOT_SUPPORTED),
# the GPU tests of the weights paths, then the tiers from disk with a cold page cache (so the reads are the
# cgroup's own): 24 GiB fp8 and 80 GiB bf16 within 10 GiB of RAM, 16 GiB with 32 GiB (fp8-offload), and the
# bf16 per-forward time loaded from disk against built in memory, same process.
source "$(dirname "$0")/host_env.sh"
TAIL=20 step python3 bench/fp8_matmul_probe.py
TAIL=12 step python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_weights.py
TAIL=8 step $H write $M --json $J
drop_caches
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --label fp8-24g-in-10g --json $J
if tail -n 1 $J | grep -q '"label": "fp8-24g-in-10g".*"error"'; then
  TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --compile on --label fp8-24g-in-10g-compiled --json $J; fi
drop_caches
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 80 --host-gib 16 --mode bf16 --prompts 4 --label bf16-80g-in-10g --json $J
TAIL=6 step $C 32 $H tier --model $M --gpu-gib 16 --host-gib 32 --prompts 3 --label 16g-32g --json $J
TAIL=6 step $H versus-memory --model $M --mode bf16 --gpu-gib 80 --prompts 4 --label bf16-disk-vs-memory --json $J
rm -rf $M; echo "=== done $(date +%T)"
