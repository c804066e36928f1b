"""Reliability figures for docs/reliability.md: kill a run at every point, inject storage faults and OOM.

    python bench/reliability.py [--quick] [--json bench/results/reliability.json]

On the tiny model, on the CPU, with the same machinery as tests/test_reliability.py (tests/faults.py,
tests/crash_trials.py), which asserts the invariants; this script counts:
1. crashes: a 6-row run SIGKILLed at every occurrence of every kill point (every embedding write,
   every denoising step, every image write, every part-file write, the merge's write and each of its
   part-file removals; `--quick`: one occurrence each), then run again: rows lost, duplicated,
   regenerated, rows done before the kill that were redone;
2. storage: the same run against a store where every call fails once (connection reset, timeout or
   503): faults injected, retries, rows lost;
3. GPU memory: a batch of 4 that does not fit, with one row that never fits: batches tried, rows ok,
   rows failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # tests/ holds the fault injection
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.crash_trials import BATCH_SIZE, ROWS, TRIALS, run_crash_trial  # noqa: E402
from tests.faults import FaultyFileSystem, recording_generate  # noqa: E402
from tests.support import small_row, write_manifest  # noqa: E402

# How many times each kill point occurs in a 6-row run (7 texts, 3 batches of 2 steps, 3 part files).
OCCURRENCES = {
    "encode": ROWS + 1,
    "denoise-step": (ROWS // BATCH_SIZE) * 2,
    "image-write": ROWS,
    "part-write": ROWS // BATCH_SIZE,
    "merge-write": 1,
    "merge-cleanup": ROWS // BATCH_SIZE,
}


def crashes(workdir: Path, quick: bool) -> dict:
    trials = TRIALS if quick else [(point, nth) for point, count in OCCURRENCES.items() for nth in range(1, count + 1)]
    figures = []
    for point, nth in trials:
        started = time.perf_counter()
        trial = run_crash_trial(point, nth, workdir / f"{point}-{nth}")
        figures.append({**trial.figures(), "seconds": round(time.perf_counter() - started, 1)})
        print(f"  {point} #{nth}: {json.dumps(figures[-1])}", flush=True)
    survived = [
        trial
        for trial in figures
        if trial["killed"]
        and trial["rerun_exit_code"] == 0
        and trial["rows_lost"] == trial["rows_duplicated"] == trial["rows_not_ok"] == 0
        and trial["done_rows_rewritten"] == trial["incomplete_files_visible"] == 0
        and trial["temporary_files_referenced"] == trial["parts_left"] == 0
    ]
    return {
        "rows": ROWS,
        "batch_size": BATCH_SIZE,
        "trials": len(figures),
        "killed": sum(trial["killed"] for trial in figures),
        "survived": len(survived),
        "rows_lost": sum(trial["rows_lost"] for trial in figures),
        "rows_duplicated": sum(trial["rows_duplicated"] for trial in figures),
        "done_rows_rewritten": sum(trial["done_rows_rewritten"] for trial in figures),
        "regenerated_max": max(trial["regenerated"] for trial in figures),
        "regenerated_total": sum(trial["regenerated"] for trial in figures),
        "by_point": figures,
    }


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.retries += "retrying in" in record.getMessage()


def storage_faults(workdir: Path) -> dict:
    import io

    import pyarrow.parquet as pq

    import qwen_batch.io.storage
    from qwen_batch.cli import main
    from qwen_batch.io.storage import Folder

    qwen_batch.io.storage.RETRY_BASE_DELAY = 0.001
    store = FaultyFileSystem.reset()
    manifest = write_manifest(
        workdir / "faults.parquet", [small_row(f"r{n}", f"prompt number {n}") for n in range(ROWS)]
    )
    Folder("faulty://bucket").write_bytes("m.parquet", manifest.read_bytes())
    store.inject(transient_every=1)
    counter = _Count()
    logging.getLogger("qwen_batch.io.storage").addHandler(counter)
    try:
        code = main(["run", "faulty://bucket/m.parquet", "--output", "faulty://bucket/out", "--device", "cpu", "-q"])
    finally:
        logging.getLogger("qwen_batch.io.storage").removeHandler(counter)
    calls, injected = store.calls, store.injected
    store.recover()
    table = pq.read_table(io.BytesIO(Folder("faulty://bucket/out").read_bytes("results.parquet"))).to_pylist()
    return {
        "rows": ROWS,
        "storage_calls": calls,
        "faults_injected": injected,
        "retries_logged": counter.retries,
        "exit_code": code,
        "rows_ok": sum(row["status"] == "ok" for row in table),
        "rows_lost": ROWS - len({row["id"] for row in table}),
    }


def out_of_memory(workdir: Path) -> dict:
    from qwen_batch.cli import main
    from qwen_batch.pipeline.denoise import ImageGenerator

    rows = [small_row(f"r{n}", f"prompt number {n}") for n in range(3)] + [small_row("huge", "it never fits")]
    manifest = write_manifest(workdir / "oom.parquet", rows)
    calls: list[list[str]] = []
    real = ImageGenerator.generate
    ImageGenerator.generate = recording_generate(calls, out_of_memory_for=lambda ids: len(ids) > 1 or "huge" in ids)
    try:
        code = main(
            ["run", str(manifest), "--output", str(workdir / "oom"), "--device", "cpu", "--batch-size", "4", "-q"]
        )
    finally:
        ImageGenerator.generate = real
    import pyarrow.parquet as pq

    table = pq.read_table(workdir / "oom" / "results.parquet").to_pylist()
    return {
        "batch_size": 4,
        "batches_tried": [len(ids) for ids in calls],
        "exit_code": code,
        "rows_ok": sum(row["status"] == "ok" for row in table),
        "rows_failed": sum(row["status"] == "failed" for row in table),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one kill per point instead of every occurrence")
    parser.add_argument("--json", default=str(REPOSITORY / "bench" / "results" / "reliability.json"))
    args = parser.parse_args()

    import diffusers
    import torch

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": "tiny (random weights), CPU, 256x256, 2 steps",
    }
    with tempfile.TemporaryDirectory(prefix="qwen-batch-reliability-") as directory:
        workdir = Path(directory)
        os.environ.setdefault("QWEN_BATCH_HOME", str(workdir / "home"))
        print("crashes:", flush=True)
        report["crashes"] = crashes(workdir / "crashes", args.quick)
        print("storage faults:", flush=True)
        report["storage_faults"] = storage_faults(workdir)
        print(f"  {report['storage_faults']}\nout of memory:", flush=True)
        report["out_of_memory"] = out_of_memory(workdir)
        print(f"  {report['out_of_memory']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    summary = {key: value for key, value in report["crashes"].items() if key != "by_point"}
    print(f"crashes: {summary}\nwrote {args.json}")


if __name__ == "__main__":
    main()
