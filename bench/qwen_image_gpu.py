"""Qwen-Image on one GPU, full size, random weights: the common diffusers recipe vs qwen-batch's engine.

    python bench/qwen_image_gpu.py recipe --steps 10 --prompts 2 --json OUT.jsonl
    python bench/qwen_image_gpu.py engine --mode bf16 --compile on --batch-size 4 --steps 10 --json OUT.jsonl
    python bench/qwen_image_gpu.py engine --gpu-gib 16 --steps 4 --json OUT.jsonl   # an emulated 16 GiB card
    python bench/qwen_image_gpu.py compare DIR_A DIR_B                              # image differences

`recipe` runs diffusers' `QwenImagePipeline` fully resident, one `pipe()` per prompt with negative
prompt " " and true_cfg_scale 4 (the model card's call). `engine` runs qwen-batch's stages exactly as
`qwen-batch run` does (plan_run, encode_stage, denoise_stage, finalize) over a manifest of the same
prompts and seeds, on the full-size random model (bench/full_size.py), optionally with the process's
GPU memory capped to emulate a smaller card. Each appends one JSON line per run to --json.

Fewer steps than 50 may run: every transformer forward is timed with CUDA events (no host sync), and
the per-image figures at 50 steps are extrapolated from the median steady-state forward plus the
measured per-batch overhead (noise, scheduler, VAE decode, PNG writes). They are labelled so.
`--tiny` runs the same code on the CPU with the tiny model (a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.full_size import FULL_SIZE_MODEL, EmulatedGpu, build_pipeline, full_size_source
from qwen_batch.planner import GPU_MEMORY_ENV, forward_flops

FULL_STEPS = 50
_TEXT = (
    "a red fox running through a snowy birch forest under a full moon with soft blue light and long shadows "
    "an old lighthouse on a rocky coast at dawn waves crashing mist rising gulls circling a small boat "
    "a busy night market in a narrow street lanterns steam from food stalls people in raincoats reflections "
    "a watercolor painting of a quiet mountain village terraced fields a river bridge and cherry blossoms"
)
WORDS = _TEXT.split(" ")


def prompts(count: int) -> list[str]:
    """Deterministic prompts of varied length (8 to 60 words), as a real manifest has."""
    lengths = [8 + (i * 23) % 53 for i in range(count)]
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(lengths)]


class ForwardTimer:
    """Times every transformer forward with CUDA events (no host sync in the loop) and notes its shape."""

    def __init__(self, transformer: torch.nn.Module):
        self.spans: list[tuple[object, object]] = []
        self.shapes: list[tuple[int, int, int]] = []  # (rows, image tokens, text tokens)
        self.cuda = torch.cuda.is_available()
        self.handles = [
            transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            transformer.register_forward_hook(self._after),
        ]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, module, args, kwargs):
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        self.shapes.append((hidden.shape[0], hidden.shape[1], text.shape[1]))
        self._start = self._mark()

    def _after(self, module, args, output):
        self.spans.append((self._start, self._mark()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in self.spans]
        return [end - start for start, end in self.spans]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RssPeak:
    """Peak resident host memory of this process, sampled every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return round(max(self.peak, self.process.memory_info().rss) / 2**30, 1)


def gpu_peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def versions() -> dict:
    import diffusers
    import transformers

    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        pass
    return info


def matmul_tflops() -> float | None:
    """bf16 8192^3 matmul rate, median of 20 after warm-up: the ceiling the transformer is compared with."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2 * 8192**3 / statistics.median(times) / 1e12, 1)


def host_to_gpu_gbps() -> float | None:
    """Pinned host-to-GPU copy bandwidth (1 GiB, median of 5): what offload streams through."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    device = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2**30 / statistics.median(times[1:]) / 1e9, 1)


