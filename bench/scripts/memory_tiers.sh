#!/bin/bash
# The memory tiers (bench/memory_tiers.py, docs/memory.md): emulated smaller cards with the model built in
# memory, then the tiers with the model read from disk, each in a cgroup of its host RAM (run as root: the
# cgroups and the page-cache drops need it). The full-size checkpoint (58 GB) is written to
# $QWEN_BENCH_WORK/checkpoint first and kept while the machine stays warm; the GGUF tiers replace its
# transformer's shards with one Q4_K file (the 64 GB disk holds one of the two). Run again until done.
# ONLY: some of them (`python -m bench.memory_tiers --list`).
source "$(dirname "$0")/env.sh"
bench memory_tiers ${ONLY:+--only "$ONLY"}
