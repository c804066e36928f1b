#!/bin/bash
# Issue 26, session 8, device call 7 (warm after call 6: the checkpoint is still on disk): bf16 loaded from
# disk against built in memory (same process), then the 24 GiB fp8 tier compiled (as today's fp8 runs) in
# a 10 GiB cgroup.
source "$(dirname "$0")/host_env.sh"
[ -d $M/transformer ] || TAIL=8 step $H write $M --json $J
TAIL=6 step $H versus-memory --model $M --mode bf16 --gpu-gib 80 --prompts 2 --label bf16-disk-vs-memory --json $J
drop_caches
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --prompts 3 --compile on --label fp8-24g-in-10g-compiled --json $J
echo "=== done $(date +%T)"
