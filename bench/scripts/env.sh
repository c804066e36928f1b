# Sourced by the scripts here, from the repository root on a GPU machine: the environment every benchmark
# runs in, and `bench MODULE [OPTIONS]`, which runs `python -m bench.MODULE` into $OUT/results.jsonl with the
# seconds left of BUDGET (560 by default, counted from the first script's start: one command on the lent device
# may run 10 minutes). What did not fit runs when the same script runs again on the same warm machine: the
# harness skips the scenarios the results file says are done. Work folders and compile caches stay in
# $QWEN_BENCH_WORK (/tmp/qbw) between commands; two runs at once on two GPUs each set their own
# (on_two_gpus.sh).
#
# The lent device's missing packages (diffusers, torchao, FlashAttention-4...) are that machine's gaps, not the
# project's: source its setup first (`source ../shared/device/setup.sh` from the repository root), or install
# the project's [gpu,fast] extras on your own machine.
set -u
export CALL_START=${CALL_START:-$(date +%s)}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export QWEN_BATCH_HOME=${QWEN_BATCH_HOME:-/tmp/qbh} QWEN_BENCH_WORK=${QWEN_BENCH_WORK:-/tmp/qbw}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
# A VM whose RAM grows on use reports less than it has: plan for the lent machine's 128 GiB.
mem=$(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo)
[ "$mem" -lt 100 ] && export QWEN_BATCH_HOST_MEMORY_GIB=125
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"

bench() {
  local module=$1; shift
  local left=$(( CALL_START + ${BUDGET:-560} - $(date +%s) ))
  echo "=== $(date +%T) bench.$module $* [$left s left]"
  python3 -m "bench.$module" --json "$OUT/results.jsonl" --budget "$left" "$@"
}
