"""S3 end to end against a real S3 API: moto's server on loopback, reached over HTTP by s3fs/boto.

No boto call is mocked in-process: the CLI talks to the server exactly as it would talk to AWS,
MinIO or R2.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from qwen_batch.cli import main
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, free_port, keys, read_results, upload_manifest
from tests.support import small_row, write_manifest

ROWS = [small_row("cat", "a cat on a sofa"), small_row("zh", "一只猫", seed=3), small_row("bad", "x", width=100)]


def readable(key: str, body: bytes) -> str:
    """What an object says, decompressed: Parquet (zstd) as its rows, a PNG with its text chunks."""
    import pyarrow.parquet as pq
    from PIL import Image

    if key.endswith(".parquet"):
        return json.dumps(
            pq.read_table(io.BytesIO(body), use_threads=False).to_pylist(), default=str, ensure_ascii=False
        )
    if key.endswith(".png"):
        with Image.open(io.BytesIO(body)) as image:
            return json.dumps(image.text, ensure_ascii=False) + body.decode("latin-1")
    return body.decode("latin-1")


def test_manifest_images_results_and_cache_on_s3_then_resume(
    s3_endpoint, s3, bucket, tmp_path, tiny_model, capsys, caplog
):
    caplog.set_level(logging.INFO)  # what the CLI logs by default
    manifest = upload_manifest(s3, bucket, "manifests/m.parquet", ROWS, tmp_path)
    args = ["run", manifest, "--output", f"s3://{bucket}/runs/one", "--device", "cpu"]
    args += ["--s3-endpoint-url", s3_endpoint]
    assert main(args) == 1  # one invalid row

    stored = keys(s3, bucket, "runs/one/")
    assert "runs/one/images/cat.png" in stored and "runs/one/images/zh.png" in stored
    assert "runs/one/results.parquet" in stored
    assert not [key for key in stored if "/_parts/" in key or "/.tmp-" in key], "no leftovers"
    cache_entries = [key for key in stored if key.startswith("runs/one/cache/") and key.endswith(".safetensors")]
    assert len(cache_entries) == 3  # "a cat on a sofa", "一只猫", " "

    rows = {row["id"]: row for row in read_results(s3, bucket, "runs/one/results.parquet")}
    assert rows["bad"]["status"] == "invalid"
    for row_id in ("cat", "zh"):
        assert rows[row_id]["status"] == "ok"
        assert rows[row_id]["image"] == f"s3://{bucket}/runs/one/images/{row_id}.png"
        body = s3.get_object(Bucket=bucket, Key=f"runs/one/images/{row_id}.png")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == rows[row_id]["sha256"]
    first_output = capsys.readouterr()

    # Resume from the S3 state: nothing is generated, nothing encoded, results unchanged.
    assert main(args) == 1
    printed = capsys.readouterr()
    assert "generated  0" in printed.out and "skipped    2" in printed.out
    assert {row["id"]: row for row in read_results(s3, bucket, "runs/one/results.parquet")} == rows

    # Credentials never reach the terminal, the logs, the results or the images (read decompressed:
    # the scan finds the prompts in results.parquet and in the PNGs' metadata, so it would find a key).
    objects = {key: readable(key, s3.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in stored}
    assert "一只猫" in objects["runs/one/results.parquet"] and "一只猫" in objects["runs/one/images/zh.png"]
    assert "encode:" in caplog.text
    everything = [first_output.out, first_output.err, printed.out, printed.err, caplog.text, *objects.values()]
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY):
        assert not any(secret in text for text in everything)


def test_local_manifest_with_s3_output_and_cache_in_another_bucket_via_aws_endpoint_url(
    s3_endpoint, s3, bucket, tmp_path, tiny_model, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the standard variable, no CLI flag
    cache_bucket = f"{bucket}-cache"
    s3.create_bucket(Bucket=cache_bucket)
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:2])
    args = ["run", str(manifest), "--output", f"s3://{bucket}/out", "--cache", f"s3://{cache_bucket}/embeddings"]
    assert main([*args, "--device", "cpu"]) == 0
    assert len(keys(s3, bucket, "out/images/")) == 2
    assert len(keys(s3, cache_bucket, "embeddings/")) == 3
    assert not keys(s3, bucket, "out/cache/")


def test_missing_manifest_object_names_the_url(s3_endpoint, bucket, capsys):
    url = f"s3://{bucket}/nope/m.parquet"
    assert main(["validate", url, "--s3-endpoint-url", s3_endpoint]) == 2
    assert f"{url}: no such file" in capsys.readouterr().err


def test_missing_output_bucket_fails_before_any_model_loads(s3_endpoint, s3, bucket, tmp_path, capsys):
    manifest = upload_manifest(s3, bucket, "m.parquet", ROWS[:1], tmp_path)
    output = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    assert main(["run", manifest, "--output", output, "--s3-endpoint-url", s3_endpoint, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "the bucket does not exist; create it or fix the bucket name" in error
    assert "encode:" not in error and "text encoder" not in error


def test_wrong_endpoint_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qwen_batch.io.storage.RETRY_BASE_DELAY", 0.01)
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["validate", "s3://bucket/m.parquet", "--s3-endpoint-url", dead]) == 2
    error = capsys.readouterr().err
    assert "s3://bucket/m.parquet: cannot reach the storage endpoint" in error
    assert "--s3-endpoint-url or AWS_ENDPOINT_URL" in error


@pytest.fixture
def s3_requiring_credentials():
    """A second S3 server that checks access keys (INITIAL_NO_AUTH_ACTION_COUNT=0): ours are unknown to it."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_denied_access_points_at_the_credentials(s3_requiring_credentials, capsys):
    url = "s3://private/m.parquet"
    assert main(["validate", url, "--s3-endpoint-url", s3_requiring_credentials]) == 2
    error = capsys.readouterr().err
    assert f"{url}: access denied" in error and "check the credentials" in error
    assert SECRET_ACCESS_KEY not in error and ACCESS_KEY_ID not in error


