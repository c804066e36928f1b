#!/bin/bash
# Image edits against Qwen-Image-Edit's and Edit-Plus's recipes, bf16 and fp8 (bench/edit.py). About 20
# minutes on an H200 in all, fp8's cold compiles included: run it again on the same warm machine until every
# scenario is done. ONLY: some of them (edit-bf16, edit-fp8, edit-plus-bf16, edit-plus-fp8).
source "$(dirname "$0")/env.sh"
python3 -c "import qwen_batch.weights.model_source as m; m.ensure_tiny_model('edit'); m.ensure_tiny_model('edit-plus')"
bench edit ${ONLY:+--only "$ONLY"}
