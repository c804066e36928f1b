"""Qwen-Image-2.1 through S3, shards and the fan-out's view of a manifest (the tiny 2.1 model, CPU).

A 2.1 manifest's `images` column holds condition images, optional per row: `Manifest.task` says "edit" because of
the column, but the run, the shards and the fan-out read it with 2.1's rules, so rows without images are rows
like any other. The Prefect flows with `model="tiny-2.1"` run in test_flows_e2e.py, on its server.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwen_batch.run.engine import RunConfig, plan_run, run
from qwen_batch.run.results import FAILED, INVALID, OK
from tests.s3_server import keys, read_results, upload_manifest
from tests.support import picture_png, small_row, write_manifest

MODEL = "tiny-2.1"
CONDITION_IMAGES = {"img/photo.png": picture_png((96, 64), 1), "img/cut-out.png": picture_png((64, 64), 2, alpha=True)}


def statuses(records: list[dict]) -> dict[str, str]:
    return {record["id"]: record["status"] for record in records}


# --- S3 --------------------------------------------------------------------------------------------

S3_ROWS = [
    small_row("plain", "a red fox"),
    small_row("guided", "a bowl of lemons", negative_prompt="blurry, dark", true_cfg_scale=3.0, seed=2),
    small_row("one-image", "the same scene in winter", images=["img/photo.png"], seed=3),
    small_row("two-images", "the cat of picture 1 on the sofa of picture 2", images=list(CONDITION_IMAGES), seed=4),
]


def s3_config(s3_endpoint: str, manifest: str, output: str, cache: str) -> RunConfig:
    return RunConfig(
        manifest, output, cache=cache, model=MODEL, device="cpu", batch_size=4, s3_endpoint_url=s3_endpoint
    )


def upload_condition_images(s3, bucket: str, prefix: str) -> None:
    for name, body in CONDITION_IMAGES.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)


def test_a_21_manifest_with_condition_images_on_s3_runs_to_s3_then_resumes(s3_endpoint, s3, bucket, tmp_path):
    upload_condition_images(s3, bucket, "m21")
    manifest = upload_manifest(s3, bucket, "m21/m.parquet", S3_ROWS, tmp_path)
    config = s3_config(s3_endpoint, manifest, f"s3://{bucket}/m21/out", f"s3://{bucket}/m21/cache")

    summary = run(config)
    assert summary.exit_code == 0, summary.problems
    assert summary.generated == len(S3_ROWS)
    assert keys(s3, bucket, "m21/out/images/") == sorted(f"m21/out/images/{row['id']}.png" for row in S3_ROWS)
    results = {record["id"]: record for record in read_results(s3, bucket, "m21/out/results.parquet")}
    assert statuses(list(results.values())) == dict.fromkeys(results, OK) and len(results) == len(S3_ROWS)
    # The relative keys are read next to the manifest, on S3, and each image's hash is recorded.
    photo, cut_out = (f"s3://{bucket}/m21/{name}" for name in CONDITION_IMAGES)
    assert results["two-images"]["input_images"] == [photo, cut_out]
    assert len(results["two-images"]["input_sha256"]) == 2 and results["plain"]["input_images"] is None
    for row_id in ("plain", "two-images"):
        body = s3.get_object(Bucket=bucket, Key=f"m21/out/images/{row_id}.png")["Body"].read()
        with Image.open(io.BytesIO(body)) as image:
            assert image.mode == "RGBA" and image.size == (256, 256)
    stored = keys(s3, bucket, "m21/")
    assert [key for key in stored if key.startswith("m21/cache/")], "the embedding cache is on S3"
    assert not [key for key in stored if key.startswith("m21/out/cache/") or "/_parts/" in key or "/.tmp-" in key]

    again = run(config)  # resume from the S3 state alone
    assert again.exit_code == 0 and again.generated == 0 and again.skipped == len(S3_ROWS)
    assert again.encode.encoded == 0, "nothing is encoded again"
    assert {record["id"]: record for record in read_results(s3, bucket, "m21/out/results.parquet")} == results


def test_a_row_whose_condition_image_is_missing_on_s3_fails_alone_then_runs_once_it_is_there(
    s3_endpoint, s3, bucket, tmp_path
):
    upload_condition_images(s3, bucket, "m21")
    rows = [*S3_ROWS[:1], S3_ROWS[2], small_row("gone", "a portrait", images=["img/missing.png"], seed=5)]
    manifest = upload_manifest(s3, bucket, "m21/missing.parquet", rows, tmp_path)
    config = s3_config(s3_endpoint, manifest, f"s3://{bucket}/m21/out", f"s3://{bucket}/m21/cache")

    summary = run(config)
    assert summary.exit_code == 1 and summary.generated == 2 and summary.failed == 1
    results = {record["id"]: record for record in read_results(s3, bucket, "m21/out/results.parquet")}
    assert statuses(list(results.values())) == {"plain": OK, "one-image": OK, "gone": FAILED}
    assert f"s3://{bucket}/m21/img/missing.png" in results["gone"]["error"]
    assert "no such file" in results["gone"]["error"]
    assert keys(s3, bucket, "m21/out/images/") == ["m21/out/images/one-image.png", "m21/out/images/plain.png"]

    # The image uploaded, the next run generates that row alone.
    s3.put_object(Bucket=bucket, Key="m21/img/missing.png", Body=picture_png((80, 80), 7))
    again = run(config)
    assert again.exit_code == 0 and again.generated == 1 and again.skipped == 2
    assert statuses(read_results(s3, bucket, "m21/out/results.parquet")) == dict.fromkeys(results, OK)


# --- Shards ----------------------------------------------------------------------------------------

BATCH_SIZE = 2
# Rows with and without condition images, each kind a batch of its own (its own size, steps or guidance), so a
# shard's batches are the unsharded run's and its images the same bytes. Two rows only 2.1's rules refuse.
SHARD_ROWS = [
    small_row("fox", "a red fox", seed=1),
    small_row("lighthouse", "a lighthouse at dusk, waves below", seed=2),
    small_row("winter", "the same scene in winter", images=["img/photo.png"], num_inference_steps=3, seed=3),
    small_row("sketch", "a pencil sketch of it", images=["img/cut-out.png"], num_inference_steps=3, seed=4),
    small_row("pair", "the cat of picture 1 on picture 2", images=list(CONDITION_IMAGES), width=288, seed=5),
    small_row("lemons", "a bowl of lemons", negative_prompt="blurry", true_cfg_scale=3.0, seed=6),
    small_row("odd-size", "a kite", width=272, seed=7),  # a multiple of 16 (Qwen-Image's), not of 32 (2.1's)
    small_row("from-photo", "a kite", init_image="img/photo.png", strength=0.5, seed=8),  # not a 2.1 feature
]
VALID = [row["id"] for row in SHARD_ROWS[:6]]


@pytest.fixture
def shard_manifest(tmp_path):
    for name, body in CONDITION_IMAGES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(body)
    return write_manifest(tmp_path / "m.parquet", SHARD_ROWS)


def shard_config(manifest, output, shard: str = "0/1") -> RunConfig:
    return RunConfig(str(manifest), str(output), model=MODEL, device="cpu", batch_size=BATCH_SIZE, shard=shard)


@pytest.mark.slow
def test_two_shards_then_the_merge_generate_every_21_row_once_as_one_run_does(shard_manifest, tmp_path):
    from qwen_batch.run.engine import make_batches

    whole = run(shard_config(shard_manifest, tmp_path / "whole"))
    assert whole.generated == len(VALID) and whole.invalid == 2

    output = tmp_path / "sharded"
    shards = [shard_config(shard_manifest, output, f"{index}/2") for index in range(2)]
    plans = [plan_run(config) for config in shards]
    mine = [[request.id for request in plan.todo] for plan in plans]
    assert all(mine) and sorted(mine[0] + mine[1]) == sorted(VALID), "every valid row in exactly one shard"
    # The premise of comparing bytes: no batch of the unsharded run is cut between the shards (on the CPU a row's
    # pixels may move by 1/255 with the rows it shares a batch with: within 2.1's contract, not byte-equal).
    for batch in make_batches(plans[0].manifest.requests, BATCH_SIZE):
        assert any({request.id for request in batch} <= set(ids) for ids in mine), [r.id for r in batch]

    generated = []
    for config, ids in zip(shards, mine, strict=True):
        summary = run(config)
        assert summary.exit_code == 0 and summary.generated == len(ids), summary.problems
        generated += [record.id for record in summary.denoise.records if record.status == OK]
    assert sorted(generated) == sorted(VALID), "each row generated once, by its shard"
    assert not (output / "results.parquet").exists(), "a shard leaves its part files to the merge"

    merged = run(shard_config(shard_manifest, output))
    assert merged.generated == 0 and merged.skipped == len(VALID) and merged.invalid == 2
    assert not list((output / "_parts").glob("*.parquet")), "every part file folded in"
    records = pq.read_table(output / "results.parquet").to_pylist()
    assert [record["id"] for record in records] == [row["id"] for row in SHARD_ROWS], "every row once, in order"
    assert statuses(records) == {**dict.fromkeys(VALID, OK), "odd-size": INVALID, "from-photo": INVALID}
    reasons = {record["id"]: record["error"] for record in records}
    assert "multiple of 32" in reasons["odd-size"] and "Qwen-Image-2.1" in reasons["from-photo"]
    assert pq.read_table(tmp_path / "whole" / "results.parquet").select(["id", "status", "sha256"]) == pq.read_table(
        output / "results.parquet"
    ).select(["id", "status", "sha256"])
    for row_id in VALID:
        assert (output / "images" / f"{row_id}.png").read_bytes() == (
            tmp_path / "whole" / "images" / f"{row_id}.png"
        ).read_bytes(), row_id


def test_the_fanout_reads_a_21_manifest_as_its_shards_do(shard_manifest):
    """The fan-out parent's view (its split, its merge): 2.1's rules, rows without condition images valid, the
    rows 2.1 refuses invalid with 2.1's reasons; its split is the shards' own."""
    from flows.parameters import FanoutParameters
    from flows.qwen_image_fanout import job_manifest
    from qwen_batch.families.qwen_image21 import FAMILY
    from qwen_batch.manifest import EDIT, read_manifest
    from qwen_batch.run.sharding import assign_shards

    params = FanoutParameters(manifest=str(shard_manifest), output="unused", model=MODEL, batch_size=BATCH_SIZE)
    manifest, family = job_manifest(params)
    assert family is FAMILY and manifest.task == EDIT  # the `images` column; not an edit for 2.1's rows
    assert [request.id for request in manifest.requests] == VALID
    assert [row.id for row in manifest.invalid] == ["odd-size", "from-photo"]
    shard = plan_run(shard_config(shard_manifest, shard_manifest.parent / "out", "1/2"))
    assert (manifest.requests, manifest.invalid) == (shard.manifest.requests, shard.manifest.invalid)
    split = assign_shards(manifest.requests, 2, BATCH_SIZE, family)
    assert sorted(request.id for request in shard.todo) == sorted(row for row, index in split.items() if index == 1)
    # Read as Qwen-Image reads it (what the fan-out did), rows without condition images were invalid edits.
    as_qwen_image = read_manifest(str(shard_manifest))
    assert "fox" in {row.id for row in as_qwen_image.invalid}


def test_the_fanout_plans_the_shards_memory_for_21(shard_manifest, monkeypatch):
    """With the workers' GPU size, the parent plans the shards' memory mode and batch size for the model's family:
    2.1's sizes and its rows' condition images (each row's prefix K/V cache), not Qwen-Image's edits."""
    import logging

    import flows.qwen_image_fanout as fanout
    from flows.parameters import FanoutParameters
    from qwen_batch.families import GENERATE
    from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
    from qwen_batch.memory.fleet import plan_fleet
    from qwen_batch.memory.planner import Machine, Workload

    monkeypatch.setattr(fanout, "get_run_logger", lambda: logging.getLogger(__name__))
    params = FanoutParameters(
        manifest=str(shard_manifest), output="unused", model=MODEL, batch_size=BATCH_SIZE, gpu_memory_gib=48
    )
    manifest, family = fanout.job_manifest(params)
    planned, prediction = fanout.plan_fleet_for(params, manifest, family)

    def plan(family):
        job = Workload.for_requests(manifest.requests, manifest.task, BATCH_SIZE, family=family)
        return job, plan_fleet(Machine(gpu_gib=48, host_gib=fanout.UNLIMITED_HOST_GIB), job, 2, "auto", 1).chosen

    job, chosen = plan(family)
    assert (job.family, job.task, job.condition_images) == ("qwen-image-2.1", GENERATE, 2)
    assert (planned.memory_mode, planned.batch_size) == (chosen.mode, BATCH_SIZE) == (prediction["mode"], 2)
    low, high = chosen.images_per_hour
    assert prediction["images_per_hour"] == f"{low:,.0f}-{high:,.0f}"
    # Planned as Qwen-Image (what the fan-out did), the shards would get another plan.
    _, as_qwen_image = plan(QWEN_IMAGE)
    assert (as_qwen_image.mode, as_qwen_image.images_per_hour) != (chosen.mode, chosen.images_per_hour)
