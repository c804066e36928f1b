#!/bin/bash
# Issue 26, device call 4 (the last of the session's device time): the eager-fp8 shapes probed wider, then
# the tiers call 3 ran out of time for: 80 GiB bf16 within 10 GiB, 16 GiB with 32 GiB (fp8-offload), and with
# the transformer as a GGUF Q4_K file (the published shards deleted to make room on the 64 GB disk):
# 16 GiB with 16 GiB (gguf resident), then ours against diffusers' own GGUF recipe in one process.
source "$(dirname "$0")/host_env.sh"
TAIL=20 step python3 bench/fp8_matmul_probe.py
TAIL=8 step $H write $M --json $J
drop_caches
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 80 --host-gib 16 --mode bf16 --prompts 4 --label bf16-80g-in-10g --json $J
TAIL=6 step $C 32 $H tier --model $M --gpu-gib 16 --host-gib 32 --prompts 3 --label 16g-32g --json $J
rm -f $M/transformer/*.safetensors $M/transformer/*.index.json
TAIL=4 step $H write-file $M/q4k.gguf --layout gguf-q4_k --json $J
TAIL=6 step $C 16 $H tier --model $M --transformer $M/q4k.gguf --gpu-gib 16 --host-gib 16 --prompts 2 --label gguf-16g-16g --json $J
TAIL=10 step $H versus-diffusers-gguf --model $M --transformer $M/q4k.gguf --gpu-gib 24 --host-gib 64 --steps 3 --prompts 2 --label gguf-24g-vs-diffusers --json $J
rm -rf $M; echo "=== done $(date +%T)"
