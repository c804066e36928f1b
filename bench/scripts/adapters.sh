#!/bin/bash
# LoRA adapters (bench/adapters.py): Lightning against diffusers' Lightning and 50-step recipes, bf16 and
# fp8, and switching 4 adapter sets over 64 rows (its recompiles logged by TORCH_LOGS=recompiles on stderr).
# ONLY: some of them (lightning-bf16, lightning-fp8, switching-bf16, switching-fp8).
source "$(dirname "$0")/env.sh"
bench adapters ${ONLY:+--only "$ONLY"}
