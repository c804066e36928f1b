"""The Prefect flow `qwen-image-fanout`: one manifest spread over the GPU workers of a work pool.

1. **check**: read and validate the manifest, and the C2PA Secret blocks when named (`c2pa_cert_secret`,
   `c2pa_key_secret`: the shards get their names, never the key); an error stops here, before any shard starts;
2. **start** `shards` runs of the `qwen-image-batch/shard` deployment with `run_deployment`, shard K of N
   being the rows dealt to K by predicted cost (`qwen_batch.run.sharding`: balanced, disjoint). They show as
   child runs of this one in the UI, and the workers of the `gpu` pool pick them up, one per GPU;
3. **wait** for all of them, however long they take: a batch may run for days, and Prefect's own
   waiter (`prefect.flow_runs.wait_for_flow_run`) gives up after 3 hours by default;
4. **merge** the shards' part files into one `results.parquet` with every manifest row exactly once,
   and publish the report. A shard that did not complete is named, with the command that re-runs it
   alone; running this flow again then merges. Re-running it resumes: each shard skips finished rows.

This flow needs no GPU: it only starts, waits and merges. Deploy it to a pool of its own (`control`),
so it never holds a GPU worker while its shards wait for one.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_run
from prefect.utilities.hashing import file_hash

from flows.parameters import FanoutParameters, flat_parameters
from flows.report import (
    MAX_PROBLEMS_SHOWN,
    SAMPLE_IMAGES,
    RowsFailed,
    artifact_key,
    number,
    output_metrics,
    publish_report,
)
from flows.task_policy import STORAGE_RETRIES, TASK_OPTIONS
from qwen_batch.families import ModelFamily
from qwen_batch.io.storage import Folder
from qwen_batch.manifest import Manifest
from qwen_batch.memory.fleet import plan_fleet
from qwen_batch.memory.planner import Machine, Workload
from qwen_batch.outputs.encoder import MARKS
from qwen_batch.outputs.shards import FILES
from qwen_batch.pipeline.encode import EncodeStats
from qwen_batch.run.engine import plan_run, read_run_manifest
from qwen_batch.run.results import FAILED, INVALID, OK, RESULTS_FILE, ResultStore
from qwen_batch.run.sharding import assign_shards, idle_tail, shard_costs
from qwen_batch.run.summary import DenoiseStats, stats_rows, sum_shard_stats

FLOW_NAME = "qwen-image-fanout"
NOT_STARTED_WARNING_SECONDS = 600
UNLIMITED_HOST_GIB = 1e6  # host_memory_gib left empty: plan as if host RAM were no limit


class ShardsFailed(Exception):
    """Some shard runs did not complete; the others' results are merged."""


@task(name="check manifest", **TASK_OPTIONS, **STORAGE_RETRIES)
def check_manifest(params: FanoutParameters) -> tuple[FanoutParameters, list[int], dict[str, Any]]:
    """Validate the manifest before any shard starts; with the workers' GPU size, plan the shards (their
    memory mode and batch size, in the parameters returned). The number of valid rows per shard, and
    the plan's prediction."""
    manifest, family = job_manifest(params)
    if params.c2pa_cert_secret:  # the shards load the Secret blocks themselves: a missing or bad one fails here first
        signer = params.content_credentials()
        get_run_logger().info(
            "C2PA: the shards sign with the certificate of Secret block %r (%s) and the key of Secret block %r",
            params.c2pa_cert_secret,
            signer.subject,
            params.c2pa_key_secret,
        )
    if params.output_format != FILES:
        # Rows whose parameters changed leave their published shards here, once, before any shard starts: shard
        # runs then never rewrite one shard file at the same moment (docs/outputs.md). Loads no model.
        # On the parent's CPU, without the workers' C2PA files (the shards sign; settling rows signs nothing).
        plan = plan_run(replace(params.run_config(), device="cpu", c2pa_cert=None, c2pa_key=None))
        get_run_logger().info(
            "%s shards in %s: %d rows already published, %d to generate",
            params.output_format,
            params.output,
            len(plan.skipped),
            len(plan.todo),
        )
    params, prediction = plan_fleet_for(params, manifest, family)
    # As each shard's engine splits it: the same rows, batch size and model family.
    assignment = assign_shards(manifest.requests, params.shards, params.batch_size, family)
    counts = Counter(assignment.values())
    sizes = [counts.get(index, 0) for index in range(params.shards)]
    costs = shard_costs(manifest.requests, assignment, params.shards, params.batch_size, family)
    get_run_logger().info(
        "manifest %s: %d rows, %d valid, %d invalid; valid rows per shard: %s; shards balanced by predicted "
        "GPU time, predicted idle tail %.1f%%",
        params.manifest,
        manifest.num_rows,
        len(manifest.requests),
        len(manifest.invalid),
        ", ".join(f"{index}/{params.shards}: {size}" for index, size in enumerate(sizes)),
        100 * idle_tail(costs),
    )
    return params, sizes, prediction


