"""What a run did: the denoise stage's stats, the run's summary, and how the CLI shows them.

The CLI prints `summary_rows` under "qwen-batch summary"; the flow builds its summary table (one figure a row,
for the UI) from `Summary.to_dict()`, the one serialized form, which is also the flow's result. A shard run
also leaves its stats in the output folder (`write_shard_stats`), where the fan-out's merge sums every
shard's (`sum_shard_stats`) for the whole fleet's figures.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from qwen_batch.io.storage import Folder
from qwen_batch.pipeline.encode import EncodeStats
from qwen_batch.pipeline.step_cache import step_cache_line
from qwen_batch.run.results import Record
from qwen_batch.stats import Stats, in_process, peak


@dataclass
class DenoiseStats(Stats):
    generated: int = 0
    failed: int = 0
    seconds: float = 0.0
    storage_wait_seconds: float = 0.0  # of `seconds`, spent waiting for image and result writes
    peak_gpu_gib: float | None = peak()
    adapter_fuses: int = 0  # adapter sets fused into the weights (once per set when batches are ordered)
    adapter_seconds: float = 0.0  # of `seconds`, spent switching adapter sets
    # Rows with a step cache: the steps they ran (each CFG pass counted) and those computed in full.
    cached_steps: int = 0
    cached_steps_computed: int = 0
    image_bytes: int = 0  # of the images stored (files or shard samples)
    shards: int = 0  # shards published (webdataset, parquet outputs)
    shard_rows: int = 0
    shard_bytes: int = 0
    records: list[Record] = in_process()


@dataclass
class Summary:
    rows: int
    generated: int
    skipped: int
    invalid: int
    failed: int
    encode: EncodeStats
    denoise: DenoiseStats
    output: str
    results: str
    problems: list[tuple[int, str | None, str, str]]  # (row, id, status, error)
    # How images are stored and marked: output_format, image_format, marks (e.g. "IPTC XMP + C2PA (signed)").
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.invalid == 0 and self.failed == 0 else 1

    @property
    def images_per_hour(self) -> float | None:
        if not self.denoise.generated or not self.denoise.seconds:
            return None
        return self.denoise.generated / self.denoise.seconds * 3600

    def to_dict(self, max_problems: int | None = None) -> dict[str, Any]:
        """JSON-able, as a flow returns it; the first `max_problems` problems (all by default)."""
        return {
            "rows": self.rows,
            "generated": self.generated,
            "skipped": self.skipped,
            "invalid": self.invalid,
            "failed": self.failed,
            "images_per_hour": self.images_per_hour,
            "encode": self.encode.to_dict(),
            "denoise": self.denoise.to_dict(),
            "output": self.output,
            "results": self.results,
            "outputs": self.outputs,
            "problem_count": len(self.problems),
            "problems": [list(problem) for problem in self.problems[:max_problems]],
        }


STATS_FOLDER = "_stats"  # in the output folder: one JSON file per shard run, summed by the fan-out's merge


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """A run's summary as (name, value) rows, from `Summary.to_dict()`: the CLI's and the flow's."""
    counts = [
        ("rows", f"{report['rows']}"),
        ("generated", f"{report['generated']}"),
        ("skipped", f"{report['skipped']}  (already done with the same parameters)"),
        ("invalid", f"{report['invalid']}"),
        ("failed", f"{report['failed']}"),
    ]
    return (
        counts
        + output_rows(report.get("outputs") or {})
        + stats_rows(EncodeStats.from_dict(report["encode"]), DenoiseStats.from_dict(report["denoise"]))
    )


def output_rows(outputs: dict[str, str]) -> list[tuple[str, str]]:
    """How the images were stored and marked, as (name, value) rows."""
    if not outputs:
        return []
    return [
        ("output", f"{outputs['output_format']}, {outputs['image_format']} images"),
        ("marks", outputs["marks"]),
    ]


def stats_rows(encode: EncodeStats, denoise: DenoiseStats) -> list[tuple[str, str]]:
    """What the stages did, as (name, value) rows: one run's, or several shards' summed."""
    rate = denoise.generated / denoise.seconds * 3600 if denoise.generated and denoise.seconds else None
    storage = f", {denoise.storage_wait_seconds:.1f} s waiting on storage" if rate else ""
    rows = [
        ("encode", f"{encode.seconds:.1f} s  ({encode.encoded} texts encoded, {encode.cached} from cache)"),
        ("denoise", f"{denoise.seconds:.1f} s" + (f"  ({rate:,.0f} images/hour{storage})" if rate else "")),
    ]
    if denoise.shards:
        rows.append(("shards", shards_line(denoise)))
    if denoise.adapter_fuses:
        rows.append(("adapters", f"{denoise.adapter_fuses} sets fused, {denoise.adapter_seconds:.1f} s"))
    if denoise.cached_steps:
        rows.append(("step cache", step_cache_line(denoise.cached_steps_computed, denoise.cached_steps)))
    for stage, stats in (("encode", encode), ("denoise", denoise)):
        if stats.peak_gpu_gib is not None:
            rows.append((f"peak GPU ({stage})", f"{stats.peak_gpu_gib:.1f} GiB"))
    return rows


def shards_line(denoise: DenoiseStats) -> str:
    """`3 published, 0.41 GiB, 333 images per shard`"""
    return (
        f"{denoise.shards} published, {denoise.shard_bytes / 2**30:.2f} GiB, "
        f"{denoise.shard_rows / denoise.shards:,.0f} images per shard"
    )


def write_shard_stats(output: Folder, shard: str, encode: EncodeStats, denoise: DenoiseStats) -> str:
    """Leave a shard run's stats for the fan-out's merge: JSON, named by when it was written."""
    name = posixpath.join(STATS_FOLDER, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.json")
    record = {"shard": shard, "encode": encode.to_dict(), "denoise": denoise.to_dict()}
    output.write_bytes(name, json.dumps(record).encode())
    return name


def sum_shard_stats(output: Folder, since: datetime) -> tuple[EncodeStats, DenoiseStats, int]:
    """The stats of every shard run that finished since `since`, summed, and how many there were."""
    stamp = f"{since.astimezone(timezone.utc):%Y%m%dT%H%M%S}"
    names = [name for name in output.list_files(STATS_FOLDER, ".json") if posixpath.basename(name) >= stamp]
    records = [json.loads(output.read_bytes(name)) for name in names]
    encode = sum((EncodeStats.from_dict(record["encode"]) for record in records), start=EncodeStats())
    denoise = sum((DenoiseStats.from_dict(record["denoise"]) for record in records), start=DenoiseStats())
    return encode, denoise, len(records)
