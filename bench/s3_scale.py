"""Does object storage keep up at scale: manifests of 100,000 rows, 1,000 images written, a whole run on S3?

    python -m bench.s3_scale --json out.jsonl                          # moto's S3 server on loopback
    python -m bench.s3_scale --endpoint-url URL --bucket B --json out.jsonl   # MinIO or a real bucket

Without --endpoint-url it starts moto's S3 server on loopback (what the tests use); point it at MinIO or a real
bucket (AWS_* credentials in the environment, --bucket) for numbers on real storage (docs/storage.md). On the
same store:
- `manifest-100k`: writing a 100,000-row manifest, then reading + validating it through `read_manifest`
  (seconds and the resident memory it adds);
- `small-object-puts`, `png-encoding`: the store's per-object cost alone; the CPU cost of one 1024x1024 PNG;
- `writer-1000`: 1,000 generated-size PNGs plus their part files through the engine's `BatchWriter` (objects
  per second, MB per second) with the background writer's default concurrency;
- `run-1000`: a full `qwen-batch run` over 1,000 rows of the tiny model (256x256, 2 steps) with S3 output,
  split into time in the model and time waiting for storage.
"""

from __future__ import annotations

import io
import os
import platform
import resource
import socket
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.harness import Scenario, main, scenarios


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manifest_table(rows: int) -> pa.Table:
    sizes = [(1024, 1024), (1664, 928), (928, 1664), (1328, 1328), (512, 512)]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(sizes), rows)
    words = [
        "red",
        "fox",
        "snowy",
        "forest",
        "moon",
        "cinematic",
        "light",
        "portrait",
        "city",
        "night",
        "rain",
        "neon",
        "tea",
        "house",
        "古镇",
        "茶馆",
        "山水",
    ]
    prompts = [" ".join(rng.choice(words, 16)) + f" #{index}" for index in range(rows)]
    return pa.table(
        {
            "id": [f"row-{index:06d}" for index in range(rows)],
            "prompt": prompts,
            "width": pa.array([sizes[p][0] for p in picks], pa.int64()),
            "height": pa.array([sizes[p][1] for p in picks], pa.int64()),
            "seed": pa.array(rng.integers(0, 2**62, rows), pa.int64()),
            "category": pa.array(rng.choice(["a", "b", "c"], rows)),
        }
    )


def bench_manifest(bucket_url: str, options: dict, rows: int) -> dict:
    from qwen_batch.io.storage import Folder
    from qwen_batch.manifest import read_manifest

    sink = io.BytesIO()
    pq.write_table(manifest_table(rows), sink)
    Folder(bucket_url, options).write_bytes("manifest.parquet", sink.getvalue())
    before = rss_mib()
    started = time.perf_counter()
    manifest = read_manifest(f"{bucket_url}/manifest.parquet", options)
    seconds = time.perf_counter() - started
    assert len(manifest.requests) == rows
    return {
        "rows": rows,
        "parquet_mib": round(len(sink.getvalue()) / 2**20, 2),
        "read_and_validate_s": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "rss_added_mib": round(rss_mib() - before, 1),
    }


def bench_writer(bucket_url: str, options: dict, images: int, batch_size: int = 4) -> dict:
    from PIL import Image

    from qwen_batch.io.storage import Folder
    from qwen_batch.manifest import Request
    from qwen_batch.run.results import Record, ResultStore
    from qwen_batch.run.writer import BatchWriter

    output = Folder(f"{bucket_url}/writer", options)
    rng = np.random.default_rng(0)
    # Smooth-ish 1024x1024 images compress like real ones (pure noise would not compress at all).
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    picture = Image.fromarray(base).resize((1024, 1024), Image.BICUBIC)
    requests = [
        Request(index, f"img-{index:05d}", "a prompt", " ", 1024, 1024, index, 50, 4.0) for index in range(images)
    ]
    writer = BatchWriter(output, ResultStore(output))
    started = time.perf_counter()
    for begin in range(0, images, batch_size):
        batch = requests[begin : begin + batch_size]
        records = [Record.for_request(request, "bench", "f") for request in batch]
        writer.submit(batch, [picture] * len(batch), records)
    written = writer.drain()
    writer.close()
    seconds = time.perf_counter() - started
    assert all(record.status == "ok" for record in written)
    png_bytes = len(output.read_bytes("images/img-00000.png"))
    objects = images + (images + batch_size - 1) // batch_size  # PNGs + part files
    return {
        "images": images,
        "png_mib_each": round(png_bytes / 2**20, 2),
        "seconds": round(seconds, 2),
        "objects_per_s": round(objects / seconds, 1),
        "images_per_s": round(images / seconds, 1),
        "mib_per_s": round(images * png_bytes / 2**20 / seconds, 1),
    }