def job_manifest(params: FanoutParameters) -> tuple[Manifest, ModelFamily]:
    """The manifest as the shards' engine reads it, and the model's family: its rules (sizes, steps, guidance;
    2.1's optional condition images in `images`, not edit inputs), the checkpoint's, the rows it cannot run."""
    manifest, family, _, _ = read_run_manifest(params.run_config())
    return manifest, family


def plan_fleet_for(
    params: FanoutParameters, manifest: Manifest, family: ModelFamily
) -> tuple[FanoutParameters, dict[str, Any]]:
    """`qwen-batch plan --gpus SHARDS --gpus-per-host 1` for the manifest's largest rows on the model's family,
    when the workers' GPU size is given: the shards then share the plan's memory mode and batch size (the split
    is made in whole batches of it, so every shard must use the same)."""
    if params.gpu_memory_gib is None:
        return params, {}
    if params.transformer:
        # The fleet plan is made for the model's own weights; a transformer file (fp8, GGUF) has modes of its
        # own, which each shard plans from the file's header when it starts (identical GPUs plan alike).
        get_run_logger().info("plan for the shards: each plans for the transformer file %s itself", params.transformer)
        return params, {}
    host = params.host_memory_gib or UNLIMITED_HOST_GIB
    job = Workload.for_requests(manifest.requests, manifest.task, params.batch_size, family=family)
    fleet = plan_fleet(Machine(gpu_gib=params.gpu_memory_gib, host_gib=host), job, params.shards, params.memory_mode, 1)
    get_run_logger().info("plan for the shards:\n%s", fleet.report())
    planned = params.model_copy(
        update={
            "memory_mode": fleet.chosen.mode,
            "batch_size": params.batch_size or fleet.chosen.plan.denoise.batch_size,
        }
    )
    low, high = fleet.chosen.images_per_hour
    return planned, {
        "mode": fleet.chosen.mode,
        "batch_size": planned.batch_size,
        "images_per_hour": f"{low:,.0f}-{high:,.0f}",
    }


