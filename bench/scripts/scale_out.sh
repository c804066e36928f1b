#!/bin/bash
# One manifest on 1 GPU and on 2 GPUs as 2 shard processes (bench/scale_out.py, docs/scale-out.md): about 12
# minutes on 2 H100s; one side per command where a command may run 10 minutes (ONLY=one-gpu, then
# ONLY=two-gpus, on the same warm machine: the speedup line comes once both are in the results file).
# The bytecode of every package is compiled first, as in a worker image built with pip's defaults: the device
# image writes no .pyc (PYTHONDONTWRITEBYTECODE=1), its own packages ship without them and the carried wheels
# are installed with --no-compile, so each process would compile them from source at start (measured on a
# 2xH100 host: importing what a shard imports took 10.9 s with only torch, transformers and the wheels
# compiled, 7.8 s with everything).
source "$(dirname "$0")/env.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
site_packages=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m compileall -q -j 0 /tmp/site qwen_batch bench "$site_packages" > /dev/null
bench scale_out ${ONLY:+--only "$ONLY"}
