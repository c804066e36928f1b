"""How many rows a second does the background writer store, per output format, to local disk and to S3? (CPU)

    python -m bench.output_writer --json out.jsonl                 # every scenario, moto's S3 server on loopback
    python -m bench.output_writer --only 'files-*,parquet-local' --json out.jsonl
    python -m bench.output_writer --endpoint-url URL --bucket B --only '*-s3'   # MinIO or a real bucket

No model: `rows` rows go through the engine's `BatchWriter` alone, in batches of 8 as the engine submits them,
with its defaults (2 writer threads, 2 batches in flight), into
- `files-*`: `images/<id>.png`, one object per row, and a results part file per batch;
- `webdataset-*`, `parquet-*`: shards of 1,000 rows (the tar or data parquet, its stats and sidecars, the
  dataset card), and a part file per shard as it is published.
100,000 rows for files on local disk; 20,000 for the shard formats (local and S3) and 10,000 for files on S3 (one
PUT per row), to keep the suite near 15 minutes on 2 cores (see SCENARIOS). Each image is one of 1,000 pre-made 64x64 RGB pictures (smooth plus mild noise, all distinct,
so a Parquet shard cannot compress repeats away), used in turn: what is measured is the writer's per-row overhead
(encoding a small PNG with its metadata and XMP marks, hashing it, the results part files, the writes, uploads and
shard publishing), not the cost of encoding a 1024x1024 image. That is `encode-1024`: 150 synthetic 1024x1024
images (gradients, blurred blobs and noise) per image format through the encoder alone, on one thread: bytes and
milliseconds each.

Figures per line: rows per second, the writer's wait seconds (the time `submit` and `drain` blocked the caller:
with no GPU work between batches the caller only waits, so this is close to the wall time and the rows per second
are the writer's ceiling), the files created and their bytes (listed under the output afterwards), the process's
CPU seconds and, on moto, the server's. Without `--endpoint-url` each S3 scenario starts a fresh moto server in a
process of its own on 127.0.0.1 (as the tests do, but out of this process so its Python does not take the writer's
GIL; it still takes the machine's cores) and stops it afterwards: its objects live in its memory.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

from bench.harness import Scenario, main, scenarios

BATCH_ROWS = 8  # the engine's batch size
SHARD_ROWS = 1000  # the default --shard-size
# Pictures made before the clock starts, used in turn: every shard of 1,000 rows holds each once.
DISTINCT_IMAGES = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def versions() -> dict:
    """What the writer's speed depends on, beyond the harness's torch/diffusers/transformers."""
    import fsspec
    import moto
    import PIL
    import pyarrow
    import s3fs
    import webdataset
    from PIL import features

    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libwebp": features.version("webp"),
        "libjpeg": features.version("jpg"),
        "zlib": features.version("zlib"),
        "pyarrow": pyarrow.__version__,
        "fsspec": fsspec.__version__,
        "s3fs": s3fs.__version__,
        "moto": moto.__version__,
        "webdataset": webdataset.__version__,
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MotoServer:
    """moto's S3 server on 127.0.0.1 in a process of its own."""

    def __init__(self):
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit status {self.process.poll()})") from None
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def s3_output(runner) -> tuple[str, dict, MotoServer | None, str]:
    """The output URL, its storage options, the moto server started for it (or None) and the store's name."""
    import s3fs

    from qwen_batch.io.storage import s3_storage_options

    server, endpoint = None, runner.args.endpoint_url
    if endpoint is None:
        server = MotoServer()
        endpoint = server.endpoint
    options = s3_storage_options(endpoint_url=endpoint)
    bucket = runner.args.bucket or f"qwen-batch-bench-{uuid.uuid4().hex[:8]}"
    if not runner.args.bucket:
        s3fs.S3FileSystem(**options["s3"]).mkdir(bucket)
    store = "moto server (127.0.0.1, own process)" if server else endpoint
    return f"s3://{bucket}/writer-{uuid.uuid4().hex[:8]}", options, server, store


def small_images(size: int = 64, count: int = DISTINCT_IMAGES) -> list:
    """`count` distinct smooth-ish RGB pictures of size x size: an upscaled 8x8 colour field plus mild noise, so
    that no two encode to the same pixel data (a Parquet shard's zstd pages would fold repeated images away)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.asarray(base, np.float32) + rng.normal(0, 4, (size, size, 3))
        pictures.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return pictures


def synthetic_images(size: int, count: int = 4) -> list:
    """Smooth-ish synthetic pictures: two colour gradients, a blurred blob field and mild noise (real generated
    images compress between these and pure noise; these are not real images)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pictures = []
    for index in range(count):
        low = rng.random((16, 16, 3)).astype(np.float32) * 255
        blobs = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
        gradient = np.stack([x * 255, y * 255, (1 - x) * (0.5 + 0.5 * y) * 255], axis=-1)
        noise = rng.normal(0, 6 + 2 * index, (size, size, 3)).astype(np.float32)
        pixels = np.clip(0.5 * blobs + 0.5 * gradient + noise, 0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(pixels))
    return pictures