def start_shards(params: FanoutParameters) -> list[FlowRun]:
    """One run of the shard deployment per shard, linked to this run as its children."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(params.shard_deployment)
        except ObjectNotFound:
            raise ValueError(
                f"shard_deployment {params.shard_deployment!r} does not exist: deploy it "
                "(prefect deploy --all --prefect-file deployments/prefect.yaml) or name another"
            ) from None
    runs = []
    for index in range(params.shards):
        name = f"{current_run.name}-shard-{index}-of-{params.shards}"
        runs.append(
            run_deployment(
                params.shard_deployment,
                parameters=params.shard_parameters(index),
                flow_run_name=name,
                timeout=0,  # start them all now; `wait_for_shards` waits
                # A retried API call must not start a shard twice; a retry of this flow starts new ones.
                idempotency_key=f"{current_run.id}:{current_run.run_count}:{name}",
                tags=[FLOW_NAME],
            )
        )
    get_run_logger().info("started %d shard runs of %s", len(runs), params.shard_deployment)
    return runs


def wait_for_shards(runs: list[FlowRun], poll_seconds: float) -> list[FlowRun]:
    """Wait, with no time limit, until every shard run is in a final state; log each state change."""
    logger = get_run_logger()
    states: dict[Any, str] = {}
    final: dict[Any, FlowRun] = {}
    started, warned = time.monotonic(), False
    with get_client(sync_client=True) as client:
        while True:
            pending = [run.id for run in runs if run.id not in final]
            try:
                current = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=pending)), limit=len(pending)
                )
            except httpx.HTTPError as error:  # e.g. the server restarting during a wait of days
                logger.warning("could not read the shard runs' states (%s); trying again", error)
                current = []
            for run in current:
                state = run.state.name if run.state else "unknown"
                if states.get(run.id) != state:
                    states[run.id] = state
                    logger.info("%s: %s", run.name, state)
                if run.state is not None and run.state.is_final():
                    final[run.id] = run
            if len(final) == len(runs):
                return [final[run.id] for run in runs]
            waiting = sum(states.get(run.id) in ("Scheduled", "Late") for run in runs)
            if waiting and not warned and time.monotonic() - started > NOT_STARTED_WARNING_SECONDS:
                warned = True
                logger.warning(
                    "%d shard run(s) not started after %d minutes: is a worker polling work pool %r?",
                    waiting,
                    NOT_STARTED_WARNING_SECONDS // 60,
                    runs[0].work_pool_name,
                )
            time.sleep(poll_seconds)


@task(name="merge", **TASK_OPTIONS, **STORAGE_RETRIES)
def merge_shards(params: FanoutParameters, since: datetime) -> dict[str, Any]:
    """Fold every shard's part files into results.parquet: one row per manifest row, in manifest order."""
    manifest, _ = job_manifest(params)
    output = Folder(params.output, params.storage_options())
    table, parts = ResultStore(output).merge_parts(manifest)
    rows = table.select(["id", "prompt", "status", "error", "finished_at"]).to_pylist()
    statuses = Counter(row["status"] for row in rows)
    fresh = [row for row in rows if row["status"] == OK and row["finished_at"] >= since]
    problems = [
        [index, row["id"], row["status"], row["error"]] for index, row in enumerate(rows) if row["status"] != OK
    ]
    shown = [row for row in (fresh or rows) if row["status"] == OK][:SAMPLE_IMAGES]
    encode, denoise, shard_runs = sum_shard_stats(output, since)  # every shard run's, summed
    report = {
        "rows": len(rows),
        "ok": statuses[OK],
        "invalid": statuses[INVALID],
        "failed": statuses[FAILED],
        "generated": len(fresh),
        "results": output.display(RESULTS_FILE),
        "problem_count": len(problems),
        "problems": problems[:MAX_PROBLEMS_SHOWN],
        "samples": [{"id": row["id"], "prompt": row["prompt"]} for row in shown],
        "shard_runs": shard_runs,
        "encode": encode.to_dict(),
        "denoise": denoise.to_dict(),
        # As each shard's summary says it (`Summary.outputs`): every shard runs with these parameters.
        "outputs": {
            "output_format": params.output_format,
            "image_format": params.image_format,
            "marks": MARKS[bool(params.c2pa_cert or params.c2pa_cert_secret)],
        },
    }
    get_run_logger().info(
        "merged %d part files into %s: %d rows, %d ok (%d generated by this run), %d invalid, %d failed",
        len(parts),
        report["results"],
        report["rows"],
        report["ok"],
        report["generated"],
        report["invalid"],
        report["failed"],
    )
    return report


