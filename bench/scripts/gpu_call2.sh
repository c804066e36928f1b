#!/bin/bash
# GPU call 2 of bench/qwen_image_gpu.py (see docs/benchmarks.md): fp8 compiled, cold then warm (the
# warm run on an emulated 24 GiB card, planned by --memory-mode auto), fp8 vs bf16 images, attention
# backends, and the tiers call 1 had no time for. Needs call 1's bf16 images in .whl/bf16-eager-images.tar.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export QWEN_BATCH_HOME=/tmp/qbh PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
B="python3 bench/qwen_image_gpu.py"; J=$OUT/results.jsonl; W=/tmp/qbw
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
step() { local left=$(( deadline - $(date +%s) )); if [ $left -lt 20 ]; then echo "SKIP (time) $*"; return; fi
  echo "=== $(date +%T) [$left s left] $*"; timeout $left "$@" 2>&1 | grep -v "Loading\|it/s\]\|SyntaxWarning\|Configuration class" | tail -n 25; }
mem=$(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo); [ "$mem" -lt 100 ] && export QWEN_BATCH_HOST_MEMORY_GIB=125
python3 -c "import qwen_batch.model_source as m; m.ensure_tiny_model()"
mkdir -p $W/ref && tar -xf .whl/bf16-eager-images.tar -C $W/ref
step $B engine --label fp8-compile-cold --mode fp8 --batch-size 1 --compile on --compile-cache $W/cc8 --prompts 4 --steps 6 --work $W/f8cold --json $J
step $B engine --label fp8-compile-warm-24 --gpu-gib 24 --compile on --compile-cache $W/cc8 --prompts 4 --steps 6 --work $W/f8warm --json $J
step $B compare $W/ref/images $W/f8cold/out/images --label "fp8 vs bf16 eager" --json $J
step $B attention --rows 4 --json $J
step $B engine --label tier-12 --gpu-gib 12 --prompts 4 --steps 4 --work $W/t12 --json $J
step $B engine --label sequential-16 --gpu-gib 16 --mode sequential --batch-size 1 --prompts 1 --steps 2 --work $W/seq --json $J
echo "=== done $(date +%T)"
