# Sourced by the host-memory scripts (issue 26): the wheels the device image lacks (diffusers, torchao,
# gguf, importlib_metadata from `.whl`) into /tmp/site, then common.sh (OUT, step, the call's deadline).
export PYTHONPATH=/tmp/site
export CALL_START=${CALL_START:-$(date +%s)}
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
H="python3 bench/host_memory.py"; C="bash bench/scripts/in_cgroup.sh"; J=$OUT/host.jsonl
M=${M:-/tmp/qb-model}  # the full-size checkpoint on the machine's 64 GB disk: written, used, deleted per call
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped)"; }
df -h /tmp | tail -1 | tee "$OUT/disk.txt"
df -h / /tmp "$PWD" 2>/dev/null | tee -a "$OUT/disk.txt"
