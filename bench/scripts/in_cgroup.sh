#!/usr/bin/env bash
# Run a command inside its own cgroup v2 memory limit: `in_cgroup.sh GIB command...`. Swap off, so going
# over the limit is an OOM kill, not a slow run. Prints the group's peak memory (page cache included) and
# whether the OOM killer struck, then exits with the command's status (137 when killed).
set -u
limit_gib=$1; shift
root=/sys/fs/cgroup
grep -qw memory "$root/cgroup.subtree_control" || echo +memory > "$root/cgroup.subtree_control"
group="$root/qwen-batch-$$"
mkdir "$group"
python3 -c "print(int(float('$limit_gib') * 2**30))" > "$group/memory.max"
echo 0 > "$group/memory.swap.max" 2>/dev/null
status=0
( echo "$BASHPID" > "$group/cgroup.procs"; exec "$@" ) || status=$?
peak=$(cat "$group/memory.peak" 2>/dev/null || echo 0)
kills=$(awk '/^oom_kill / {print $2}' "$group/memory.events")
echo "cgroup: limit ${limit_gib} GiB, peak $(python3 -c "print(round($peak / 2**30, 2))") GiB (page cache included), oom_kill ${kills:-0}, exit ${status}"
rmdir "$group" 2>/dev/null
exit $status
