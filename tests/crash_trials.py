"""Crash trials: kill a real `qwen-batch run` at a named point, run it again, and measure what survived.

tests/test_reliability.py asserts the invariants on every trial; bench/reliability.py runs the trial at every
occurrence of each kill point (`--quick`: these TRIALS) and writes their figures (`crashes` in
bench/results/reliability.json, quoted in docs/reliability.md).
Everything is judged from the files on disk, independently of the library's own resume logic.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from tests.faults import cli_process
from tests.support import small_row, write_manifest

ROWS, BATCH_SIZE = 6, 2
# Rows in flight when a run dies: the batch on the GPU plus the writer's two pending batches.
MAX_ROWS_IN_FLIGHT = 3 * BATCH_SIZE
TEMP_PREFIX = ".tmp-"

# (kill point, nth event). 6 rows of 2 steps in batches of 2: the 5th step and the 5th image belong to
# the third batch, so the first two are finished or still being written when the run dies; the 3rd
# embedding is written after two others, the 2nd part file after one.
TRIALS = [
    ("encode", 3),
    ("denoise-step", 5),
    ("image-write", 5),
    ("part-write", 2),
    ("merge-write", 1),
    ("merge-cleanup", 2),
]


@dataclass
class CrashTrial:
    point: str
    nth: int
    killed: bool  # the run died by SIGKILL at the point (else the point was never reached)
    rows: int
    done_before_kill: int  # rows with an ok result and a complete image: a rerun must skip them
    images_before_kill: int  # complete images on disk after the kill
    cache_entries_before_kill: int  # embeddings in the cache after the kill
    incomplete_files_visible: int  # images or part files under their final name that do not read back whole
    temporary_files_left: int  # half-written files under temporary names (never listed, swept later)
    rerun_exit_code: int
    texts_encoded_on_rerun: int
    generated_on_rerun: int
    regenerated: int  # rows whose image was written before the kill but not yet recorded
    done_rows_rewritten: int  # rows done before the kill whose image the rerun wrote again
    results_rows: int
    rows_lost: int  # manifest rows missing from results.parquet
    rows_duplicated: int
    rows_not_ok: int
    parts_left: int  # part files not folded into results.parquet
    temporary_files_referenced: int  # results rows pointing at a temporary or incomplete file
    killed_run_output: str = ""

    def figures(self) -> dict:
        figures = asdict(self)
        figures.pop("killed_run_output")
        return figures


def _png_is_complete(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _parquet_is_complete(path: Path) -> bool:
    try:
        pq.read_table(path, use_threads=False)
    except (OSError, ValueError):
        return False
    return True


def _visible(folder: Path, pattern: str) -> list[Path]:
    return [path for path in sorted(folder.glob(pattern)) if not path.name.startswith(TEMP_PREFIX)]


def _images(output: Path) -> dict[str, tuple[int, str]]:
    """id -> (mtime_ns, sha256) of every complete image under its final name."""
    return {
        path.stem: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in _visible(output / "images", "*.png")
        if _png_is_complete(path)
    }


def _ok_ids(output: Path) -> set[str]:
    tables = [*_visible(output / "_parts", "*.parquet"), *_visible(output, "results.parquet")]
    ids = set()
    for path in tables:
        if _parquet_is_complete(path):
            for row in pq.read_table(path, columns=["id", "status"], use_threads=False).to_pylist():
                if row["status"] == "ok":
                    ids.add(row["id"])
    return ids


def run_crash_trial(point: str, nth: int, workdir: Path) -> CrashTrial:
    """Kill a run of ROWS rows at `point`, then run the same job again in this process."""
    from qwen_batch.run.engine import RunConfig, run

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(workdir / "m.parquet", [small_row(f"row-{n}", f"prompt number {n}") for n in range(ROWS)])
    output = workdir / "out"
    args = ["run", str(manifest), "--output", str(output), "--device", "cpu", "--batch-size", str(BATCH_SIZE)]
    killed = cli_process([*args, "--quiet", "--no-progress"], workdir / "killed-run.log", point, nth)

    images = _images(output)
    done = _ok_ids(output) & set(images)
    cached = _visible(output / "cache", "**/*.safetensors")
    incomplete = [
        path
        for path in _visible(output / "images", "*.png") + _visible(output / "_parts", "*.parquet")
        if not (_png_is_complete(path) if path.suffix == ".png" else _parquet_is_complete(path))
    ]
    temporaries = [path for path in output.rglob(f"{TEMP_PREFIX}*") if path.is_file()]

    summary = run(RunConfig(str(manifest), str(output), device="cpu", batch_size=BATCH_SIZE))

    after = _images(output)
    results = pq.read_table(output / "results.parquet", use_threads=False).to_pylist()
    ids = [row["id"] for row in results]
    expected = [f"row-{n}" for n in range(ROWS)]

    def points_at_a_complete_image(row: dict) -> bool:
        image = row["image"]
        return TEMP_PREFIX not in image and Path(image).stem in after and after[Path(image).stem][1] == row["sha256"]

    referenced_bad = [row for row in results if row["image"] and not points_at_a_complete_image(row)]
    return CrashTrial(
        point=point,
        nth=nth,
        killed=killed.killed,
        rows=ROWS,
        done_before_kill=len(done),
        images_before_kill=len(images),
        cache_entries_before_kill=len(cached),
        incomplete_files_visible=len(incomplete),
        temporary_files_left=len(temporaries),
        rerun_exit_code=summary.exit_code,
        texts_encoded_on_rerun=summary.encode.encoded,
        generated_on_rerun=summary.generated,
        regenerated=len(set(images) - done),
        done_rows_rewritten=sum(after.get(row_id) != images[row_id] for row_id in done),
        results_rows=len(results),
        rows_lost=len(set(expected) - set(ids)),
        rows_duplicated=len(ids) - len(set(ids)),
        rows_not_ok=sum(row["status"] != "ok" for row in results),
        parts_left=len(_visible(output / "_parts", "*.parquet")),
        temporary_files_referenced=len(referenced_bad),
        killed_run_output=killed.output[-3000:],
    )
