#!/bin/bash
# ControlNet and inpainting rows at full size (bench/conditions_gpu.py, issue 27): diffusers'
# QwenImageControlNetPipeline / QwenImageInpaintPipeline against the engine's variants, in one process with
# the recipe before and after. TASK (controlnet | inpaint), VARIANTS (bench/qwen_image_gpu.py's VARIANTS),
# IMAGES (4), STEPS (6). A bf16 variant takes about 3.5 minutes with the two recipe runs and its cold
# compile. An fp8 variant cold did not fit one call (session 9: the transformer built and handed over in host
# RAM, then cold fp8 compiles of the transformer's and the ControlNet's blocks, over 8 minutes): run it with
# WARM=1 first (one step, its own folders: fills the compile cache), then again on the same warm machine; or
# point CC at a compile cache an fp8 run on the same machine has filled (session 10: CC=/tmp/qbw/cc-fp8 after
# MODE=fp8 step_cache.sh, and the ControlNet fp8 variant fitted one call).
# FlashAttention-4 needs .fa4a and .fa4b carried (fast_env.sh), in two calls on one warm machine.
source "$(dirname "$0")/fast_env.sh"
source "$(dirname "$0")/common.sh"
if [ -n "${WARM:-}" ]; then S=1; J=$OUT/warm.jsonl; TASK_WORK=$W/warm-${TASK:-controlnet}; fi
step python3 bench/conditions_gpu.py versus --task ${TASK:-controlnet} --steps $S --images ${IMAGES:-4} \
  --variants ${VARIANTS:-bf16-compile} --compile-cache ${CC:-$W/cc} --work ${TASK_WORK:-$W/${TASK:-controlnet}} --json $J
if [ -n "${GPU_TESTS:-}" ]; then
  TAIL=15 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -rs $GPU_TESTS
fi
echo "=== done $(date +%T)"