def make_requests(rows: int, size: int) -> list:
    from qwen_batch.manifest import Request

    prompt = "a red fox in a snowy forest under the moon, cinematic light, portrait"
    return [
        Request(index, f"row-{index:06d}", f"{prompt} #{index}", " ", size, size, index, 50, 4.0)
        for index in range(rows)
    ]


def listing(output) -> tuple[int, int, dict[str, int], int]:
    """Files under `output` (one listing, temporaries included), their bytes, the count per top folder, and how
    many are temporaries."""
    from qwen_batch.io.storage import TEMP_PREFIX

    output.fs.invalidate_cache(output.root)
    found = output.fs.find(output.root, detail=True)
    prefix = output.root.rstrip("/") + "/"
    files = total = temporaries = 0
    per_folder: dict[str, int] = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        files += 1
        total += int(info.get("size") or 0)
        top = relative.split("/", 1)[0] if "/" in relative else "."
        per_folder[top] = per_folder.get(top, 0) + 1
        temporaries += os.path.basename(relative).startswith(TEMP_PREFIX)
    return files, total, dict(sorted(per_folder.items())), temporaries


def through_writer(runner, output_format: str, destination: str, rows: int = 100_000, size: int = 64) -> None:
    """`rows` rows of pre-made size x size images through `BatchWriter` into `output_format` on `destination`."""
    from qwen_batch.io.storage import Folder
    from qwen_batch.outputs.destinations import ImageFiles, ShardedImages
    from qwen_batch.outputs.encoder import ImageEncoder
    from qwen_batch.outputs.images import ImageFormat
    from qwen_batch.run.results import OK, Record, ResultStore
    from qwen_batch.run.writer import BatchWriter

    server, store = None, "local disk"
    if destination == "local":
        url, options = str(runner.work / "output"), {}
    else:
        url, options, server, store = s3_output(runner)
    try:
        output = Folder(url, options)
        encoder = ImageEncoder(ImageFormat.PNG)
        if output_format == "files":
            target = ImageFiles(output, encoder.format)
        else:
            target = ShardedImages(output, output_format, encoder.format, SHARD_ROWS)
        writer = BatchWriter(ResultStore(output), target, encoder)
        pictures = small_images(size)
        requests = make_requests(rows, size)
        runner.progress(f"{output_format} -> {store}: {rows} rows")
        tenth = rows // 10 // BATCH_ROWS * BATCH_ROWS or BATCH_ROWS
        marks: list[float] = []  # when each tenth of the rows had been submitted: is the rate steady?
        cpu_before, moto_before = own_cpu_seconds(), server.cpu_seconds() if server else 0.0
        started = time.perf_counter()
        try:
            for begin in range(0, rows, BATCH_ROWS):
                batch = requests[begin : begin + BATCH_ROWS]
                records = [Record.for_request(request, "bench", "fingerprint") for request in batch]
                images = [pictures[request.index % len(pictures)] for request in batch]
                writer.submit(batch, images, records)
                if begin and begin % tenth == 0:
                    marks.append(time.perf_counter() - started)
                    runner.progress(f"  {begin} rows submitted, {marks[-1]:.0f} s")
            written = writer.drain()
        finally:
            writer.close()
        seconds = time.perf_counter() - started
        cpu = own_cpu_seconds() - cpu_before
        moto_cpu = server.cpu_seconds() - moto_before if server else None
        ok = sum(record.status == OK for record in written)
        if ok != rows:
            errors = {record.error for record in written if record.status != OK}
            raise RuntimeError(f"{ok} of {rows} rows stored; errors: {sorted(errors)[:3]}")
        listed_started = time.perf_counter()
        files, total, per_folder, temporaries = listing(output)
        listing_seconds = time.perf_counter() - listed_started
        counts = target.counts
        line = {
            "run": runner.scenario.name,
            "output_format": output_format,
            "destination": destination,
            "store": store,
            "image_format": encoder.format.value,
            "image_size": size,
            "distinct_images": len(pictures),
            "rows": rows,
            "batch_rows": BATCH_ROWS,
            "shard_rows": SHARD_ROWS if output_format != "files" else None,
            "writer_threads": 2,
            "max_pending_batches": 2,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 1),
            "rows_per_s_by_tenth": [round(tenth / (b - a), 1) for a, b in zip([0.0, *marks], marks, strict=False)],
            "wait_seconds": round(writer.wait_seconds, 2),
            "files": files,
            "files_per_folder": per_folder,
            "temporaries_left": temporaries,
            "bytes": total,
            "mb": round(total / 1e6, 1),
            "image_bytes": writer.image_bytes,
            "image_bytes_per_row": round(writer.image_bytes / rows),
            "bytes_per_row": round(total / rows),
            "shards": counts.shards if output_format != "files" else None,
            "cpu_seconds": round(cpu, 1),
            "cpu_ms_per_row": round(cpu / rows * 1000, 3),
            "moto_cpu_seconds": round(moto_cpu, 1) if moto_cpu is not None else None,
            "listing_seconds": round(listing_seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        runner.write({**line, **versions()})
    finally:
        if server is not None:
            server.stop()
    if destination == "local":  # 100,000 files: not kept for the next scenario
        import shutil

        shutil.rmtree(url, ignore_errors=True)


def encode_full_size(runner, rows: int = 200, size: int = 1024) -> None:
    """Per image format: `rows` synthetic size x size images through `ImageEncoder.encode` (its metadata and XMP
    marks) on this thread, one line per format with the bytes and seconds per image."""
    from qwen_batch.outputs.encoder import ImageEncoder
    from qwen_batch.outputs.images import DEFAULT_QUALITY, WEBP_METHOD, ImageFormat
    from qwen_batch.run.results import Record

    pictures = synthetic_images(size)
    requests = make_requests(rows, size)
    records = [Record.for_request(request, "bench", "fingerprint") for request in requests]
    for image_format in ImageFormat:
        encoder = ImageEncoder(image_format)
        encoder.encode(requests[0], pictures[0], records[0])  # warm: first-call imports
        runner.progress(f"encode {image_format.value} {size}x{size}: {rows} rows")
        sizes, times = [], []
        for request, record in zip(requests, records, strict=True):
            picture = pictures[request.index % len(pictures)]
            started = time.perf_counter()
            data = encoder.encode(request, picture, record)
            times.append(time.perf_counter() - started)
            sizes.append(len(data))
        per_picture = {
            index: round(statistics.mean(sizes[index :: len(pictures)])) for index in range(min(len(pictures), rows))
        }
        line = {
            "run": runner.scenario.name,
            "image_format": image_format.value,
            "quality": DEFAULT_QUALITY.get(image_format),
            "webp_method": WEBP_METHOD if image_format is ImageFormat.WEBP else None,
            "image_size": size,
            "synthetic": "gradients + blurred 16x16 blobs + gaussian noise (sigma 6-12), 4 distinct",
            "rows": rows,
            "threads": 1,
            "bytes_per_image_mean": round(statistics.mean(sizes)),
            "bytes_per_image_by_picture": per_picture,
            "mb_per_image": round(statistics.mean(sizes) / 1e6, 3),
            "encode_ms_mean": round(statistics.mean(times) * 1000, 1),
            "encode_ms_median": round(statistics.median(times) * 1000, 1),
            "encode_ms_p90": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1000, 1),
            "images_per_s_one_thread": round(len(times) / sum(times), 2),
        }
        runner.write({**line, **versions()})