@pytest.fixture(autouse=True)
def _credentials_for_every_test(aws_environment):
    """Every test here talks to S3 with the recognisable test credentials."""


def test_an_edit_manifest_on_s3_reads_its_inputs_from_s3_and_never_from_the_local_disk(
    s3_endpoint, s3, bucket, tmp_path, capsys
):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for name in ("red-square.png", "sunset-hills.jpg"):
        s3.put_object(Bucket=bucket, Key=f"edits/inputs/{name}", Body=(repo / "prompts" / "edit" / name).read_bytes())
    s3.put_object(
        Bucket=bucket, Key="uploads/other.png", Body=(repo / "prompts" / "edit" / "red-square.png").read_bytes()
    )
    small = {"width": 256, "height": 256, "num_inference_steps": 2}
    rows = [
        {"id": "relative", "image": "inputs/red-square.png", "prompt": "make it blue", **small},
        {"id": "absolute", "image": f"s3://{bucket}/edits/inputs/sunset-hills.jpg", "prompt": "add a moon", **small},
        {"id": "local-file", "image": "file:///etc/hostname", "prompt": "x", **small},
        {"id": "other-prefix", "image": f"s3://{bucket}/uploads/other.png", "prompt": "x", **small},
    ]
    manifest = upload_manifest(s3, bucket, "edits/m.parquet", rows, tmp_path)
    args = [
        "run",
        manifest,
        "--output",
        f"s3://{bucket}/edits/out",
        "--device",
        "cpu",
        "--s3-endpoint-url",
        s3_endpoint,
    ]
    assert main(args) == 1  # two rows name inputs outside the manifest's prefix
    results = {row["id"]: row for row in read_results(s3, bucket, "edits/out/results.parquet")}
    assert results["relative"]["status"] == "ok"
    assert results["relative"]["input_images"] == [f"s3://{bucket}/edits/inputs/red-square.png"]
    assert results["absolute"]["status"] == "ok"
    for row_id in ("local-file", "other-prefix"):
        assert results[row_id]["status"] == "invalid"
        assert "outside the allowed input locations" in results[row_id]["error"]

    capsys.readouterr()
    allowed = [*args, "--output", f"s3://{bucket}/edits/out2", "--allow-inputs", f"s3://{bucket}/uploads/"]
    assert main(allowed) == 1  # file:///etc/... stays refused
    results = {row["id"]: row["status"] for row in read_results(s3, bucket, "edits/out2/results.parquet")}
    assert results == {"relative": "ok", "absolute": "ok", "local-file": "invalid", "other-prefix": "ok"}
