#!/bin/bash
# Issue 26, session 8, device call 5: does padding the text stream to 64 under fp8 cure cuBLASLt's
# NOT_SUPPORTED (the probe's K=12288 rows, then the 24 GiB fp8 tier that stopped in call 3), and is the
# transformer loaded from disk as fast as today's fp8 (built in memory, placed by `place_transformer`),
# same process, same 24 GiB cap. The checkpoint stays on disk for call 6 (the machine stays warm).
source "$(dirname "$0")/host_env.sh"
TAIL=30 step python3 bench/fp8_matmul_probe.py
[ -d $M/transformer ] || TAIL=8 step $H write $M --json $J
drop_caches
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --prompts 3 --label fp8-24g-in-10g --json $J
TAIL=6 step $H versus-memory --model $M --mode fp8 --gpu-gib 24 --prompts 4 --label fp8-disk-vs-memory --json $J
echo "=== done $(date +%T)"
