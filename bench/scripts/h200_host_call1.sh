#!/bin/bash
# Issue 26, device call 1 (docs/memory.md, "Host RAM"): the full-size random model written in the published
# layout (58 GB on the 64 GB disk), then the whole run (encode and denoise) from it, each tier inside a
# cgroup memory limit: a 24 GiB card in fp8 and an 80 GiB one in bf16 within 10 GiB of RAM; a 16 GiB card
# with 32 GiB (fp8-offload). Results: $OUT/host.jsonl.
source "$(dirname "$0")/host_env.sh"
TAIL=8 step $H write $M --json $J
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --label fp8-24g-in-10g --json $J
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 80 --host-gib 16 --mode bf16 --prompts 4 --label bf16-80g-in-10g --json $J
TAIL=6 step $C 32 $H tier --model $M --gpu-gib 16 --host-gib 32 --prompts 3 --label 16g-32g --json $J
TAIL=12 step python3 -m pytest -q -m gpu -p no:cacheprovider -x tests/test_gpu_weights.py
rm -rf $M; echo "=== done $(date +%T)"
