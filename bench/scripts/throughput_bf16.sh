#!/bin/bash
# Text-to-image in bf16 against the diffusers recipe (docs/benchmarks.md): the default engine in one process
# with the recipe before and after, then GPU busy over 200 prompts. ONLY: other scenarios of bench/throughput.py
# (`python -m bench.throughput --list`), e.g. ONLY=bf16-levers.
source "$(dirname "$0")/env.sh"
bench throughput --only "${ONLY:-bf16,busy-200}"
