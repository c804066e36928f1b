"""What the Prefect UI shows of a run: artifacts, as a batch runs and when it has finished.

- a **progress** artifact: the share of the run's rows done, updated as chunks finish;
- a **summary** table: rows by outcome, images per hour, seconds and peak GPU memory per stage;
- a **problems** markdown: the failed and invalid rows with their errors (the first 50);
- an **output** link and a **samples** markdown: the output location, and a few images as
  thumbnails (read through the storage layer, so they show for local disk and S3 alike) linking to
  the full images (`images/<id>.png|webp|jpg`); for shard outputs (webdataset, parquet), where the
  shards are (`shards/*.tar`, `data/*.parquet`) and the first of them, linked, instead.

Artifact keys group each kind's history in the UI's Artifacts page: `qwen-image-batch-summary`,
with `-shard-K-of-N` appended for a shard.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from qwen_batch.errors import QwenBatchError
from qwen_batch.io.storage import Folder, read_url
from qwen_batch.outputs.images import ImageFormat
from qwen_batch.outputs.shards import DATA_SUFFIX, FILES, FOLDERS, WEBDATASET
from qwen_batch.run.results import IMAGES_FOLDER
from qwen_batch.run.summary import DenoiseStats, output_rows, shards_line

MAX_PROBLEMS_SHOWN = 50  # rows listed in the UI; results.parquet has them all
SAMPLE_IMAGES = 4
THUMBNAIL_PIXELS = 160
SHARDS_LISTED = 10  # shard files linked in the samples artifact; the folder link has them all


class RowsFailed(Exception):
    """Some rows could not be generated. Everything else finished and the results are written; running
    again over the same output retries just those rows."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def artifact_key(flow_name: str, kind: str, shard: str = "0/1") -> str:
    index, count = shard.split("/")
    return f"{flow_name}-{kind}" + (f"-shard-{index}-of-{count}" if count != "1" else "")


class ArtifactProgress:
    """The engine's progress reports (`qwen_batch.progress.Progress`) as a Prefect progress artifact:
    the share of this run's rows done, updated when a chunk finishes and every `interval` seconds
    within one (a chunk of big images can take many minutes)."""

    def __init__(self, key: str, total: int, interval: float = 15.0, log_interval: float = 60.0):
        self.total, self.done, self.interval, self.log_interval = total, 0, interval, log_interval
        self._stage, self._stage_total, self._stage_done = "", 0, 0
        self._published = self._logged = time.monotonic()
        self.artifact_id = create_progress_artifact(progress=self.percent, key=key, description=self.describe())

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def describe(self) -> str:
        if not self.total:
            return "Nothing to generate: every row is done already or invalid."
        text = f"{self.done} of {self.total} rows done"
        if self._stage == "encode" and self._stage_done < self._stage_total:
            text += f"; encoding prompts: {self._stage_done} of {self._stage_total} texts"
        return text

    def start(self, stage: str, total: int, unit: str) -> None:
        self._stage, self._stage_total, self._stage_done = stage, total, 0

    def advance(self, count: int = 1) -> None:
        self._stage_done += count
        if self._stage == "denoise":
            self.done += count
        if time.monotonic() - self._published >= self.interval:
            self.publish()

    def finish(self) -> None:
        self.publish()

    def publish(self) -> None:
        self._published = time.monotonic()
        # The run's log gets a line a minute too, for whoever watches a console (make demo, a worker).
        if self._published - self._logged >= self.log_interval:
            self._logged = self._published
            get_run_logger().info("progress: %s", self.describe())
        try:
            update_progress_artifact(self.artifact_id, self.percent, self.describe())
        except Exception as error:  # a missed progress update must never fail a batch
            get_run_logger().warning("could not update the progress artifact: %s", error)


def publish_report(
    flow_name: str,
    shard: str,
    metrics: list[tuple[str, Any]],
    report: dict[str, Any],
    output: Folder,
    samples: list[dict[str, str]],
) -> None:
    """The artifacts of a finished run. `report` has `results`, `problems` and `problem_count`."""
    create_table_artifact(
        table=[{"metric": name, "value": value} for name, value in metrics],
        key=artifact_key(flow_name, "summary", shard),
        description=f"{flow_name}: rows by outcome, throughput, seconds and peak GPU memory per stage",
    )
    create_markdown_artifact(
        markdown=problems_markdown(report["problems"], report["problem_count"], report["results"]),
        key=artifact_key(flow_name, "problems", shard),
        description=f"Failed and invalid rows (the first {MAX_PROBLEMS_SHOWN}) with their errors",
    )
    create_link_artifact(
        link=link(output.display()),
        link_text=output.display(),
        key=artifact_key(flow_name, "output", shard),
        description="The output folder: the images (or shards) and results.parquet",
    )
    create_markdown_artifact(
        markdown=samples_markdown(output, report["results"], samples, report.get("outputs")),
        key=artifact_key(flow_name, "samples", shard),
        description="The output location and a few sample images",
    )


def output_metrics(outputs: dict[str, str], denoise: DenoiseStats) -> list[tuple[str, Any]]:
    """How the images were stored and marked: the output and image formats, the bytes of images stored, the
    shards published (count, GiB, images per shard) and the marks, and whether C2PA-signed. `outputs` is
    `Summary.to_dict()["outputs"]`; `denoise` this run's stats (or every shard's, summed). Names stay within the
    table's widest so far: the script's summary aligns its values on it."""
    if not outputs:
        return []
    (output, formats), (marks, applied) = output_rows(outputs)  # ("output", "webdataset, webp images"), ("marks", ..)
    rows: list[tuple[str, Any]] = [(output, formats), ("images stored (GiB)", number(denoise.image_bytes / 2**30, 3))]
    if outputs["output_format"] != FILES:
        rows.append(("shards written", shards_line(denoise) if denoise.shards else "none by this run"))
    rows += [(marks, applied), ("C2PA signed", "yes" if "C2PA" in applied else "no")]
    return rows


