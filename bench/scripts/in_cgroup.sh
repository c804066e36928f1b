#!/usr/bin/env bash
# Run a command inside its own cgroup v2 memory limit: `in_cgroup.sh GIB command...`. Swap off, so going
# over the limit is an OOM kill, not a slow run. Prints the group's settings, its peak memory (page cache
# included) and whether the OOM killer struck, then exits with the command's status (137 when killed).
set -u
limit_gib=$1; shift
if [ -n "${NO_CGROUP:-}" ]; then echo "(no cgroup: ${NO_CGROUP})"; exec "$@"; fi
root=/sys/fs/cgroup
grep -qw memory "$root/cgroup.subtree_control" || echo +memory > "$root/cgroup.subtree_control"
group="$root/qwen-batch-$$"
mkdir "$group"
bytes=$(awk -v g="$limit_gib" 'BEGIN { printf "%d", g * 1073741824 }')
echo "$bytes" > "$group/memory.max"
echo 0 > "$group/memory.swap.max" 2>/dev/null
echo "cgroup $group: memory.max $(cat "$group/memory.max"), swap.max $(cat "$group/memory.swap.max" 2>/dev/null), controllers $(cat "$group/cgroup.controllers")"
status=0
( echo "$BASHPID" > "$group/cgroup.procs"; exec "$@" ) || status=$?
peak=$(cat "$group/memory.peak" 2>/dev/null || echo 0)
echo "cgroup: limit ${limit_gib} GiB, peak $(awk -v p="$peak" 'BEGIN { printf "%.2f", p / 1073741824 }') GiB (page cache included), $(tr '\n' ' ' < "$group/memory.events"), exit ${status}"
[ "$status" = 137 ] && dmesg 2>/dev/null | tail -n 4
rmdir "$group" 2>/dev/null
exit $status
