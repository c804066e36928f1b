"""Does a run lose or redo rows when it is killed at any point, when storage fails, when the GPU runs out?

    python -m bench.reliability --json out.jsonl                # every kill point, about 10 minutes on 2 cores
    python -m bench.reliability --only crashes-quick,storage-faults,out-of-memory

On the tiny model, on the CPU, with the same machinery as tests/test_reliability.py (tests/faults.py,
tests/crash_trials.py), which asserts the invariants; this counts them (docs/reliability.md):
- `crashes`: a 6-row run SIGKILLed at every occurrence of every kill point (every embedding write, every
  denoising step, every image write, every part-file write, the merge's write and each of its part-file
  removals; `crashes-quick`: one occurrence each), then run again: rows lost, duplicated, regenerated, rows
  done before the kill that were redone;
- `storage-faults`: the same run against a store where every call fails once (connection reset, timeout or
  503): faults injected, retries, rows lost;
- `out-of-memory`: a batch of 4 that does not fit, with one row that never fits: batches tried, rows ok,
  rows failed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.harness import Scenario, main, scenarios

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.crash_trials import BATCH_SIZE, ROWS, TRIALS, run_crash_trial
from tests.faults import FaultyFileSystem, recording_generate
from tests.support import small_row, write_manifest

# How many times each kill point occurs in a 6-row run (7 texts, 3 batches of 2 steps, 3 part files).
OCCURRENCES = {
    "encode": ROWS + 1,
    "denoise-step": (ROWS // BATCH_SIZE) * 2,
    "image-write": ROWS,
    "part-write": ROWS // BATCH_SIZE,
    "merge-write": 1,
    "merge-cleanup": ROWS // BATCH_SIZE,
}


def crash_figures(workdir: Path, quick: bool) -> dict:
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


def storage_fault_figures(workdir: Path) -> dict:
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


def out_of_memory_figures(workdir: Path) -> dict:
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


def machine() -> dict:
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "model": "tiny (random weights), CPU, 256x256, 2 steps",
    }


def measured(figures) -> callable:
    """A scenario measure: `figures(workdir)` in a fresh folder, as one line. The engine's home (its tiny model)
    is `$QWEN_BATCH_HOME`, or one kept in the work root for the scenarios."""

    def measure(runner, **params) -> None:
        os.environ.setdefault("QWEN_BATCH_HOME", str(runner.root / "reliability-home"))
        with tempfile.TemporaryDirectory(prefix="qwen-batch-reliability-") as directory:
            runner.write({"run": runner.scenario.name, **machine(), **figures(Path(directory), **params)})

    return measure


SCENARIOS = scenarios(
    Scenario("crashes", measured(crash_figures), {"quick": False}, "killed at every occurrence of every point", 10),
    Scenario("crashes-quick", measured(crash_figures), {"quick": True}, "killed once at each point", 3),
    Scenario("storage-faults", measured(storage_fault_figures), {}, "every storage call fails once", 1),
    Scenario(
        "out-of-memory", measured(out_of_memory_figures), {}, "a batch that does not fit, a row that never does", 1
    ),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
