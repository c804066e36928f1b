#!/bin/bash
# Issue 26, session 8, device call 8 (warm after call 7): fp8 adapter switching with the originals read back
# from the mapped checkpoint (16 GiB cgroup), then the transformer as a GGUF Q4_K file (the shards deleted to
# fit the 64 GB disk) on an 8 GiB card with 16 GiB of RAM.
source "$(dirname "$0")/host_env.sh"
[ -d $M/transformer ] || TAIL=8 step $H write $M --json $J
TAIL=4 step $C 16 python3 bench/lora_gpu.py switching --model $M --mode fp8 --compile off --rows 8 --work $W/l --json $J
rm -f $M/transformer/*.safetensors $M/transformer/*.index.json
TAIL=4 step $H write-file $M/q4k.gguf --layout gguf-q4_k --json $J
drop_caches
TAIL=6 step $C 16 $H tier --model $M --transformer $M/q4k.gguf --gpu-gib 8 --host-gib 16 --prompts 2 --label gguf-8g-16g --json $J
rm -rf $M; echo "=== done $(date +%T)"
