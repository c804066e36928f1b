"""The Prefect flow `qwen-image-batch`: a manifest of prompts, or one shard of it, to images.

A thin adapter over `qwen_batch.run.engine`, in the engine's own stages:

1. **validate**: read and check the manifest, decide which rows to generate (resume); no model loads;
2. **encode**: every prompt into the embedding cache; the text encoder loads once, then is freed;
3. **denoise**: one task per chunk of whole batches (tens of rows; with shard outputs, whole shards too:
   `chunk_rows`), with the transformer loaded once per flow run in this process and reused by every chunk
   (`qwen_batch.run.engine.load_generator`);
4. **finalize**: merge the part files into `results.parquet`, then publish the report (flows/report.py).

Tasks get the plan in memory, wrapped in `quote` so Prefect does not walk its rows, and return small
dicts; flows/task_policy.py says why nothing is cached or persisted and what is retried.

C2PA signing from Prefect Secret blocks (`c2pa_cert_secret`, `c2pa_key_secret`): the validate task loads them and
the signer lives in the plan, in this process; the key's text is in no parameter, log, artifact or result.

On Prefect's embedded server, with the tiny model and the example manifest on local disk:

    python flows/qwen_image_batch.py [--manifest URL] [--output URL] [--model M] ...

Deployed (deployments/prefect.yaml), it runs on the workers of the `gpu` pool: docs/prefect.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python flows/qwen_image_batch.py`: import `flows` from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run
from prefect.settings import PREFECT_API_URL
from prefect.utilities.annotations import quote
from prefect.utilities.hashing import file_hash
from pydantic import ValidationError

from flows.parameters import BatchParameters, flat_parameters
from flows.report import (
    MAX_PROBLEMS_SHOWN,
    SAMPLE_IMAGES,
    ArtifactProgress,
    RowsFailed,
    artifact_key,
    number,
    output_metrics,
    publish_report,
)
from flows.task_policy import STORAGE_RETRIES, TASK_OPTIONS
from qwen_batch.errors import QwenBatchError
from qwen_batch.manifest import Request
from qwen_batch.outputs.shards import FILES
from qwen_batch.pipeline.encode import EncodeStats
from qwen_batch.progress import show_library_progress_bars
from qwen_batch.run.engine import (
    RunPlan,
    denoise_stage,
    encode_stage,
    finalize,
    make_batches,
    pending,
    plan_run,
    release_generator,
)
from qwen_batch.run.results import OK
from qwen_batch.run.summary import DenoiseStats

FLOW_NAME = "qwen-image-batch"


def make_chunks(requests: list[Request], batch_size: int, chunk_size: int) -> list[list[Request]]:
    """The rows to generate in chunks of at most `chunk_size` rows (or one batch, if bigger), each made
    of whole batches: one denoise task per chunk, so 10,000 rows are hundreds of tasks, not 10,000."""
    chunks: list[list[Request]] = []
    current: list[Request] = []
    for batch in make_batches(requests, batch_size):
        if current and len(current) + len(batch) > chunk_size:
            chunks.append(current)
            current = []
        current.extend(batch)
    if current:
        chunks.append(current)
    return chunks


def chunk_rows(params: BatchParameters) -> int:
    """The rows of a denoise chunk. Each denoise task publishes its last shard partly filled, so with shard outputs
    (webdataset, parquet) a chunk holds whole shards: `chunk_size` rounded up to a multiple of `shard_size` (at least
    one shard). Every shard is then full but the run's last, as long as the batches fill the chunk exactly (the batch
    size divides shard_size and no row fails); a shard also closes early at its byte limit."""
    if params.output_format == FILES:
        return params.chunk_size
    shards = -(-max(params.chunk_size, params.shard_size) // params.shard_size)  # ceil
    return shards * params.shard_size


def sample_of(request: Request) -> dict[str, Any]:
    """What the samples artifact shows of a row: its id, prompt and, for edits, its input images."""
    return {"id": request.id, "prompt": request.prompt, "inputs": list(request.images)}


@task(name="validate", **TASK_OPTIONS, **STORAGE_RETRIES)
def validate(params: BatchParameters) -> RunPlan:
    """Read and check the manifest and decide which rows to generate; loads no model. With c2pa_cert_secret and
    c2pa_key_secret, loads the two Secret blocks and checks the C2PA signer made from them.

    The plan it returns stays in this process (see flows/task_policy.py), the signer with it."""
    started = time.perf_counter()
    plan = plan_run(params.run_config(params.content_credentials()))
    invalid = plan.manifest.invalid
    get_run_logger().info(
        "manifest %s: %d rows, %d invalid%s; %s: %d to generate, %d already done; %.1f s",
        params.manifest,
        plan.manifest.num_rows,
        len(invalid),
        f" (the first, row {invalid[0].index}: {invalid[0].reason})" if invalid else "",
        f"shard {params.shard}" if params.is_shard else "this run",
        len(plan.todo),
        len(plan.skipped),
        time.perf_counter() - started,
    )
    if params.c2pa_cert_secret:  # the block names only, never their values
        get_run_logger().info(
            "C2PA: signing every image with the certificate of Secret block %r (%s) and the key of Secret block %r",
            params.c2pa_cert_secret,
            plan.encoder.credentials.subject,
            params.c2pa_key_secret,
        )
    return plan


@task(name="encode", **TASK_OPTIONS, **STORAGE_RETRIES)
def encode(plan: RunPlan, progress: ArtifactProgress) -> dict[str, Any]:
    """Stage 1: the prompts of every row to generate into the embedding cache."""
    stats = encode_stage(plan, progress=progress)
    get_run_logger().info(
        "encode: %d distinct texts, %d encoded, %d from the cache, %.1f s%s",
        stats.texts,
        stats.encoded,
        stats.cached,
        stats.seconds,
        f", peak GPU memory {stats.peak_gpu_gib:.1f} GiB" if stats.peak_gpu_gib is not None else "",
    )
    return stats.to_dict()


@task(name="denoise", task_run_name="denoise {index} of {count}", **TASK_OPTIONS, **STORAGE_RETRIES)
def denoise(plan: RunPlan, chunk: list[Request], progress: ArtifactProgress, index: int, count: int) -> dict[str, Any]:
    """Stage 2 for one chunk: its images and part files."""
    if task_run.run_count > 1:  # a retry: rows the failed attempt already wrote are not generated again
        chunk = pending(plan, chunk)
    stats = denoise_stage(plan, chunk, progress=progress)
    get_run_logger().info(
        "denoise %d of %d: %d rows, %d ok, %d failed, %.1f s (%.2f s per image)",
        index,
        count,
        len(chunk),
        stats.generated,
        stats.failed,
        stats.seconds,
        stats.seconds / len(chunk),
    )
    ok = {record.id for record in stats.records if record.status == OK}
    samples = [sample_of(request) for request in chunk if request.id in ok]
    return {"stats": stats.to_dict(), "samples": samples[:SAMPLE_IMAGES]}


@task(name="finalize", **TASK_OPTIONS, **STORAGE_RETRIES)
def finalize_run(plan: RunPlan, encoded: dict[str, Any], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the part files into results.parquet (a shard leaves them to the merge) and sum the run up."""
    denoised = sum((DenoiseStats.from_dict(chunk["stats"]) for chunk in chunks), start=DenoiseStats())
    started = time.perf_counter()
    report = finalize(plan, EncodeStats.from_dict(encoded), denoised).to_dict(MAX_PROBLEMS_SHOWN)
    get_run_logger().info(
        "results %s: %d rows, %d generated, %d skipped, %d invalid, %d failed; %s images per hour; %.1f s",
        report["results"],
        report["rows"],
        report["generated"],
        report["skipped"],
        report["invalid"],
        report["failed"],
        number(report["images_per_hour"], 0),
        time.perf_counter() - started,
    )
    return report


