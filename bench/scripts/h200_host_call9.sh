#!/bin/bash
# Issue 26, session 9, device call 9: bf16 from disk against built in memory, in one process, in ABBA rounds
# (session 8's single pair read 1.057 from two prompts). Also copies FlashAttention-4's first part (.fa4a) to
# /tmp/fa4 for the conditions benchmark that follows on the same warm machine (bench/scripts/conditions.sh).
source "$(dirname "$0")/host_env.sh"
mkdir -p /tmp/fa4 && [ -d .fa4a ] && cp .fa4a/* /tmp/fa4/
[ -d $M/transformer ] || TAIL=8 step $H write $M --json $J
drop_caches
TAIL=6 step $H versus-memory --model $M --mode bf16 --gpu-gib 80 --prompts 4 --rounds 4 --label bf16-disk-vs-memory-abba --json $J
rm -rf $M; echo "=== done $(date +%T)"