def bench_small_objects(bucket_url: str, options: dict, count: int = 300) -> dict:
    """The per-object cost of the store alone: 1 KiB PUTs, one at a time as a single writer thread does."""
    from qwen_batch.io.storage import Folder

    folder = Folder(f"{bucket_url}/small", options)
    started = time.perf_counter()
    for index in range(count):
        folder.write_bytes(f"o-{index:05d}", b"x" * 1024)
    seconds = time.perf_counter() - started
    return {"objects": count, "seconds": round(seconds, 2), "ms_per_put": round(seconds / count * 1000, 1)}


def bench_png_encoding(images: int = 20) -> dict:
    """The CPU cost of one 1024x1024 PNG with metadata, without any storage."""
    from PIL import Image

    from qwen_batch.outputs.png import encode_png

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((1024, 1024), Image.BICUBIC)
    metadata = {"prompt": "p", "negative_prompt": " ", "width": 1024, "height": 1024, "seed": 1}
    metadata |= {"num_inference_steps": 50, "true_cfg_scale": 4.0, "model": "bench"}
    started = time.perf_counter()
    for _ in range(images):
        encode_png(picture, metadata)
    return {"ms_per_image": round((time.perf_counter() - started) / images * 1000, 1)}


def bench_run(bucket_url: str, options: dict, rows: int) -> dict:
    from qwen_batch.io.storage import Folder
    from qwen_batch.run.engine import RunConfig, run

    table = manifest_table(rows)
    table = table.set_column(2, "width", pa.array([256] * rows, pa.int64()))
    table = table.set_column(3, "height", pa.array([256] * rows, pa.int64()))
    table = table.append_column("num_inference_steps", pa.array([2] * rows, pa.int64()))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    Folder(bucket_url, options).write_bytes("run-manifest.parquet", sink.getvalue())
    config = RunConfig(
        f"{bucket_url}/run-manifest.parquet", f"{bucket_url}/run", batch_size=8, device="cpu", storage_options=options
    )
    started = time.perf_counter()
    summary = run(config)
    seconds = time.perf_counter() - started
    assert summary.generated == rows
    return {
        "rows": rows,
        "total_s": round(seconds, 1),
        "encode_s": round(summary.encode.seconds, 1),
        "denoise_and_write_s": round(summary.denoise.seconds, 1),
        "waiting_on_storage_s": round(summary.denoise.storage_wait_seconds, 1),
        "rows_per_s": round(rows / seconds, 1),
    }


class Store:
    """The bucket the scenarios share: moto's server on loopback unless `--endpoint-url` names one."""

    def __init__(self, endpoint: str | None, bucket: str | None):
        self.server = None
        if endpoint is None:
            from moto.server import ThreadedMotoServer

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
        import s3fs

        from qwen_batch.io.storage import s3_storage_options

        self.options = s3_storage_options(endpoint_url=endpoint)
        name = bucket or f"qwen-batch-bench-{uuid.uuid4().hex[:8]}"
        if not bucket:
            s3fs.S3FileSystem(**self.options["s3"]).mkdir(name)
        self.url = f"s3://{name}/bench-{uuid.uuid4().hex[:8]}"
        self.description = "moto server (loopback)" if self.server else endpoint

    def close(self) -> None:
        if self.server:
            self.server.stop()


def on_the_store(figures, uses_store: bool = True):
    """A scenario measure: `figures(bucket url, options, **params)` on the shared store, as one line with the
    store, the machine and the process's peak RSS."""

    def measure(runner, **params) -> None:
        context = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "python": platform.python_version()}  # fmt: skip
        if uses_store:
            store = runner.shared("store", lambda: Store(runner.args.endpoint_url, runner.args.bucket))
            context["store"] = store.description
            result = figures(store.url, store.options, **params)
        else:
            result = figures(**params)
        peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        runner.write({"run": runner.scenario.name, **context, **result, "peak_rss_mib": peak})

    return measure


SCENARIOS = scenarios(
    Scenario("manifest-100k", on_the_store(bench_manifest), {"rows": 100_000}, "read and validate 100,000 rows", 1),
    Scenario("small-object-puts", on_the_store(bench_small_objects), {}, "1 KiB PUTs, one at a time", 1),
    Scenario("png-encoding", on_the_store(bench_png_encoding, uses_store=False), {}, "one 1024x1024 PNG's CPU cost"),
    Scenario("writer-1000", on_the_store(bench_writer), {"images": 1_000}, "1,000 images through the writer", 3),
    Scenario("run-1000", on_the_store(bench_run), {"rows": 1_000}, "a 1,000-row run with S3 output", 10),
)


def options(parser) -> None:
    parser.add_argument("--endpoint-url", help="S3 endpoint; default: start moto's server on loopback")
    parser.add_argument("--bucket", help="existing bucket to use (default: a new one)")


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__, options=options))
