#!/bin/bash
# Issue 9 (see docs/scale-out.md): one manifest on 1 GPU and on N GPUs as N shard processes.
#   bench/scripts/scale_out.sh GPUS ROWS STEPS [one|many]   (no side: both, in one command)
# The bytecode of every package is compiled first: the device image sets no .pyc to be written and
# its wheels are installed with --no-compile, so each process would otherwise compile diffusers,
# transformers and torchao from source again (about 10 s of every process's start, measured); a
# worker image built with pip's defaults has it compiled. Results: $OUT/scale_out.json and the log.
# TESTS=1 also runs the GPU tests after the timed part.
source "$(dirname "$0")/common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPUS=$1 ROWS=$2 STEPS=$3 SIDE=${4:-}
python3 -c "import sys, os; print('dont_write_bytecode', sys.dont_write_bytecode, os.environ.get('PYTHONDONTWRITEBYTECODE'))"
packages=$(python3 -c "import os, torch, transformers; print(*(os.path.dirname(m.__file__) for m in (torch, transformers)))")
TAIL=2 step python3 -m compileall -q -j 0 /tmp/site qwen_batch bench $packages
TAIL=3 step bash -c "python3 bench/scale_out.py --gpus $GPUS --rows $ROWS --steps $STEPS ${SIDE:+--only $SIDE} \
  --work /tmp/qso --json $OUT/scale_out.json > $OUT/scale_out.log 2>&1; echo exit \$?"
grep -v "Loading\|it/s\]\|SyntaxWarning" "$OUT/scale_out.log" | grep "shard\|Error\|error" | tail -n 30
[ -n "${TESTS:-}" ] && TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning \
  tests/test_gpu_speed_paths.py tests/test_gpu.py tests/test_memory_modes.py
echo "=== done $(date +%T)"