def problems_markdown(problems: list[list[Any]], total: int, results: str) -> str:
    """The failed and invalid rows, `[row, id, status, error]`, as a markdown table."""
    if not total:
        return "**Every row is ok** (generated now or earlier): none failed, none is invalid."
    lines = [
        f"**{total} row(s) not ok.** An invalid row needs a fix in the manifest; failed rows are retried by "
        f"running the same deployment again. All of them are in `{cell(results)}` (column `error`).",
        "",
        "| row | id | status | error |",
        "|---:|---|---|---|",
    ]
    lines += [f"| {index} | {cell(row_id)} | {status} | {cell(error)} |" for index, row_id, status, error in problems]
    if total > len(problems):
        lines += ["", f"... and {total - len(problems)} more in `{cell(results)}`."]
    return "\n".join(lines)


def samples_markdown(
    output: Folder, results: str, samples: list[dict[str, str]], outputs: dict[str, str] | None = None
) -> str:
    """The output location and a few sample images, `{"id", "prompt"}`, as thumbnails linking to the image files;
    for shard outputs, where the shards are. `outputs`: the report's `{output_format, image_format, marks}`
    (missing: PNG files)."""
    outputs = outputs or {}
    output_format = outputs.get("output_format", FILES)
    if output_format != FILES:
        return shards_markdown(output, results, output_format, outputs.get("image_format", "png"))
    extension = ImageFormat(outputs.get("image_format", "png")).extension
    folder = output.display()
    lines = [
        f"**Output** [{cell(folder)}]({link(folder)}): `{IMAGES_FOLDER}/<id>.{extension}`, results in "
        f"[{cell(results)}]({link(results)}).",
        "",
    ]
    if not samples:
        return "\n".join([*lines, "No images yet."])
    edits = any(sample.get("inputs") for sample in samples)
    if edits:  # edits: the input(s) beside the output, each linking to its file
        lines += ["| input | output | id | instruction |", "|---|---|---|---|"]
    else:
        lines += ["| sample | id | prompt |", "|---|---|---|"]
    for sample in samples:
        relative = f"{IMAGES_FOLDER}/{sample['id']}.{extension}"
        preview = _preview(sample["id"], lambda relative=relative: output.read_bytes(relative))
        name = f"[{cell(sample['id'])}]({link(output.display(relative))})"
        if not edits:
            lines.append(f"| {preview} | {name} | {cell(shorten(sample['prompt']))} |")
            continue
        inputs = " ".join(
            f"{_preview('input', lambda url=url: read_url(url, output.storage_options))}[{cell(_name(url))}]({link(url)})"
            for url in sample.get("inputs", [])
        )
        lines.append(f"| {inputs} | {preview} | {name} | {cell(shorten(sample['prompt']))} |")
    return "\n".join(lines)


def shards_markdown(output: Folder, results: str, output_format: str, image_format: str) -> str:
    """Where a shard output's images are: the shard files' pattern and the first `SHARDS_LISTED` of them, linked."""
    folder = output.display()
    pattern = f"{FOLDERS[output_format]}/*{DATA_SUFFIX[output_format]}"
    extension = ImageFormat(image_format).extension
    if output_format == WEBDATASET:
        layout = (
            f"WebDataset shards `{pattern}` (per row `KEY.{extension}`, `KEY.json`, `KEY.txt`; a Parquet index "
            "beside each tar)"
        )
    else:
        layout = f"Parquet shards `{pattern}` ({extension} images in the `image` column; a dataset card README.md)"
    lines = [
        f"**Output** [{cell(folder)}]({link(folder)}): {layout}. Results in [{cell(results)}]({link(results)}): "
        "each row's `shard` and `key`.",
        "",
    ]
    try:
        shards = sorted(output.list_files(FOLDERS[output_format], DATA_SUFFIX[output_format]))
    except (QwenBatchError, OSError) as error:  # the links above stay
        return "\n".join([*lines, f"The shards could not be listed: {cell(error)}"])
    if not shards:
        return "\n".join([*lines, "No shards yet."])
    lines += [f"{len(shards)} shard file(s):", ""]
    lines += [f"- [{cell(relative)}]({link(output.display(relative))})" for relative in shards[:SHARDS_LISTED]]
    if len(shards) > SHARDS_LISTED:
        lines.append(f"- ... and {len(shards) - SHARDS_LISTED} more in [{cell(folder)}]({link(folder)})")
    return "\n".join(lines)


def _preview(label: str, read: Any) -> str:
    """A thumbnail, or nothing when the image cannot be read (the link stays)."""
    try:
        return f"![{cell(label)}]({thumbnail(read())})"
    except (QwenBatchError, OSError, ValueError):
        return ""


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def thumbnail(png: bytes) -> str:
    """A small JPEG of an image as a data: URL, which the UI shows wherever the image is stored."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def cell(value: Any) -> str:
    """Text that stays inside its markdown table cell (and is never taken for HTML)."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def shorten(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[: length - 1].rstrip() + "…"


def link(location: str) -> str:
    """A URL for a location as qwen-batch displays it: local paths become file:// URLs."""
    if urlsplit(location).scheme not in ("", "file"):
        return location
    return Path(location.removeprefix("file://")).resolve().as_uri()


def number(value: float | None, digits: int = 1, missing: str = "n/a") -> str:
    """A table cell for a number that may be missing (a lone "-" would render as a list item)."""
    return missing if value is None else f"{value:,.{digits}f}"