def forward_figures(timer: ForwardTimer, skip: int = 2) -> dict:
    """Median steady forward (the first `skip` forwards warm up, compile), per sample row, and TFLOP/s."""
    seconds = timer.seconds()
    steady = seconds[skip:] or seconds
    steady_shapes = timer.shapes[skip:] or timer.shapes
    median = statistics.median(steady)
    rows, image_tokens, text_tokens = steady_shapes[len(steady_shapes) // 2]
    flops = rows * forward_flops(image_tokens + text_tokens)
    return {
        "forwards": len(seconds),
        "first_forward_s": round(seconds[0], 3) if seconds else None,
        "forward_s": round(median, 4),
        "rows_per_forward": rows,
        "text_tokens": text_tokens,
        "forward_s_per_row": round(median / rows, 4),
        "forward_s_per_row_at_64_text_tokens": round(
            median / rows * forward_flops(4096 + 64) / forward_flops(image_tokens + text_tokens), 4
        ),
        "transformer_tflops": round(flops / median / 1e12, 1),
        "total_forward_s": round(sum(seconds), 2),
    }


def write(result: dict, path: str | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if path:
        with open(path, "a") as handle:
            handle.write(line + "\n")


# --- (a) the common recipe ---------------------------------------------------------------------------


def run_recipe(args) -> None:
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    result = {"run": "recipe", **versions(), "steps_run": args.steps, "width": args.size, "height": args.size}
    result["matmul_tflops"] = matmul_tflops()
    result["host_to_gpu_gbps"] = host_to_gpu_gbps()
    started = time.perf_counter()
    if args.tiny:
        from diffusers import QwenImagePipeline

        from qwen_batch.model_source import ensure_tiny_model

        pipe = QwenImagePipeline.from_pretrained(ensure_tiny_model(), dtype=dtype)
    else:
        pipe = build_pipeline(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    result["load_s"] = round(time.perf_counter() - started, 1)
    texts = prompts(args.prompts)

    # Encoder throughput: length-sorted batches of 16, as qwen-batch's stage 1 does.
    many = prompts(64)
    many.sort(key=len)
    with torch.inference_mode():
        pipe.encode_prompt(prompt=many[:16], device=device)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        for begin in range(0, len(many), 16):
            pipe.encode_prompt(prompt=many[begin : begin + 16], device=device, max_sequence_length=1024)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    result["encode_prompts_per_s"] = round(len(many) / (time.perf_counter() - started), 1)

    def call(prompt: str, seed: int, steps: int):
        return pipe(
            prompt=prompt,
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    call(texts[0], 0, 2)  # warm-up: cuBLAS handles, cuDNN autotuning
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = ForwardTimer(pipe.transformer)
    walls = []
    out = Path(args.images) if args.images else None
    for index, prompt in enumerate(texts):
        started = time.perf_counter()
        image = call(prompt, 1000 + index, args.steps)
        walls.append(time.perf_counter() - started)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"p{index:03d}.png")
    figures = forward_figures(timer, skip=0)
    per_image_measured = statistics.median(walls)
    overhead = per_image_measured - figures["forward_s"] * 2 * args.steps
    result.update(figures)
    result["seconds_per_image_measured"] = round(per_image_measured, 2)
    result["seconds_per_image_at_50_steps"] = round(figures["forward_s"] * 2 * FULL_STEPS + overhead, 2)
    result["extrapolated"] = args.steps != FULL_STEPS
    result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)
    result["peak_gpu_gib"] = gpu_peak_gib()
    write(result, args.json)


# --- (b) qwen-batch's engine --------------------------------------------------------------------------


def write_manifest(path: Path, count: int, steps: int, size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = prompts(count)
    table = pa.table(
        {
            "id": [f"p{i:03d}" for i in range(count)],
            "prompt": texts,
            "negative_prompt": [" "] * count,
            "width": pa.array([size] * count, pa.int64()),
            "height": pa.array([size] * count, pa.int64()),
            "seed": pa.array([1000 + i for i in range(count)], pa.int64()),
            "num_inference_steps": pa.array([steps] * count, pa.int64()),
            "true_cfg_scale": [4.0] * count,
        }
    )
    pq.write_table(table, path)
    return path


def run_engine(args) -> None:
    from qwen_batch.engine import (
        RunConfig,
        denoise_stage,
        encode_stage,
        finalize,
        load_generator,
        plan_run,
        release_generator,
    )

    device = "cpu" if args.tiny else "cuda"
    if args.plan_gib or args.gpu_gib:
        os.environ[GPU_MEMORY_ENV] = str(args.plan_gib or args.gpu_gib)
    gpu = EmulatedGpu(args.gpu_gib)
    timings: dict[str, float] = {}
    plan_holder = {}

    def on_host(stage: str) -> bool:
        memory = plan_holder["plan"].memory
        mode = memory.encoder_mode if stage == "encode" else memory.denoiser.mode
        return mode != "bf16"

    full_size_source(gpu, on_host=on_host, device=device, timings=timings, tiny=args.tiny)
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work / "manifest.parquet", args.prompts, args.steps, args.size)
    output = Path(args.output) if args.output else work / "out"
    config = RunConfig(
        manifest=str(manifest),
        output=str(output),
        model=FULL_SIZE_MODEL,
        batch_size=args.batch_size,
        device=device,
        memory_mode=args.mode,
        compile=args.compile,
        compile_cache=args.compile_cache,
        cache=str(work / f"cache-{args.label or 'run'}"),
    )
    result = {"run": "engine", "label": args.label, **versions(), "steps_run": args.steps}
    result.update({"width": args.size, "height": args.size, "emulated_gpu_gib": args.gpu_gib, "prompts": args.prompts})
    result["planned_for_gib"] = args.plan_gib or args.gpu_gib
    started = time.perf_counter()
    try:
        plan = plan_run(config)
    except Exception as error:  # a refusal is a result too
        result.update(error=f"{type(error).__name__}: {error}", plan_seconds=round(time.perf_counter() - started, 2))
        write(result, args.json)
        return
    plan_holder["plan"] = plan
    memory = plan.memory
    if memory.plan is not None:
        result["plan"] = {
            stage.stage: {
                "mode": stage.mode,
                "batch_size": stage.batch_size,
                "predicted_peak_gpu_gib": stage.peak_gpu_gib,
                "predicted_host_gib": stage.host_gib,
                "predicted_seconds_per_image": stage.seconds_per_image,
                "predicted_seconds_per_image_pcie4": stage.seconds_per_image_pcie4,
                "vae_tiling": stage.vae_tiling,
            }
            for stage in (memory.plan.encode, memory.plan.denoise)
        }
    result["mode"], result["compile"] = memory.denoiser.mode, memory.denoiser.compile
    result["batch_size"], result["encoder_mode"] = memory.batch_size, memory.encoder_mode

    # Stage 1: encode (loads, encodes, frees the text encoder).
    rss = RssPeak()
    timings.clear()
    encode = encode_stage(plan)
    result["encode"] = {
        "texts": encode.encoded,
        "seconds_with_load_and_free": round(encode.seconds, 2),
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
        "peak_gpu_gib": encode.peak_gpu_gib,
        "peak_host_gib": rss.stop(),
    }

    # Stage 2: load (build + placement) then denoise, timed apart.
    rss = RssPeak()
    timings.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    generator = load_generator(plan.source, plan.device, plan.dtype, memory.denoiser)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    result["denoise_load"] = {
        "seconds": round(load_seconds, 2),
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
        "placement_seconds": round(load_seconds - timings.get("build_seconds", 0.0), 2),
        "peak_gpu_gib": gpu_peak_gib(),
        "placed": generator.memory_mode,
    }
    timer = ForwardTimer(generator.pipe.transformer)
    error = None
    try:
        denoise = denoise_stage(plan)
    except Exception as failure:  # an out-of-memory is a result too
        error = f"{type(failure).__name__}: {failure}"
        denoise = None
    summary = finalize(plan, encode, denoise) if denoise else None
    result["peak_host_gib_denoise"] = rss.stop()
    if error or not denoise or denoise.failed:
        errors = [record.error for record in (denoise.records if denoise else []) if record.error]
        result["error"] = error or (errors[0] if errors else "no image generated")
    if denoise and denoise.generated:
        figures = forward_figures(timer, skip=2)
        batches = -(-denoise.generated // memory.batch_size)
        overhead = (denoise.seconds - figures["total_forward_s"]) / batches  # noise, scheduler, decode, writes
        per_image = (figures["forward_s"] * FULL_STEPS + overhead) / (denoise.generated / batches)
        result.update(figures)
        result["denoise"] = {
            "images": denoise.generated,
            "seconds": round(denoise.seconds, 2),
            "peak_gpu_gib": denoise.peak_gpu_gib,
            "overhead_per_batch_s": round(overhead, 2),
            "storage_wait_s": round(denoise.storage_wait_seconds, 2),
            # Of the wall time after the first forward (which carries compilation), the share spent
            # inside transformer forwards: the GPU's busy time, with no host sync in the loop.
            "transformer_busy_fraction": round(
                (figures["total_forward_s"] - figures["first_forward_s"])
                / max(denoise.seconds - figures["first_forward_s"], 1e-9),
                3,
            ),
        }
        result["seconds_per_image_at_50_steps"] = round(per_image, 2)
        result["extrapolated"] = args.steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / per_image, 1)
        if memory.plan is not None:
            predicted = memory.plan.denoise.peak_gpu_gib
            result["planner_holds"] = bool(
                denoise.peak_gpu_gib is not None
                and denoise.peak_gpu_gib <= predicted
                and (encode.peak_gpu_gib or 0) <= memory.plan.encode.peak_gpu_gib
            )
    result["exit_code"] = summary.exit_code if summary else None
    timer.remove()
    release_generator()
    write(result, args.json)


# --- attention backends -------------------------------------------------------------------------------


def run_attention(args) -> None:
    """One transformer forward of `rows` rows at 1024x1024 with 128 text tokens, per attention backend,
    with a padding mask (rows of different prompt lengths, as batched CFG has) and without one."""
    from diffusers.models.attention_dispatch import attention_backend

    from bench.full_size import build_transformer

    transformer = build_transformer("cuda")
    rows, text = args.rows, 128
    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(rows, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    embeds = torch.randn(rows, text, 3584, device="cuda", dtype=torch.bfloat16, generator=generator)
    padded = torch.ones(rows, text, dtype=torch.long, device="cuda")
    padded[rows // 2 :, 8:] = 0  # the unconditional half: a short negative prompt
    timestep = torch.full((rows,), 0.5, device="cuda", dtype=torch.bfloat16)
    results = {"run": "attention", **versions(), "rows": rows, "text_tokens": text, "forward_s": {}}
    for backend in ("native", "_native_cudnn", "_native_efficient", "_native_flash"):
        for name, mask in (("no mask", None), ("padding mask", padded)):
            key = f"{backend}, {name}"
            try:
                with torch.inference_mode(), attention_backend(backend):

                    def call(mask=mask):
                        return transformer(
                            hidden_states=hidden,
                            timestep=timestep,
                            encoder_hidden_states=embeds,
                            encoder_hidden_states_mask=mask,
                            img_shapes=[[(1, 64, 64)]] * rows,
                            return_dict=False,
                        )

                    call()
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(3):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        call()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) / 1000)
                results["forward_s"][key] = round(statistics.median(times) / rows, 4)
            except Exception as error:  # backends that refuse masks say so
                results["forward_s"][key] = f"{type(error).__name__}: {str(error)[:120]}"
            print(key, results["forward_s"][key], flush=True)
    write(results, args.json)


# --- image differences --------------------------------------------------------------------------------


def run_compare(args) -> None:
    from PIL import Image

    a, b = Path(args.a), Path(args.b)
    rows = {}
    for path in sorted(a.glob("*.png")):
        other = b / path.name
        if not other.exists():
            continue
        x = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(other).convert("RGB"), dtype=np.int16)
        difference = np.abs(x - y)
        rows[path.stem] = {"max": int(difference.max()), "mean": round(float(difference.mean()), 3)}
    result = {"run": "compare", "label": args.label, "a": str(a), "b": str(b), "images": rows}
    if rows:
        result["max"] = max(row["max"] for row in rows.values())
        result["mean"] = round(statistics.mean(row["mean"] for row in rows.values()), 3)
    write(result, args.json)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("recipe", "engine"):
        command = commands.add_parser(name)
        command.add_argument("--steps", type=int, default=10)
        command.add_argument("--prompts", type=int, default=4)
        command.add_argument("--size", type=int, default=1024)
        command.add_argument("--json", help="append the result as a JSON line to this file")
        command.add_argument("--tiny", action="store_true", help="dry run on the CPU with the tiny model")
    recipe = commands.choices["recipe"]
    recipe.add_argument("--images", help="save the recipe's images here (for compare)")
    engine = commands.choices["engine"]
    engine.add_argument("--mode", default="auto", help="--memory-mode")
    engine.add_argument("--compile", default="off", choices=("auto", "on", "off"))
    engine.add_argument("--compile-cache", help="inductor cache folder shared between runs")
    engine.add_argument("--batch-size", type=int)
    engine.add_argument("--gpu-gib", type=float, help="emulate a GPU of this many GiB")
    engine.add_argument("--plan-gib", type=float, help="let the planner believe the GPU has this many GiB")
    engine.add_argument("--work", help="folder for the manifest and caches")
    engine.add_argument("--output", help="output folder (default: WORK/out)")
    engine.add_argument("--label", default="")
    attention = commands.add_parser("attention")
    attention.add_argument("--rows", type=int, default=4)
    attention.add_argument("--json")
    compare = commands.add_parser("compare")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--label", default="")
    compare.add_argument("--json")
    args = parser.parse_args(argv)
    commands = {"recipe": run_recipe, "engine": run_engine, "compare": run_compare, "attention": run_attention}
    commands[args.command](args)


if __name__ == "__main__":
    main()
