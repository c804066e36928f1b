#!/bin/bash
# GPU call 1 of bench/qwen_image_gpu.py (see docs/benchmarks.md): recipe, bf16 engine eager/compiled
# (cold, then warm from the same cache), and the emulated memory tiers. Each run is its own process.
source "$(dirname "$0")/common.sh"
step $B recipe --steps $S --prompts 2 --json $J --images $W/recipe
step $B engine --label bf16-eager-48 --gpu-gib 48 --mode bf16 --batch-size 4 --prompts 4 --steps $S --work $W/e48 --json $J
step $B engine --label bf16-compile-cold --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 4 --steps $S --work $W/cold --json $J
step $B engine --label bf16-compile-warm --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 4 --steps $S --work $W/warm --json $J
step $B compare $W/e48/out/images $W/cold/out/images --label "bf16 eager vs compiled" --json $J
step $B compare $W/recipe $W/e48/out/images --label "recipe vs engine bf16 eager" --json $J
step $B engine --label tier-16 --gpu-gib 16 --prompts 4 --steps 4 --work $W/t16 --json $J
step $B engine --label tier-24 --gpu-gib 24 --prompts 2 --steps 4 --work $W/t24 --json $J
step $B engine --label tier-24-fp8-forced --gpu-gib 24 --plan-gib 25 --mode fp8 --batch-size 1 --prompts 2 --steps 4 --work $W/t24f --json $J
step $B engine --label tier-8 --gpu-gib 8 --prompts 4 --steps 4 --work $W/t8 --json $J
step $B engine --label tier-12 --gpu-gib 12 --prompts 4 --steps 4 --work $W/t12 --json $J
step $B engine --label sequential-16 --gpu-gib 16 --mode sequential --batch-size 1 --prompts 1 --steps 2 --work $W/seq --json $J
tar -cf $OUT/bf16-eager-images.tar -C $W/e48/out images 2>/dev/null
echo "=== done $(date +%T)"; cat $J | cut -c1-400