def summary_metrics(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rows of the summary table: one figure a row, for the UI, from the run's serialized stats."""
    no_gpu = "n/a (no GPU used)"
    encode, denoise = report["encode"], report["denoise"]
    cached = denoise["cached_steps"]
    step_cache = (
        [("step cache: steps computed / run", f"{denoise['cached_steps_computed']} / {cached}")] if cached else []
    )
    return [
        ("rows", report["rows"]),
        ("ok (generated by this run)", report["generated"]),
        ("skipped (already done)", report["skipped"]),
        ("invalid", report["invalid"]),
        ("failed", report["failed"]),
        ("images per hour", number(report["images_per_hour"], 0)),
        ("encode seconds", number(encode["seconds"])),
        ("denoise seconds", number(denoise["seconds"])),
        ("peak GPU memory, encode (GiB)", number(encode["peak_gpu_gib"], missing=no_gpu)),
        ("peak GPU memory, denoise (GiB)", number(denoise["peak_gpu_gib"], missing=no_gpu)),
        ("texts encoded / from cache", f"{encode['encoded']} / {encode['cached']}"),
        ("adapter sets fused / seconds", f"{denoise['adapter_fuses']} / {number(denoise['adapter_seconds'])}"),
        *step_cache,
        *output_metrics(report.get("outputs") or {}, DenoiseStats.from_dict(denoise)),
    ]


@flow(
    name=FLOW_NAME,
    description="Generate the images of a Parquet manifest of prompts with a Qwen-Image model (Qwen-Image, Edit, "
    "2.1): validate, encode every prompt, denoise in chunks, merge results.parquet. Running again over the same "
    "output resumes.",
    persist_result=False,
    version=file_hash(__file__),  # Prefect's default, but of this file: `flat_parameters` writes the function
)
@flat_parameters(BatchParameters)
def qwen_image_batch(params: BatchParameters) -> dict[str, Any]:
    """Generate the images of a manifest, or of one shard of it, with the model's family (Qwen-Image, 2.1)."""
    show_library_progress_bars(False)  # the progress artifact replaces the weight-loading bars in the logs
    plan = validate(params)
    progress = ArtifactProgress(artifact_key(FLOW_NAME, "progress", params.shard), total=len(plan.todo))
    try:
        encoded = encode(quote(plan), progress)
        # Shard outputs: chunks of whole shards, so only the run's last shard is partly filled (`chunk_rows`).
        chunks = make_chunks(plan.todo, plan.batch_size, chunk_rows(params))
        denoised = [denoise(quote(plan), chunk, progress, index, len(chunks)) for index, chunk in enumerate(chunks, 1)]
    finally:
        release_generator()  # free the transformer, also after a failure
    report = finalize_run(quote(plan), encoded, denoised)

    samples = [sample for chunk in denoised for sample in chunk["samples"]][:SAMPLE_IMAGES]
    if not samples:  # nothing generated by this run: show rows done before
        samples = [sample_of(request) for request in plan.skipped[:SAMPLE_IMAGES]]
    publish_report(FLOW_NAME, params.shard, summary_metrics(report), report, plan.output, samples)
    if report["failed"]:
        raise RowsFailed(
            f"{report['failed']} of {report['rows']} rows failed to generate (their errors are in the problems "
            f"artifact and in {report['results']}); run again over the same output to retry them: finished rows "
            "are skipped",
            report,
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    metrics = [*summary_metrics(report), ("results", report["results"])]
    width = max(len(name) for name, _ in metrics)
    lines = ["", f"{FLOW_NAME} summary", *(f"  {name:<{width}}  {value}" for name, value in metrics)]
    lines += [
        f"  row {index} id={row_id!r} {status}: {error}" for index, row_id, status, error in report["problems"][:20]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One run in this process, on Prefect's embedded server or on PREFECT_API_URL's. Exit codes as
    `qwen-batch run`: 0 every row ok or skipped, 1 some rows invalid or failed, 2 a manifest-level error."""
    parser = argparse.ArgumentParser(
        prog="python flows/qwen_image_batch.py",
        description="Run the qwen-image-batch flow once. Without PREFECT_API_URL, Prefect starts an embedded "
        "server for the run. Defaults: the demo manifest, the tiny model, out/demo on local disk.",
    )
    parser.add_argument(
        "--allow-invalid-rows",
        action="store_true",
        help="exit 0 when every valid row is ok or skipped, whatever the invalid rows (the demo manifest has "
        "one on purpose); failed rows still exit 1",
    )
    for name, field in BatchParameters.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="VALUE",
            help=f"{field.description} (default: {field.default})",
        )
    args = vars(parser.parse_args(argv))
    allow_invalid = args.pop("allow_invalid_rows")
    values = {name: value for name, value in args.items() if value is not None}
    try:
        params = BatchParameters(**values)
    except ValidationError as error:
        parser.error(str(error))
    # diffusers and transformers read these before their first use; the CLI sets the same.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not PREFECT_API_URL.value():
        # Prefect's temporary server for this one run: its usage-telemetry service races the run for
        # the SQLite database and prints "database is locked" tracebacks (Prefect 3.9). Yours to override.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    state = qwen_image_batch(**params.model_dump(), return_state=True)
    if state.is_completed():
        report = state.result()
        print(format_report(report))
        return 1 if report["invalid"] and not allow_invalid else 0
    error = state.result(raise_on_failure=False)
    if isinstance(error, RowsFailed):
        print(format_report(error.report))
    print(f"{FLOW_NAME}: {state.name}: {error}", file=sys.stderr)
    return 2 if isinstance(error, QwenBatchError) else 1


if __name__ == "__main__":
    sys.exit(main())
