#!/bin/bash
# Image editing at full size (see bench/edit_gpu.py): Qwen-Image-Edit's recipe against the engine's bf16
# and fp8 compiled variants, then Edit-Plus (two input images a row) against bf16 compiled, each in one
# process with the recipe before and after. About 9 minutes on an H200 at the defaults, of which the fp8
# variant's cold compile is 4 (measured: 43 s setup, edit 407 s with 2 images, edit-plus 110 s with 2).
# Results: $OUT/results.jsonl. STEPS (6); EDIT_IMAGES (2), PLUS_IMAGES (1): rows per task;
# EDIT_VARIANTS, PLUS_VARIANTS: the engine variants of each (bench/qwen_image_gpu.py's VARIANTS);
# TASKS (edit,edit-plus): which of the two to run.
source "$(dirname "$0")/fast_env.sh"  # on the lent device: the carried wheels, FlashAttention-4 included
source "$(dirname "$0")/common.sh"
X="python3 bench/edit_gpu.py"
wants() { [[ ",${TASKS:-edit,edit-plus}," == *",$1,"* ]]; }
python3 -c "import qwen_batch.weights.model_source as m; m.ensure_tiny_model('edit'); m.ensure_tiny_model('edit-plus')"
wants edit && step $X versus --task edit --steps $S --images ${EDIT_IMAGES:-2} --variants ${EDIT_VARIANTS:-bf16-compile,fp8-compile-b4} --compile-cache $W/cce --work $W/edit --json $J
wants edit-plus && step $X versus --task edit-plus --steps $S --images ${PLUS_IMAGES:-1} --variants ${PLUS_VARIANTS:-bf16-compile} --compile-cache $W/cce --work $W/edit-plus --json $J
echo "=== done $(date +%T)"
