#!/bin/bash
# GPU call 2 of bench/qwen_image_gpu.py (see docs/benchmarks.md): fp8 compiled, cold then warm (the
# warm run on an emulated 24 GiB card, planned by --memory-mode auto), fp8 vs bf16 images, attention
# backends, and the tiers call 1 had no time for. Needs call 1's bf16 images in .whl/bf16-eager-images.tar.
BUDGET=${BUDGET:-540}
source "$(dirname "$0")/common.sh"
mkdir -p $W/ref && tar -xf .whl/bf16-eager-images.tar -C $W/ref
step $B engine --label fp8-compile-cold --mode fp8 --batch-size 1 --compile on --compile-cache $W/cc8 --prompts 4 --steps 6 --work $W/f8cold --json $J
step $B engine --label fp8-compile-warm-24 --gpu-gib 24 --compile on --compile-cache $W/cc8 --prompts 4 --steps 6 --work $W/f8warm --json $J
step $B compare $W/ref/images $W/f8cold/out/images --label "fp8 vs bf16 eager" --json $J
step $B attention --rows 4 --json $J
step $B engine --label tier-12 --gpu-gib 12 --prompts 4 --steps 4 --work $W/t12 --json $J
step $B engine --label sequential-16 --gpu-gib 16 --mode sequential --batch-size 1 --prompts 1 --steps 2 --work $W/seq --json $J
echo "=== done $(date +%T)"