def writer_scenario(output_format: str, destination: str, rows: int, minutes: float, note: str = "") -> Scenario:
    where = "local disk" if destination == "local" else "S3 (moto)"
    about = f"{rows:,} rows of 64x64 PNGs through BatchWriter into {output_format} on {where}{note}"
    params = {"output_format": output_format, "destination": destination, "rows": rows}
    return Scenario(f"{output_format}-{destination}", through_writer, params, about, minutes)


# Minutes on a 2-core x86 machine. Only files-local runs the 100,000 rows: there the writer slowed from
# ~425 to ~160 rows/s as it went (every submit scans every batch future kept since the start: quadratic in the
# batches), 7 minutes in all; the others are scaled down to keep the suite near 15 minutes on 2 cores (moto also
# answers from Python on them: files-s3 ~10 ms a row, a PUT per image and a part file per 8 rows).
SCENARIOS = scenarios(
    writer_scenario("files", "local", 100_000, 3),
    writer_scenario("webdataset", "local", 100_000, 3),
    writer_scenario("parquet", "local", 100_000, 2),
    writer_scenario("files", "s3", 100_000, 15, " (one PUT per row)"),
    writer_scenario("webdataset", "s3", 100_000, 4),
    writer_scenario("parquet", "s3", 100_000, 3),
    Scenario("encode-1024", encode_full_size, {"rows": 150, "size": 1024}, "1024x1024 png/webp/jpeg encode", 1.5),
)


def options(parser) -> None:
    parser.add_argument("--endpoint-url", help="S3 endpoint; default: start moto's server on 127.0.0.1 per scenario")
    parser.add_argument("--bucket", help="existing bucket to use (default: a new one)")


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__, options=options))