def publish_shards(
    params: FanoutParameters, runs: list[FlowRun], sizes: list[int], report: dict[str, Any], prediction: dict[str, Any]
) -> None:
    """The shards table, then the summary, problems and samples of the merged results."""
    create_table_artifact(
        table=[
            {
                "shard": f"{index}/{params.shards}",
                "run": run.name,
                "state": run.state.name if run.state else "unknown",
                "valid rows": sizes[index],
                "seconds": number(run.total_run_time.total_seconds()),
            }
            for index, run in enumerate(runs)
        ],
        key=artifact_key(FLOW_NAME, "shards"),
        description="The shard runs: state, valid rows and run time of each",
    )
    starts = [run.start_time for run in runs if run.start_time]
    ends = [run.end_time for run in runs if run.end_time]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    completed = sum(bool(run.state and run.state.is_completed()) for run in runs)
    metrics = [
        ("rows", report["rows"]),
        ("ok", report["ok"]),
        ("invalid", report["invalid"]),
        ("failed", report["failed"]),
        ("shards completed", f"{completed} of {len(runs)}"),
        ("ok (generated by this run)", report["generated"]),
        ("images per hour, all shards together", number(report["generated"] / wall * 3600 if wall else None, 0)),
        ("seconds from the first shard's start to the last one's end", number(wall)),
    ]
    # What every shard's stages did, summed (GPU seconds, texts encoded, adapters, step cache, the largest peak).
    denoise = DenoiseStats.from_dict(report["denoise"])
    stats = stats_rows(EncodeStats.from_dict(report["encode"]), denoise)
    metrics += [(f"all shards: {name}", value) for name, value in stats if name != "shards"]
    # The formats, the images' bytes and the shards every shard run published (count, GiB, images per shard), marks.
    metrics += output_metrics(report["outputs"], denoise)
    if prediction:
        metrics += [
            ("planned per shard: memory mode, batch size", f"{prediction['mode']}, {prediction['batch_size']}"),
            ("images per hour predicted (H100-class GPUs)", prediction["images_per_hour"]),
        ]
    publish_report(
        FLOW_NAME, "0/1", metrics, report, Folder(params.output, params.storage_options()), report["samples"]
    )


def rerun_command(params: FanoutParameters, index: int) -> str:
    parameters = json.dumps(params.shard_parameters(index), separators=(",", ":"))
    return f"prefect deployment run {shlex.quote(params.shard_deployment)} --params {shlex.quote(parameters)}"


@flow(
    name=FLOW_NAME,
    description="Split a manifest into N shards of equal predicted GPU time, run them at once on the GPU workers (the "
    "qwen-image-batch/shard deployment), wait for all, and merge one results.parquet. Running again resumes.",
    persist_result=False,
    version=file_hash(__file__),  # Prefect's default, but of this file: `flat_parameters` writes the function
)
@flat_parameters(FanoutParameters)
def qwen_image_fanout(params: FanoutParameters) -> dict[str, Any]:
    """Generate a manifest's images on several workers at once, then merge their results."""
    since = datetime.now(timezone.utc)
    params, sizes, prediction = check_manifest(params)
    runs = wait_for_shards(start_shards(params), params.poll_seconds)
    report = merge_shards(params, since)
    publish_shards(params, runs, sizes, report, prediction)

    failed = [index for index, run in enumerate(runs) if not (run.state and run.state.is_completed())]
    for index in failed:
        state = runs[index].state
        get_run_logger().error(
            "shard %d/%d (%s) ended %s: %s. Re-run it alone with Retry on its page in the UI, or with: %s ; then "
            "run this flow again to merge",
            index,
            params.shards,
            runs[index].name,
            state.name if state else "unknown",
            state.message if state else "",
            rerun_command(params, index),
        )
    if failed:
        raise ShardsFailed(
            f"{len(failed)} of {len(runs)} shard runs did not complete ("
            + ", ".join(f"{index}/{params.shards}" for index in failed)
            + "); their rows are failed in the merged results. The log has the command that re-runs each alone; "
            "running this flow again resumes every shard and merges (finished rows are skipped)."
        )
    if report["failed"]:
        raise RowsFailed(
            f"{report['failed']} of {report['rows']} rows failed (see the problems artifact and {report['results']}); "
            "run this flow again to retry them",
            report,
        )
    return {key: value for key, value in report.items() if key != "samples"}
