"""An S3 API for tests: moto's server on loopback, reached over HTTP exactly as AWS, MinIO or R2 would be.

Import the fixtures into a test module to use them; `aws_environment` exports recognisable
credentials, so a test can check they never leak into outputs.
"""

from __future__ import annotations

import io
import socket
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import write_manifest

ACCESS_KEY_ID = "AKIAQWENBATCHTESTKEY"
SECRET_ACCESS_KEY = "qwen-batch-test-secret-d0-not-leak-42"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_environment(monkeypatch):
    """Credentials as a user would export them; every test starts with fresh S3 clients."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_endpoint, aws_environment):
    import boto3  # here, not at import: the GPU machine runs the gpu tests without boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3) -> str:
    name = f"qwen-batch-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def upload_manifest(s3, bucket: str, key: str, rows: list[dict], tmp_path: Path) -> str:
    path = write_manifest(tmp_path / "upload.parquet", rows)
    s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{key}"


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def read_results(s3, bucket: str, key: str) -> list[dict]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body), use_threads=False).to_pylist()
