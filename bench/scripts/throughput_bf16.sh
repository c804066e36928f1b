#!/bin/bash
# Issue 7, bf16 (see docs/benchmarks.md): the GPU tests of the fast paths, the attention kernels, the
# recipe and the engine's bf16 variants in one process (ratios and image differences), then GPU busy
# over a 200-prompt manifest. Results: $OUT/results.jsonl.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export QWEN_BATCH_HOME=/tmp/qbh PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
B="python3 bench/qwen_image_gpu.py"; J=$OUT/results.jsonl; W=/tmp/qbw; S=${STEPS:-6}
deadline=$(( $(date +%s) + ${BUDGET:-560} ))
step() { local left=$(( deadline - $(date +%s) )); if [ $left -lt 20 ]; then echo "SKIP (time) $*"; return; fi
  echo "=== $(date +%T) [$left s left] $*"; timeout $left "$@" 2>&1 | grep -v "Loading\|it/s\]\|SyntaxWarning\|Configuration class" | tail -n ${TAIL:-25}; }
mem=$(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo); [ "$mem" -lt 100 ] && export QWEN_BATCH_HOST_MEMORY_GIB=125
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import qwen_batch.model_source as m; m.ensure_tiny_model()"
TAIL=40 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -s tests/test_gpu_speed_paths.py tests/test_gpu.py tests/test_memory_modes.py
step $B attention --rows 4 --rounds 3 --json $J
step $B attention --rows 4 --rounds 3 --compile --json $J
step $B versus --steps $S --prompts 4 --variants bf16-compile-sdpa,bf16-compile-varlen --compile-cache $W/cc --work $W/vs --json $J
step $B engine --label busy-200 --mode bf16 --compile on --compile-cache $W/cc --batch-size 4 --prompts 200 --steps ${BUSY_STEPS:-2} --work $W/busy --json $J
echo "=== done $(date +%T)"
