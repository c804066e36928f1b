"""How much faster is one manifest on N GPUs, as N shard processes, than on one?

    python -m bench.scale_out --json out.jsonl                     # both sides (about 12 minutes on 2 H100s)
    python -m bench.scale_out --only two-gpus --json out.jsonl     # one side per command; the same file
    python -m bench.scale_out --model tiny                         # the same code on the CPU, tiny model

One GPU is one unsharded process, as `qwen-batch run` is. N GPUs are N shard processes, each the entry point
the `qwen-image-batch/shard` deployment runs (the engine with `--shard K/N`), started directly and
pinned to its GPU with CUDA_VISIBLE_DEVICES (no Prefect server on the GPU machine), then the merge the fan-out
flow does. Every process builds its own model (random full-size weights, on its GPU) and encodes its own rows,
as a worker does; the wall time counts all of it, from the first launch to the merged results.parquet. Each
shard records its timeline, so the line says where a process's fixed cost goes.

The manifest mixes sizes (512x512, 1024x1024, 1664x928, in a seeded random order), the case where a split by
row count leaves one GPU idle at the end; each line gives the measured idle tail of qwen-batch's split and the
tails other splits would have had, predicted with the same cost model. Each side records the GPUs' identities
and matmul rates; once both sides are in the results file, a `scale-out` line gives the speedup, refused when
they ran on different GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PROCESS_STARTED = time.time()  # before the heavy imports (torch, diffusers): a shard's timeline starts here

from bench.harness import Scenario, main, read_lines, scenarios  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = [(512, 512), (1024, 1024), (1664, 928)]


def write_manifest(path: Path, rows: int, steps: int) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    chooser = random.Random(0)  # a seeded mix, in no tidy order: as a real manifest comes
    sizes = [chooser.choice(SIZES) for _ in range(rows)]
    table = pa.table(
        {
            "id": [f"row-{n:04d}" for n in range(rows)],
            "prompt": [f"a lighthouse on a cliff at dusk, study number {n}" for n in range(rows)],
            "width": pa.array([w for w, _ in sizes], pa.int64()),
            "height": pa.array([h for _, h in sizes], pa.int64()),
            "seed": pa.array(range(rows), pa.int64()),
            "num_inference_steps": pa.array([steps] * rows, pa.int64()),
        }
    )
    pq.write_table(table, path)
    return path


def run_shard(args) -> None:
    """One process: the engine over shard K/N of the manifest, timed; writes a JSON line.

    The stages run one by one (as the flow runs them) so the record says where the fixed cost of a
    process goes: interpreter and imports, CUDA start-up, planning, the encode and denoise stages
    (each with its model's load), and the finish.
    """
    import logging

    import torch

    from bench.full_size import FULL_SIZE_MODEL, full_size_source
    from qwen_batch.run.engine import RunConfig, denoise_stage, encode_stage, finalize, plan_run

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {args.shard} %(name)s: %(message)s")

    marks = {"imported": time.time()}
    timings: dict[str, float] = {}
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device=device)  # the context is made here, not inside a stage
    marks["cuda_ready"] = time.time()
    full_size_source(device=device, timings=timings, tiny=args.tiny)
    plan = plan_run(
        RunConfig(
            manifest=args.manifest,
            output=args.output,
            model=FULL_SIZE_MODEL,
            batch_size=args.batch_size,
            device=device,
            memory_mode="bf16" if not args.tiny else "auto",
            compile="off",  # each process would pay its own compile: kept out of the comparison
            shard=args.shard,
        )
    )
    marks["planned"] = time.time()
    encode = encode_stage(plan)
    marks["encoded"] = time.time()
    denoise = denoise_stage(plan)
    marks["denoised"] = time.time()
    summary = finalize(plan, encode, denoise)
    marks["finished"] = time.time()
    record = {
        "shard": args.shard,
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "launched": args.launched,
        "started": PROCESS_STARTED,
        "finished": marks["finished"],
        # Seconds from launch to each point: where the per-process fixed cost goes.
        "timeline": {
            "interpreter": round(PROCESS_STARTED - args.launched, 2),
            **{name: round(moment - args.launched, 2) for name, moment in marks.items()},
        },
        "rows": summary.rows,
        "generated": summary.generated,
        "failed": summary.failed,
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
        "encode_seconds": round(summary.encode.seconds, 2),
        "denoise_seconds": round(summary.denoise.seconds, 2),
        "peak_gpu_gib_denoise": summary.denoise.peak_gpu_gib,
    }
    with open(args.record, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def launch(manifest: Path, output: Path, gpus: int, args, record: Path) -> list[subprocess.Popen]:
    processes = []
    for index in range(gpus):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index)}
        command = [
            sys.executable,
            "-m",
            "bench.scale_out",
            "shard",
            "--manifest",
            str(manifest),
            "--output",
            str(output),
        ]
        command += ["--shard", f"{index}/{gpus}", "--batch-size", str(args.batch_size), "--record", str(record)]
        command += ["--launched", repr(time.time())]
        command += ["--tiny"] if args.tiny else []
        processes.append(subprocess.Popen(command, env=env, cwd=REPO))
    return processes


def merge_like_the_fanout(manifest: Path, output: Path):
    """What the fan-out flow's merge task does once its shards end: fold the part files into one results.parquet.

    No model and no engine plan: only the manifest and the part files (flows/qwen_image_fanout.py).
    """
    from qwen_batch.io.storage import Folder
    from qwen_batch.manifest import read_manifest
    from qwen_batch.run.results import ResultStore

    table, _ = ResultStore(Folder(str(output))).merge_parts(read_manifest(str(manifest)))
    return table


def timed_run(manifest: Path, output: Path, gpus: int, args, work: Path) -> dict:
    """The manifest on `gpus` GPUs; wall time from launch to one merged results.parquet.

    One GPU is one unsharded process, as `qwen-batch run` is: it merges its own results. N GPUs are N
    shard processes at once, then the fan-out's merge (in this process, as the fan-out parent does).
    """
    import pyarrow.parquet as pq

    # A run left in the same --work folder would be resumed (every row already done) and the wall
    # time would read as a speed-up: each timed run starts from an empty output and record.
    shutil.rmtree(output, ignore_errors=True)
    record = work / f"shards-{gpus}.jsonl"
    record.unlink(missing_ok=True)
    started = time.time()
    processes = launch(manifest, output, gpus, args, record)
    codes = [process.wait() for process in processes]
    exited = time.time()  # the last process is gone: its GPU memory and CUDA context are released
    results = merge_like_the_fanout(manifest, output) if gpus > 1 else pq.read_table(output / "results.parquet")
    wall = time.time() - started
    shards = [json.loads(line) for line in record.read_text().splitlines()]
    finishes = sorted(shard["finished"] - started for shard in shards)
    statuses = results.column("status").to_pylist()
    ids = results.column("id").to_pylist()
    return {
        "gpus": gpus,
        "exit_codes": codes,
        "wall_seconds": round(wall, 2),
        "images": statuses.count("ok"),
        "merged_rows": len(ids),
        "distinct_ids": len(set(ids)),
        "images_per_hour": round(statuses.count("ok") / wall * 3600, 1),
        "last_exit_seconds": round(exited - started, 2),
        "merge_seconds": round(wall - (exited - started), 2),
        "shards": shards,
        # The GPUs that finished first wait for the last: that wait, as a share of the wall time.
        "measured_idle_tail": round(sum(finishes[-1] - f for f in finishes) / (len(finishes) * finishes[-1]), 4),
        # Seconds per image of each row's batch, by size: what the cost model predicts relative to.
        "seconds_per_image": per_size_seconds(output),
    }


def per_size_seconds(output: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(output / "results.parquet", columns=["width", "height", "seconds", "status"])
    by_size: dict[str, list[float]] = {}
    for row in table.to_pylist():
        if row["status"] == "ok":
            by_size.setdefault(f"{row['width']}x{row['height']}", []).append(row["seconds"])
    return {size: round(sum(values) / len(values), 3) for size, values in sorted(by_size.items())}


def predicted_tails(manifest: Path, gpus: int, batch_size: int) -> dict:
    import hashlib

    from qwen_batch.manifest import read_manifest
    from qwen_batch.run.sharding import assign_shards, idle_tail, shard_costs

    requests = read_manifest(str(manifest)).requests
    balanced = shard_costs(requests, assign_shards(requests, gpus, batch_size), gpus, batch_size)
    by_hash = {r.id: int.from_bytes(hashlib.sha256(r.id.encode()).digest()[:8], "big") % gpus for r in requests}
    by_count = {r.id: n % gpus for n, r in enumerate(requests)}
    return {
        "cost_balanced": round(idle_tail(balanced), 4),
        "id_hash": round(idle_tail(shard_costs(requests, by_hash, gpus, batch_size)), 4),
        "row_count_round_robin": round(idle_tail(shard_costs(requests, by_count, gpus, batch_size)), 4),
    }


def check_gpus() -> dict:
    """Each GPU's identity and its bf16 matmul rate now: two timed sides compare only on the same, equally fast GPUs."""
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        with torch.cuda.device(index):
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            for _ in range(10):  # clocks up, kernels chosen
                a @ a
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                a @ a
            end.record()
            end.synchronize()
            tflops = 50 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
            properties = torch.cuda.get_device_properties(index)
            gpus.append(
                {"index": index, "name": properties.name, "uuid": str(properties.uuid), "matmul_tflops": round(tflops)}
            )
    return {"machine": socket.gethostname(), "gpus": gpus}


def check_gpus_here() -> dict:
    """`check_gpus` in a process of its own: this one holds no GPU memory while the sides run."""
    done = subprocess.run([sys.executable, "-m", "bench.scale_out", "check-gpus"], capture_output=True, text=True,
                          check=True, cwd=REPO)  # fmt: skip
    return json.loads(done.stdout)


def side(runner, gpus: int, rows: int = 26, steps: int = 50, batch_size: int = 4, compared: int = 2) -> None:
    """The manifest on `gpus` GPUs (1: one unsharded process), timed from the first launch to the merged results;
    the idle tails predicted for the `compared` GPUs of the comparison."""
    import torch

    manifest = write_manifest(runner.work / "manifest.parquet", rows, steps)
    shards = argparse.Namespace(batch_size=batch_size, tiny=runner.tiny)
    result = {
        "benchmark": "scale_out",
        "side": "one" if gpus == 1 else "many",
        "machine": socket.gethostname(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "rows": rows,
        "steps": steps,
        "sizes": SIZES,
        "batch_size": batch_size,
        "predicted_idle_tail": predicted_tails(manifest, compared, batch_size),
    }
    if torch.cuda.is_available():
        result["gpu_check"] = check_gpus_here()
    key = "one" if gpus == 1 else "many"
    result[key] = timed_run(manifest, runner.work / f"out-{gpus}", gpus, shards, runner.work)
    runner.write(result)


def report(runner) -> dict | None:
    """The speedup of the latest two sides in the results file of the same rows and steps, on the same GPUs
    (checked by UUID: the host name says nothing on lent machines)."""
    lines = [line for line in read_lines(runner.results) if line.get("benchmark") == "scale_out"]
    many = next((line for line in reversed(lines) if line.get("side") == "many"), None)
    if many is None:
        return None
    one = next(
        (line for line in reversed(lines)
         if line.get("side") == "one" and (line["rows"], line["steps"]) == (many["rows"], many["steps"])),
        None,
    )  # fmt: skip
    if one is None:
        return None
    gpus = [sorted(gpu["uuid"] for gpu in side.get("gpu_check", {}).get("gpus", [])) for side in (one, many)]
    if gpus[0] != gpus[1]:
        runner.progress(f"the sides ran on different GPUs ({gpus[0]} and {gpus[1]}): their times do not compare")
        return None
    return {
        "scenario": "speedup",
        "benchmark": "scale_out",
        "rows": many["rows"],
        "steps": many["steps"],
        "gpus": len(many["many"]["shards"]),
        "one_wall_seconds": one["one"]["wall_seconds"],
        "many_wall_seconds": many["many"]["wall_seconds"],
        "speedup": round(one["one"]["wall_seconds"] / many["many"]["wall_seconds"], 3),
        "gpu_check_one": one.get("gpu_check"),
        "gpu_check_many": many.get("gpu_check"),
    }


SCENARIOS = scenarios(
    Scenario("one-gpu", side, {"gpus": 1}, "26 rows of mixed sizes at 50 steps, bf16, on one GPU", 8),
    Scenario("two-gpus", side, {"gpus": 2}, "the same manifest as two shard processes and the merge", 5),
)


def entry(argv: list[str] | None = None) -> int:
    """The harness's command line, or a shard process (`shard ...`), or the GPUs' check (`check-gpus`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shard"]:
        parser = argparse.ArgumentParser(prog="python -m bench.scale_out shard")
        parser.add_argument("--manifest", required=True)
        parser.add_argument("--output", required=True)
        parser.add_argument("--shard", required=True)
        parser.add_argument("--batch-size", type=int, default=4)
        parser.add_argument("--record", required=True)
        parser.add_argument("--tiny", action="store_true")
        parser.add_argument("--launched", type=float, required=True, help="when the parent started this process")
        run_shard(parser.parse_args(argv[1:]))
        return 0
    if argv[:1] == ["check-gpus"]:
        print(json.dumps(check_gpus()))
        return 0
    return main(SCENARIOS, "bench.scale_out", __doc__, report=report, argv=argv)


if __name__ == "__main__":
    raise SystemExit(entry())
