#!/bin/bash
# Issue 7, fp8 (see docs/benchmarks.md): the recipe and the engine's fp8 mode (torchao, compiled) at
# batch 4 and 2 on an 80 GB card, in one process each with the recipe before and after.
source "$(dirname "$0")/common.sh"
step $B versus --steps $S --prompts 4 --variants fp8-compile-b4 --compile-cache $W/cc8 --work $W/vs4 --json $J
step $B versus --steps $S --prompts 2 --variants fp8-compile-b2 --compile-cache $W/cc8 --work $W/vs2 --json $J
echo "=== done $(date +%T)"
