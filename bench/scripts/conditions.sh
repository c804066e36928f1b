#!/bin/bash
# ControlNet and inpainting rows against diffusers' pipelines, bf16 and fp8 (bench/conditions.py). The
# full-size ControlNet is written once to the work folder. Run again on the same warm machine until every
# scenario is done. ONLY: some of them (controlnet-bf16, controlnet-fp8, inpaint-bf16, inpaint-fp8).
source "$(dirname "$0")/env.sh"
bench conditions ${ONLY:+--only "$ONLY"}
