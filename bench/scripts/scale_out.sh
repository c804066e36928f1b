#!/bin/bash
# Issue 9 (see docs/scale-out.md): one manifest on 1 GPU and on N GPUs as N shard processes.
#   bench/scripts/scale_out.sh GPUS ROWS STEPS [one|many]   (no side: both, in one command)
# The bytecode of every package is compiled first, as in a worker image built with pip's defaults:
# the device image writes no .pyc (PYTHONDONTWRITEBYTECODE=1), its own packages ship without them
# (sympy, numpy, networkx, jinja2, safetensors: measured) and the carried wheels are installed with
# --no-compile, so each process would compile them from source at start. Measured on a 2xH100 host:
# importing what a shard imports took 10.9 s with only torch, transformers and the wheels compiled,
# 7.8 s with everything. Results: $OUT/scale_out.json and the log.
# TESTS=1 also runs the GPU tests after the timed part.
source "$(dirname "$0")/common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPUS=$1 ROWS=$2 STEPS=$3 SIDE=${4:-}
python3 -c "import sys, os; print('dont_write_bytecode', sys.dont_write_bytecode, os.environ.get('PYTHONDONTWRITEBYTECODE'))"
site_packages=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TAIL=2 step python3 -m compileall -q -j 0 /tmp/site qwen_batch bench "$site_packages"
TAIL=3 step bash -c "python3 bench/scale_out.py --gpus $GPUS --rows $ROWS --steps $STEPS ${SIDE:+--only $SIDE} \
  --work /tmp/qso --json $OUT/scale_out.json > $OUT/scale_out.log 2>&1; echo exit \$?"
grep -v "Loading\|it/s\]\|SyntaxWarning" "$OUT/scale_out.log" | grep "shard\|Error\|error" | tail -n 30
[ -n "${TESTS:-}" ] && TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning \
  tests/test_gpu_speed_paths.py tests/test_gpu.py tests/test_memory_modes.py
echo "=== done $(date +%T)"
