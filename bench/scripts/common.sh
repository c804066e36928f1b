# Sourced by the GPU benchmark scripts here: output folder, environment, a time-boxed `step` runner
# (one device command may run 10 minutes: later steps are skipped, not cut off), the host's memory.
# QWEN_BATCH_HOME, J and W (work folders, compile caches) may be set per script when two run at once on
# two GPUs (h200_pair.sh).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export QWEN_BATCH_HOME=${QWEN_BATCH_HOME:-/tmp/qbh} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
B="python3 bench/qwen_image_gpu.py"; J=${J:-$OUT/results.jsonl}; W=${W:-/tmp/qbw}; S=${STEPS:-6}
# BUDGET: seconds from the device call's start (CALL_START, set by the first script that runs; nested
# scripts inherit it, so they share the one deadline), installs included.
export CALL_START=${CALL_START:-$(date +%s)}; deadline=$(( CALL_START + ${BUDGET:-560} ))
step() { local left=$(( deadline - $(date +%s) )); if [ $left -lt 20 ]; then echo "SKIP (time) $*"; return; fi
  echo "=== $(date +%T) [$left s left] $*"; timeout $left "$@" 2>&1 | grep -v "Loading\|it/s\]\|SyntaxWarning\|Configuration class" | tail -n ${TAIL:-25}; }
mem=$(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo); echo "MemTotal ${mem} GiB" > "$OUT/host.txt"
[ "$mem" -lt 100 ] && export QWEN_BATCH_HOST_MEMORY_GIB=125  # RAM that grows on use: plan for the machine's 128
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import qwen_batch.weights.model_source as m; m.ensure_tiny_model()"
