#!/bin/bash
# Step caching per row at full size in bf16, forced fractions of computed steps (bench/step_cache.py): about
# 5 minutes on an H200; one line per configuration as it finishes, then a summary line. ONLY: some of them,
# e.g. ONLY=bf16-cfg-row-40%,bf16-cfg-staggered-40%.
source "$(dirname "$0")/env.sh"
bench step_cache --only "${ONLY:-bf16-*}"
