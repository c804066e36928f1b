#!/bin/bash
# Issue 26, device call 2: call 1's cgroup runs were killed at once (oom_kill 1, peak 0): the cgroup itself
# checked first, then the fp8-offload GPU test alone (its traceback), then call 1's tiers again.
source "$(dirname "$0")/host_env.sh"
if ! $C 4 python3 -c "import torch; x = torch.ones(2**28); print('in the cgroup:', x.sum().item())"; then
  export NO_CGROUP="a 4 GiB cgroup killed a 1 GiB process: the tiers run without a limit, RSS measured"; fi
$C 4 python3 -c "import torch; x = torch.ones(2**28, device='cuda'); print('cuda in the cgroup:', x.sum().item())"
TAIL=40 step python3 -m pytest -q -m gpu -p no:cacheprovider -x --tb=long tests/test_gpu_weights.py -k fp8_offload
TAIL=8 step $H write $M --json $J
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 24 --host-gib 16 --label fp8-24g-in-10g --json $J
TAIL=6 step $C 10 $H tier --model $M --gpu-gib 80 --host-gib 16 --mode bf16 --prompts 4 --label bf16-80g-in-10g --json $J
TAIL=6 step $C 32 $H tier --model $M --gpu-gib 16 --host-gib 32 --prompts 3 --label 16g-32g --json $J
rm -rf $M; echo "=== done $(date +%T)"
