#!/bin/bash
# Issue 26, session 8, device call 6 (warm after call 5: the checkpoint is still on disk): the GPU tests of
# the weights paths and the memory modes (changed since call 3), then two tiers not yet run: 12 GiB with
# 32 GiB (planned fp8-offload) and two 24 GiB fp8 processes sharing one 64 GiB host (one cgroup; memory
# only: they share one GPU here, so their speeds are not a card's).
source "$(dirname "$0")/host_env.sh"
[ -d $M/transformer ] || TAIL=8 step $H write $M --json $J
TAIL=20 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs \
  tests/test_gpu_weights.py tests/test_memory_modes.py tests/test_gpu_speed_paths.py
drop_caches
TAIL=6 step $C 32 $H tier --model $M --gpu-gib 12 --host-gib 32 --prompts 3 --label 12g-32g --json $J
drop_caches
two() { $H tier --model $M --gpu-gib 24 --host-gib 32 --prompts 2 --label two-on-64g-$1 --json $OUT/two-$1.jsonl; }
TAIL=12 step $C 64 bash -c "$(declare -f two); H='$H' M=$M OUT=$OUT; two a & two b & wait"
cat $OUT/two-*.jsonl >> $J 2>/dev/null
echo "=== done $(date +%T)"
