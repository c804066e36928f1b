"""Scale-out benchmark: one manifest on 1 GPU, then on N GPUs as N shard processes, full-size weights.

One GPU is one unsharded process, as `qwen-batch run` is. N GPUs are N shard processes, each the
entry point the `qwen-image-batch/shard` deployment runs (the engine with `shard_index/shard_count`),
started directly and pinned to its GPU with CUDA_VISIBLE_DEVICES (no Prefect server on the GPU
machine), then the merge the fan-out flow does. Every process builds its own model (random
full-size weights, on its GPU) and encodes its own rows, as a worker does; the wall time counts all of
it, from the first launch to the merged results.parquet. Each shard records its timeline, so the
report says where a process's fixed cost goes.

    bash bench/scripts/scale_out.sh 2 26 50          # both sides in one command (about 12 minutes)
    python bench/scale_out.py --gpus 2 --rows 26 --steps 50 --only one --json one.json
    python bench/scale_out.py --json both.json combine one.json many.json

The manifest mixes sizes (512x512, 1024x1024, 1664x928, in a seeded random order), the case where a
split by row count leaves one GPU idle at the end; the report gives the measured idle tail of
qwen-batch's split and the tails other splits would have had, predicted with the same cost model.
`--tiny` runs the same code on the CPU with the tiny model (a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_STARTED = time.time()  # before the heavy imports (torch, diffusers): a shard's timeline starts here

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    index, count = (int(part) for part in args.shard.split("/"))
    plan = plan_run(
        RunConfig(
            manifest=args.manifest,
            output=args.output,
            model=FULL_SIZE_MODEL,
            batch_size=args.batch_size,
            device=device,
            memory_mode="bf16" if not args.tiny else "auto",
            compile="off",  # each process would pay its own compile: kept out of the comparison
            shard_index=index,
            shard_count=count,
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
        command = [sys.executable, __file__, "shard", "--manifest", str(manifest), "--output", str(output)]
        command += ["--shard", f"{index}/{gpus}", "--batch-size", str(args.batch_size), "--record", str(record)]
        command += ["--launched", repr(time.time())]
        command += ["--tiny"] if args.tiny else []
        processes.append(subprocess.Popen(command, env=env))
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


def combine(one_path: str, many_path: str) -> dict:
    """The two sides of a run made as two device commands on one warm machine, with their ratio."""
    one, many = (json.loads(Path(path).read_text()) for path in (one_path, many_path))
    gpus = [sorted(gpu["uuid"] for gpu in side.get("gpu_check", {}).get("gpus", [])) for side in (one, many)]
    if gpus[0] != gpus[1]:  # the host name says nothing on the lent machines: every one is "vm"
        raise SystemExit(f"the sides ran on different GPUs ({gpus[0]} and {gpus[1]}): their times do not compare")
    combined = {
        **many,
        "one": one["one"],
        "gpu_check_one": one.get("gpu_check"),
        "gpu_check_many": many.get("gpu_check"),
    }
    combined["speedup"] = round(one["one"]["wall_seconds"] / many["many"]["wall_seconds"], 3)
    return combined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    shard = commands.add_parser("shard")
    shard.add_argument("--manifest", required=True)
    shard.add_argument("--output", required=True)
    shard.add_argument("--shard", required=True)
    shard.add_argument("--batch-size", type=int, default=4)
    shard.add_argument("--record", required=True)
    shard.add_argument("--tiny", action="store_true")
    shard.add_argument("--launched", type=float, required=True, help="when the parent started this process")
    commands.add_parser("check-gpus")
    joined = commands.add_parser("combine")
    joined.add_argument("one")
    joined.add_argument("many")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU with the tiny model")
    parser.add_argument(
        "--only",
        choices=("one", "many"),
        help="run one side (a long run may not fit one device command: run each on the same warm machine)",
    )
    args = parser.parse_args(argv)
    if args.command == "shard":
        run_shard(args)
        return
    if args.command in ("check-gpus", "combine"):
        result = check_gpus() if args.command == "check-gpus" else combine(args.one, args.many)
        write_result(result, args.json)
        return

    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work / "manifest.parquet", args.rows, args.steps)
    result = {
        "benchmark": "scale_out",
        "machine": socket.gethostname(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "rows": args.rows,
        "steps": args.steps,
        "sizes": SIZES,
        "batch_size": args.batch_size,
        "predicted_idle_tail": predicted_tails(manifest, args.gpus, args.batch_size),
    }
    if torch.cuda.is_available():  # in its own process: this one holds no GPU memory while the sides run
        subprocess.run([sys.executable, __file__, "--json", str(work / "gpus.json"), "check-gpus"], check=True)
        result["gpu_check"] = json.loads((work / "gpus.json").read_text())
    if args.only in (None, "one"):
        result["one"] = timed_run(manifest, work / "out-1", 1, args, work)
    if args.only in (None, "many"):
        result["many"] = timed_run(manifest, work / f"out-{args.gpus}", args.gpus, args, work)
    if args.only is None:
        result["speedup"] = round(result["one"]["wall_seconds"] / result["many"]["wall_seconds"], 3)
    write_result(result, args.json)


def write_result(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    main()
