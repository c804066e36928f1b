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
import contextlib
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

from bench.full_size import FULL_SIZE_MODEL, EmulatedGpu, full_size_source, resident_pipeline
from qwen_batch.memory.planner import GPU_MEMORY_ENV, forward_flops

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


class BatchTimer:
    """GPU idle time between batches, from CUDA events recorded as `ImageGenerator.generate` is entered
    and left. An event completes when the GPU reaches it: an entry event that completes later than the
    previous exit event means the GPU had run out of queued work and waited for the host. Idle inside a
    batch (a host-bound step loop) would not show here; the NVML samples (GpuUtilization) cover it."""

    def __init__(self):
        from qwen_batch.pipeline.denoise import ImageGenerator

        self.owner, self.original = ImageGenerator, ImageGenerator.generate
        self.events: list[tuple[object, object]] = []
        self.host_times: list[tuple[float, float]] = []
        timer = self

        def generate(generator, *args, **kwargs):
            entered, host_entered = timer._event(), time.time()
            images = timer.original(generator, *args, **kwargs)
            timer.events.append((entered, timer._event()))
            timer.host_times.append((host_entered, time.time()))
            return images

        ImageGenerator.generate = generate

    @staticmethod
    def _event():
        if not torch.cuda.is_available():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def remove(self) -> None:
        self.owner.generate = self.original

    def host_window(self) -> tuple[float, float]:
        """Host clock from the second batch's start to the last batch's return (the first carries warm-up)."""
        if len(self.host_times) < 2:
            return (0.0, 0.0)
        return self.host_times[1][0], self.host_times[-1][1]

    def figures(self) -> dict:
        if not self.events or self.events[0][0] is None:
            return {}
        torch.cuda.synchronize()
        gaps = [
            max(exited.elapsed_time(entered_next), 0.0) / 1000
            for (_, exited), (entered_next, _) in zip(self.events, self.events[1:], strict=False)
        ]
        spans = [entered.elapsed_time(exited) / 1000 for entered, exited in self.events]
        after_first = self.events[1][0].elapsed_time(self.events[-1][1]) / 1000 if len(self.events) > 1 else 0.0
        return {
            "batches": len(self.events),
            "first_batch_gpu_s": round(spans[0], 2),
            "gpu_seconds_from_second_batch": round(after_first, 2),
            "idle_between_batches_s": round(sum(gaps), 3),
            "max_gap_s": round(max(gaps, default=0.0), 4),
            # Busy share of the GPU's own clock from the second batch's start to the last batch's end.
            "busy_fraction_between_batches": round(1 - sum(gaps) / after_first, 4) if after_first else None,
        }


class GpuUtilization:
    """NVML's utilization.gpu (share of time a kernel ran), SM clock, power and temperature, sampled
    every 100 ms by nvidia-smi: the busy share, and whether the GPU slowed down as it warmed up."""

    QUERY = "utilization.gpu,clocks.sm,power.draw,temperature.gpu"

    def __init__(self):
        import shutil
        import subprocess

        self.samples: list[tuple[float, list[float]]] = []
        self.process = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            command = ["nvidia-smi", "-i", index, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"]
            self.process = subprocess.Popen([*command, "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), [float(part) for part in line.split(",")]))
            except ValueError:
                continue  # "[N/A]" and the like

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def figures(self, start: float, end: float) -> dict:
        window = [values for moment, values in self.samples if start <= moment <= end]
        if not window:
            return {}
        return {
            "nvml_samples": len(window),
            "nvml_utilization_mean_pct": round(statistics.mean(v[0] for v in window), 1),
            **self.clock_figures(window),
        }

    def clock_figures(self, window: list[list[float]] | None = None) -> dict:
        window = window if window is not None else [values for _, values in self.samples]
        if not window:
            return {}
        clocks = [v[1] for v in window]
        return {
            "sm_clock_mhz_median": statistics.median(clocks),
            "sm_clock_mhz_min": min(clocks),
            "power_w_median": statistics.median(v[2] for v in window),
            "temperature_c_max": max(v[3] for v in window),
        }


def free_gpu() -> None:
    import gc

    torch._dynamo.reset()  # compiled graphs hold their modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    write(recipe_result(args), args.json)


def timed_recipe_rows(pipe, call, rows: list[dict], steps: int, out: Path | None, timed=("transformer",)):
    """diffusers' pipeline over `rows` as every recipe here runs it, after the caller's warm-up call: the peak
    memory reset, then `call(row, seed, steps)` for each row with its own seed, one at a time. Returns each
    call's wall time, a forward timer for each of the pipeline's `timed` models (to `.remove()`), and the last
    image (an edit's size is the pipeline's choice); the images go to `out` as `{id}.png` when given."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timers = {name: ForwardTimer(getattr(pipe, name)) for name in timed}
    walls = []
    for row in rows:
        started = time.perf_counter()
        image = call(row, row["seed"], steps)
        walls.append(time.perf_counter() - started)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"{row['id']}.png")
    return walls, timers, image


def recipe_result(args) -> dict:
    device = "cpu" if args.tiny else "cuda"
    result = {"run": "recipe", **versions(), "steps_run": args.steps, "width": args.size, "height": args.size}
    result["matmul_tflops"] = matmul_tflops()
    result["host_to_gpu_gbps"] = host_to_gpu_gbps()
    started = time.perf_counter()
    pipe = resident_pipeline(args.tiny)
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

    def call(row: dict, seed: int, steps: int):
        return pipe(
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    rows = [{"id": f"p{index:03d}", "prompt": text, "seed": 1000 + index} for index, text in enumerate(texts)]
    call(rows[0], 0, 2)  # warm-up: cuBLAS handles, cuDNN autotuning
    walls, timers, _ = timed_recipe_rows(pipe, call, rows, args.steps, Path(args.images) if args.images else None)
    timer = timers["transformer"]
    figures = forward_figures(timer, skip=0)
    per_image_measured = statistics.median(walls)
    overhead = per_image_measured - figures["forward_s"] * 2 * args.steps
    result.update(figures)
    result["seconds_per_image_measured"] = round(per_image_measured, 2)
    result["seconds_per_image_at_50_steps"] = round(figures["forward_s"] * 2 * FULL_STEPS + overhead, 2)
    result["extrapolated"] = args.steps != FULL_STEPS
    result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)
    result["peak_gpu_gib"] = gpu_peak_gib()
    timer.remove()
    pipe = None  # the engine variants that may follow in this process need the GPU
    free_gpu()
    return result


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
    with levers(attention=args.attention):
        write(engine_result(args), args.json)


def engine_result(args) -> dict:
    from qwen_batch.run.engine import (
        RunConfig,
        encode_stage,
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
    plan = planned(config, result)
    if plan is None:
        return result
    plan_holder["plan"] = plan

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
    result.update(timed_denoise(plan, encode, timings, args.steps, trace=getattr(args, "trace", None)))
    per_image = result.get("denoise", {}).get("seconds_per_image_at_50_steps")
    if per_image:
        result["seconds_per_image_at_50_steps"] = per_image
        result["extrapolated"] = args.steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / per_image, 1)
    return result


def gpu_gaps(profiler, least_ms: float = 0.05, listed: int = 12) -> dict:
    """Where the GPU ran no kernel during a profiled stage: the time between kernels (merged over
    streams), its sum over gaps of at least `least_ms`, and the longest gaps with the kernels on
    either side, which name the host work the GPU waited for."""
    kernels = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
    )
    if not kernels:
        return {"kernels": 0}
    gaps, busy_until, before = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append(((start - busy_until) / 1000, before, name))
        if end >= busy_until:
            busy_until, before = end, name
    span_ms = (busy_until - kernels[0][0]) / 1000
    counted = [gap for gap in gaps if gap[0] >= least_ms]
    return {
        "kernels": len(kernels),
        "span_ms": round(span_ms, 1),
        "idle_ms": round(sum(gap[0] for gap in gaps), 1),
        f"idle_ms_in_gaps_of_{least_ms}_ms_or_more": round(sum(gap[0] for gap in counted), 1),
        "busy_fraction": round(1 - sum(gap[0] for gap in gaps) / max(span_ms, 1e-9), 4),
        "longest": [
            {"ms": round(ms, 2), "after": after[:80], "before": next_[:80]}
            for ms, after, next_ in sorted(counted, reverse=True)[:listed]
        ],
    }


def planned(config, result: dict):
    """`plan_run(config)` with what it decided added to `result`; None, with the error in `result`, when
    it refuses the run (a refusal is a result too)."""
    from qwen_batch.run.engine import plan_run

    started = time.perf_counter()
    try:
        plan = plan_run(config)
    except Exception as error:
        result.update(error=f"{type(error).__name__}: {error}", plan_seconds=round(time.perf_counter() - started, 2))
        return None
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
    result["encode_batch_size"] = memory.encode_batch_size
    return plan


def timed_denoise(plan, encode, timings: dict[str, float], steps: int, trace: str | None = None) -> dict:
    """Stage 2 exactly as `qwen-batch run` drives it (load, then denoise, then finalize), timed apart:
    the fields of a result line. `denoise.seconds_per_image_at_50_steps` is the denoise stage alone,
    extrapolated from `steps` (the median forward times the forwards of 50 steps, plus the measured
    per-batch rest: noise, scheduler, VAE decode, PNG writes). Frees the generator afterwards.
    `trace`: profile the denoise stage (torch.profiler), write its Chrome trace there and add where
    the GPU sat idle (`gpu_gaps`) to the result; timings are then the profiler's, not the plain run's."""
    from qwen_batch.run.engine import denoise_stage, finalize, plan_generator, release_generator

    memory = plan.memory
    rss = RssPeak()
    timings.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    generator = plan_generator(plan)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    result = {
        "denoise_load": {
            "seconds": round(load_seconds, 2),
            "build_seconds": round(timings.get("build_seconds", 0.0), 2),
            "placement_seconds": round(load_seconds - timings.get("build_seconds", 0.0), 2),
            "peak_gpu_gib": gpu_peak_gib(),
            "placed": generator.memory_mode,
        }
    }
    timer = ForwardTimer(generator.pipe.transformer)
    # A ControlNet runs once per step beside the transformer: its forwards scale with the steps too.
    control_timer = ForwardTimer(generator.controlnet) if generator.controlnet is not None else None
    batches_timer = BatchTimer()
    utilization = GpuUtilization()
    error = None
    profiler = None
    if trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.start()
    try:
        denoise = denoise_stage(plan)
    except Exception as failure:  # an out-of-memory is a result too
        error = f"{type(failure).__name__}: {failure}"
        denoise = None
    finally:
        batches_timer.remove()
        utilization.stop()
        if profiler is not None:
            profiler.stop()
            profiler.export_chrome_trace(trace)
            result["gpu_gaps"] = gpu_gaps(profiler)
    summary = finalize(plan, encode, denoise) if denoise else None
    result["peak_host_gib_denoise"] = rss.stop()
    if error or not denoise or denoise.failed:
        errors = [record.error for record in (denoise.records if denoise else []) if record.error]
        result["error"] = error or (errors[0] if errors else "no image generated")
    if denoise and denoise.generated:
        figures = forward_figures(timer, skip=2)
        batches = -(-denoise.generated // memory.batch_size)
        in_forwards = figures["total_forward_s"]
        # Two forwards per step when CFG's halves run apart (CFG_LAYOUT "split"); their median is then
        # about the mean of the two kinds, as both come equally often.
        figures["forwards_per_step"] = round(figures["forwards"] / (steps * batches))
        forwards = figures["forward_s"] * figures["forwards_per_step"] * FULL_STEPS
        if control_timer is not None and control_timer.spans:
            control = forward_figures(control_timer, skip=2)
            in_forwards += control["total_forward_s"]
            per_step = control["forwards"] / (steps * batches)
            forwards += control["forward_s"] * per_step * FULL_STEPS
            result["controlnet"] = {"forward_s": control["forward_s"], "first_forward_s": control["first_forward_s"],
                                    "forwards": control["forwards"], "forwards_per_step": round(per_step, 2)}  # fmt: skip
        overhead = (denoise.seconds - in_forwards) / batches  # noise, scheduler, decode, writes
        result.update(figures)
        result["dit_image_tokens"] = timer.shapes[0][1]
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
            "seconds_per_image_at_50_steps": round((forwards + overhead) / (denoise.generated / batches), 2),
        }
        result["gpu_busy"] = {**batches_timer.figures(), **utilization.figures(*batches_timer.host_window())}
        if memory.plan is not None:
            result["planner_holds"] = bool(
                denoise.peak_gpu_gib is not None
                and denoise.peak_gpu_gib <= memory.plan.denoise.peak_gpu_gib
                and (encode.peak_gpu_gib or 0) <= memory.plan.encode.peak_gpu_gib
            )
    result["exit_code"] = summary.exit_code if summary else None
    timer.remove()
    if control_timer is not None:
        control_timer.remove()
    release_generator()
    free_gpu()
    return result


def with_encode_stage(result: dict, steps: int) -> dict:
    """A result line's per-image figures at 50 steps as the denoise stage's plus its encode stage's work per
    image (`result["encode"]["seconds_per_image"]`, without loading and freeing the encoder): for rows whose
    stage 1 does per-image work of its own (VL-encoding edit inputs, VAE-encoding control and init images)."""
    result.pop("forward_s_per_row_at_64_text_tokens", None)  # normalised to 4096 image tokens: misleading here
    denoise_per_image = result.get("denoise", {}).get("seconds_per_image_at_50_steps")
    if denoise_per_image:
        per_image = denoise_per_image + result["encode"]["seconds_per_image"]
        result["seconds_per_image_at_50_steps"] = round(per_image, 2)  # denoise + encode stage
        result["extrapolated"] = steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / per_image, 1)
    return result


# --- (a) and (b) in one process -------------------------------------------------------------------------

# Autotuning among cuBLAS's own choices only: `addmm` as Inductor lowers it, or with the bias as
# cuBLASLt's epilogue (`bias_addmm`), which the full autotune picked for the MLP's down projection (3.05
# against 3.26 ms on an H200). No Triton GEMMs.
ATEN_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN", "coordinate_descent_tuning": True}

# Engine variants `versus` can run after the recipe: memory mode, compile, batch size, and the levers
# left at the engine's defaults unless named (see `levers`).
VARIANTS = {
    "bf16-eager": ("bf16", "off", 4, {}),
    "bf16-compile": ("bf16", "on", 4, {}),
    "bf16-compile-b8": ("bf16", "on", 8, {}),
    "bf16-compile-sdpa": ("bf16", "on", 4, {"attention": "sdpa"}),
    "bf16-compile-fa4": ("bf16", "on", 4, {"attention": "fa4"}),
    "bf16-compile-nogelu": ("bf16", "on", 4, {"gelu_epilogue": False}),
    "bf16-compile-split": ("bf16", "on", 4, {"cfg_layout": "split"}),
    # Inductor's coordinate-descent tuning of its own kernels: the default since it was measured (torchao
    # turns it on for fp8 anyway); -nocdt is the engine without it.
    "bf16-compile-cdt": ("bf16", "on", 4, {"compile_options": {"coordinate_descent_tuning": True}}),
    "bf16-compile-nocdt": ("bf16", "on", 4, {"compile_options": {}}),
    # Triton GEMM templates autotuned against cuBLAS, with elementwise epilogues fused into the winners.
    "bf16-compile-autotune": (
        "bf16",
        "on",
        4,
        {"compile_options": {"max_autotune": True, "coordinate_descent_tuning": True}},
    ),
    # cuBLAS-only autotune (ATEN_AUTOTUNE), with the packed text stream (the default since process h200-7).
    "bf16-compile-aten-autotune": ("bf16", "on", 4, {"compile_options": ATEN_AUTOTUNE}),
    "bf16-compile-bucket16": ("bf16", "on", 4, {"text_bucket": 16}),
    # The text stream padded, as before packing (qwen_batch.families.qwen_image.packed_text) became the default; -pack is the
    # default named, as measured in process h200-7.
    "bf16-compile-nopack": ("bf16", "on", 4, {"pack_text": False}),
    "bf16-compile-pack": ("bf16", "on", 4, {"pack_text": True}),
    # RoPE as diffusers' complex multiply, which Inductor leaves to eager kernels (qwen_batch/families/qwen_image/rotary.py):
    # the default until session 6 of issue 17.
    "bf16-compile-complex-rotary": ("bf16", "on", 4, {"real_rotary": False}),
    # The engine as it was before issue 17's levers: SDPA with the mask, GELU a kernel of its own.
    "bf16-compile-before": (
        "bf16",
        "on",
        4,
        {"attention": "sdpa", "gelu_epilogue": False, "cfg_layout": "joint", "compile_options": {}, "pack_text": False},
    ),
    "fp8-compile-b1": ("fp8", "on", 1, {}),
    "fp8-compile-b2": ("fp8", "on", 2, {}),
    "fp8-compile-b4": ("fp8", "on", 4, {}),
    "fp8-compile-b8": ("fp8", "on", 8, {}),
    "fp8-compile-b4-nopack": ("fp8", "on", 4, {"pack_text": False}),
    # Every block linear in fp8, the image MLP's last one too (FP8_KEPT_BF16 emptied, which is what
    # `--fp8-every-linear` does through Placement.fp8_kept_bf16): a third of the image stream's GEMM FLOPs
    # that the fp8 mode keeps in bf16 for quality by default (qwen_batch/memory/placement.py).
    "fp8-compile-b4-all": ("fp8", "on", 4, {"fp8_kept_bf16": ()}),
    "fp8-compile-b8-all": ("fp8", "on", 8, {"fp8_kept_bf16": ()}),
    "fp8-compile-b4-all-complex-rotary": ("fp8", "on", 4, {"fp8_kept_bf16": (), "real_rotary": False}),
    "fp8-compile-b4-sdpa": ("fp8", "on", 4, {"attention": "sdpa"}),
    "fp8-compile-b4-tensor": ("fp8", "on", 4, {"fp8_granularity": "tensor"}),
    "fp8-compile-b8-tensor": ("fp8", "on", 8, {"fp8_granularity": "tensor"}),
}


def run_versus(args) -> None:
    """The recipe, then engine variants, in this one process on the same GPU, same prompts and seeds;
    each variant's speed as a ratio to the recipe measured here, and its images against the recipe's
    (and against the first variant's)."""
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-versus-"))

    def run_recipe(images: Path | None) -> dict:
        return recipe_result(argparse.Namespace(**{**vars(args), "images": str(images) if images else None}))

    def run_engine(label: str, mode: str, compile_: str, batch_size: int) -> dict:
        engine_args = {**vars(args), "mode": mode, "compile": compile_, "batch_size": batch_size, "label": label}
        engine_args.update(gpu_gib=None, plan_gib=None, work=str(work / label), output=None)
        return engine_result(argparse.Namespace(**engine_args))

    versus(run_recipe, run_engine, args.variants.split(","), work, args.json)


def versus(run_recipe, run_engine, labels: list[str], work: Path, json_path: str | None, **summary) -> None:
    """The recipe, then each engine variant (`VARIANTS`), then the recipe again, in this one process:
    each variant's speed as a ratio to the recipe before it and to the mean of both recipe runs, and its
    images against the recipe's (`work/recipe`) and the first variant's (`work/LABEL/out/images`).
    `run_recipe(images folder or None)` and `run_engine(label, mode, compile, batch size)` return result
    lines; `summary` goes into the last line."""
    for label in labels:
        if label not in VARIANTS:
            raise SystemExit(f"unknown variant {label!r}: use {', '.join(VARIANTS)}")
    recipe_images = work / "recipe"
    recipe = run_recipe(recipe_images)
    recipe["label"] = "recipe"
    write(recipe, json_path)
    first_images, seconds = None, {}
    for label in labels:
        mode, compile_, batch_size, settings = VARIANTS[label]
        with levers(**settings):
            result = run_engine(label, mode, compile_, batch_size)
        if "seconds_per_image_at_50_steps" in result:
            result["vs_recipe_same_process"] = round(
                recipe["seconds_per_image_at_50_steps"] / result["seconds_per_image_at_50_steps"], 3
            )
        images = work / label / "out" / "images"
        result["vs_recipe_images"] = image_differences(recipe_images, images)
        if first_images is not None:
            result["vs_first_variant_images"] = image_differences(first_images, images)
        first_images = first_images or images
        write(result, json_path)
        seconds[label] = result.get("seconds_per_image_at_50_steps")
    # The recipe once more at the end: a GPU that slows as it warms up would otherwise flatter the
    # recipe, which ran first. Each variant's ratio is also given against the mean of both recipe runs.
    after = run_recipe(None)
    after["label"] = "recipe-after"
    write(after, json_path)
    before_and_after = [recipe["seconds_per_image_at_50_steps"], after["seconds_per_image_at_50_steps"]]
    recipe_seconds = statistics.mean(before_and_after)
    write(
        {
            "run": "versus-summary",
            **summary,
            **versions(),
            "recipe_seconds_per_image_at_50": before_and_after,
            "recipe_peak_gpu_gib": recipe.get("peak_gpu_gib"),
            "seconds_per_image_at_50": seconds,
            "vs_recipe_mean_of_both": {
                label: round(recipe_seconds / value, 3) for label, value in seconds.items() if value
            },
        },
        json_path,
    )


@contextlib.contextmanager
def levers(
    attention: str | None = None,
    gelu_epilogue: bool | None = None,
    cfg_layout: str | None = None,
    compile_options: dict | None = None,
    text_bucket: int | None = None,
    fp8_granularity: str | None = None,
    pack_text: bool | None = None,
    fp8_kept_bf16: tuple | None = None,
    real_rotary: bool | None = None,
):
    """Set the engine's speed levers for one run (None keeps its default): the attention kernel for
    padded batches (`sdpa`, `fa4`), GELU in its GEMM's epilogue, the CFG layout (`joint`, `split`),
    Inductor options for the compiled blocks, the text-length bucket, fp8 scales per `row` or `tensor`,
    the text stream packed to its real tokens (under FlashAttention-4), the block linears fp8 keeps in bf16,
    RoPE in real arithmetic (False: diffusers' complex multiply)."""
    import qwen_batch.families.qwen_image.attention as attention_module
    import qwen_batch.memory.placement as memory_modes
    import qwen_batch.pipeline.denoise as denoise_module

    settings = [
        (attention_module, "ATTENTION_KERNEL", attention),
        (memory_modes, "GELU_EPILOGUE", gelu_epilogue),
        (denoise_module, "CFG_LAYOUT", cfg_layout),
        (memory_modes, "COMPILE_OPTIONS", compile_options),
        (denoise_module, "TEXT_BUCKET", text_bucket),
        (memory_modes, "FP8_GRANULARITY", fp8_granularity),
        (denoise_module, "PACK_TEXT", pack_text),
        (memory_modes, "FP8_KEPT_BF16", fp8_kept_bf16),
        (attention_module, "REAL_ROTARY", real_rotary),
    ]
    originals = [getattr(module, name) for module, name, _ in settings]
    for module, name, value in settings:
        if value is not None:
            setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), original in zip(settings, originals, strict=True):
            setattr(module, name, original)


def image_differences(a: Path, b: Path) -> dict:
    from PIL import Image

    rows = {}
    for path in sorted(a.glob("*.png")):
        other = b / path.name
        if other.exists():
            x = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            y = np.asarray(Image.open(other).convert("RGB"), dtype=np.int16)
            rows[path.stem] = {"max": int(np.abs(x - y).max()), "mean": round(float(np.abs(x - y).mean()), 3)}
    if not rows:
        return {}
    return {
        "images": len(rows),
        "max": max(row["max"] for row in rows.values()),
        "mean": round(statistics.mean(row["mean"] for row in rows.values()), 3),
    }


# --- attention backends -------------------------------------------------------------------------------


def run_attention(args) -> None:
    """One transformer forward of `rows` rows at 1024x1024 with 128 text tokens, half of them padded
    (batched CFG's short negative prompt), per attention path. The paths take turns, round after
    round, so a GPU whose clocks drift as it warms up slows them all alike; the median per path."""
    from diffusers.models.attention_dispatch import attention_backend
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from bench.full_size import build_transformer
    from qwen_batch.families.qwen_image.attention import BatchAttention

    transformer = build_transformer("cuda")
    rows, text = args.rows, 128
    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(rows, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    embeds = torch.randn(rows, text, 3584, device="cuda", dtype=torch.bfloat16, generator=generator)
    padded = torch.ones(rows, text, dtype=torch.bool, device="cuda")
    padded[rows // 2 :, 8:] = False  # the unconditional half: a short negative prompt
    timestep = torch.full((rows,), 0.5, device="cuda", dtype=torch.bfloat16)
    stock, sdpa, fa4 = QwenDoubleStreamAttnProcessor2_0(), BatchAttention("sdpa"), BatchAttention("fa4")
    # name: (processor, backend, mask through the transformer, mask through attention_kwargs)
    paths = {
        "diffusers, no mask": (stock, None, None, None),
        "diffusers, mask (SDPA picks)": (stock, None, padded, None),
        "qwen-batch sdpa, mask via attention_kwargs": (sdpa, None, None, padded),
        "qwen-batch fa4 (each row's prefix, no mask)": (fa4, None, None, padded),
    }
    if not args.compile:  # backends are chosen at trace time: forcing them per call means eager
        paths |= {
            "diffusers, mask, _native_cudnn": (stock, "_native_cudnn", padded, None),
            "diffusers, mask, _native_efficient": (stock, "_native_efficient", padded, None),
            "diffusers, no mask, _native_flash": (stock, "_native_flash", None, None),
        }
    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True)
    clocks = GpuUtilization()

    def forward(processor, backend, mask, kwargs_mask):
        transformer.set_attn_processor(processor)
        with torch.inference_mode(), attention_backend(backend) if backend else contextlib.nullcontext():
            return transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                attention_kwargs={"text_mask": kwargs_mask} if processor is not stock else None,
                img_shapes=[[(1, 64, 64)]] * rows,
                return_dict=False,
            )

    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(args.rounds + 1):
        for name, path in paths.items():
            forward(*path)  # round 0 warms up (and compiles); later rounds: one untimed call per switch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(*path)
            end.record()
            end.synchronize()
            if round_:
                times[name].append(start.elapsed_time(end) / 1000 / rows)
    clocks.stop()
    results = {"run": "attention", **versions(), "rows": rows, "text_tokens": text, "compiled": args.compile}
    results["forward_s_per_row"] = {name: round(statistics.median(values), 4) for name, values in times.items()}
    results["per_round"] = {name: [round(value, 4) for value in values] for name, values in times.items()}
    results["gpu_clocks"] = clocks.clock_figures()
    for name, value in results["forward_s_per_row"].items():
        print(f"{name}: {value}", flush=True)
    write(results, args.json)


def run_linear(args) -> None:
    """The blocks' GEMM shapes at `rows` rows of 4,096 image tokens, per way of running them: bf16
    through Inductor (what a compiled block does with a plain Linear),
    bf16 with the bias as cuBLASLt's epilogue (`addmm` with a 1-D bias), for the MLP's expansion also
    with GELU (Inductor's separate kernel against cuBLASLt's GELU epilogue, the engine's), and torchao
    fp8 with per-row scales (the fp8 mode's) and per-tensor scales, compiled, the activation's dynamic
    quantization inside each call as in the model. Median of rounds."""
    tokens = args.rows * 4096
    results = {"run": "linear", **versions(), "tokens": tokens, "ms": {}, "tflops": {}}
    # (in, out): attention q/k/v/out projections, the MLP's 4x expansion and its way back.
    for inputs, outputs in [(3072, 3072), (3072, 12288), (12288, 3072)]:
        x = torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16)
        linear = torch.nn.Linear(inputs, outputs, device="cuda", dtype=torch.bfloat16)
        for name in _linear_ways(with_gelu=outputs > inputs):
            ms = _median_ms(_linear_way(name, linear), x, args.rounds)
            key = f"{inputs}x{outputs} {name}"
            results["ms"][key] = round(ms, 3)
            results["tflops"][key] = round(2 * tokens * inputs * outputs / ms / 1e9, 1)
            print(f"{key}: {ms:.3f} ms, {results['tflops'][key]} TFLOP/s", flush=True)
            torch._dynamo.reset()
    write(results, args.json)


def _linear_ways(with_gelu: bool) -> list[str]:
    gelu = ["bf16+GELU Inductor", "bf16+GELU epilogue"] if with_gelu else []
    return ["bf16 Inductor", "bf16 bias epilogue", *gelu, "fp8-row", "fp8-tensor"]


def _linear_way(name: str, linear: torch.nn.Linear):
    """`linear` run one of `_linear_ways`: a callable of the input."""
    weight, bias = linear.weight, linear.bias
    if name == "bf16 Inductor":
        return torch.compile(linear, fullgraph=True)
    if name == "bf16 bias epilogue":
        return lambda x: torch.addmm(bias, x, weight.t())
    if name == "bf16+GELU Inductor":
        return torch.compile(lambda x: torch.nn.functional.gelu(linear(x), approximate="tanh"), fullgraph=True)
    if name == "bf16+GELU epilogue":
        return lambda x: torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    from torchao.quantization import PerRow, PerTensor

    granularity = {"fp8-row": PerRow, "fp8-tensor": PerTensor}[name]()
    return torch.compile(_fp8_linear(linear, granularity), fullgraph=True)


def _fp8_linear(linear: torch.nn.Linear, granularity) -> torch.nn.Linear:
    """A torchao fp8 copy of `linear` (dynamic activation scales, floored, as the fp8 mode quantizes)."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    from qwen_batch.memory.placement import FP8_SCALE_FLOOR

    quantized = copy.deepcopy(linear)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, activation_value_lb=FP8_SCALE_FLOOR)
    quantize_(quantized, config)
    return quantized


def _median_ms(call, x: torch.Tensor, rounds: int) -> float:
    """Median over `rounds` of ten back-to-back calls, after one warm-up (and compile) call per round."""
    times = []
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            call(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                call(x)
            end.record()
            end.synchronize()
            if round_:
                times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


# --- image differences --------------------------------------------------------------------------------


def run_compare(args) -> None:
    result = {"run": "compare", "label": args.label, "a": args.a, "b": args.b}
    result.update(image_differences(Path(args.a), Path(args.b)))
    write(result, args.json)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("recipe", "engine", "versus"):
        command = commands.add_parser(name)
        command.add_argument("--steps", type=int, default=10)
        command.add_argument("--prompts", type=int, default=4)
        command.add_argument("--size", type=int, default=1024)
        command.add_argument("--json", help="append the result as a JSON line to this file")
        command.add_argument("--tiny", action="store_true", help="dry run on the CPU with the tiny model")
    recipe = commands.choices["recipe"]
    recipe.add_argument("--images", help="save the recipe's images here (for compare)")
    versus = commands.choices["versus"]
    versus.add_argument("--variants", default="bf16-compile-before,bf16-compile", help=", ".join(VARIANTS))
    versus.add_argument("--compile-cache", help="inductor cache folder shared between runs")
    versus.add_argument("--work", help="folder for manifests, caches and images")
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
    engine.add_argument("--attention", choices=("sdpa", "fa4"), help="kernel for padded batches")
    engine.add_argument("--trace", help="profile the denoise stage: Chrome trace here, GPU idle gaps in the result")
    attention = commands.add_parser("attention")
    attention.add_argument("--rows", type=int, default=4)
    attention.add_argument("--rounds", type=int, default=4)
    attention.add_argument("--compile", action="store_true", help="regional compile first (fewer paths)")
    attention.add_argument("--json")
    linear = commands.add_parser("linear")
    linear.add_argument("--rows", type=int, default=8)
    linear.add_argument("--rounds", type=int, default=5)
    linear.add_argument("--json")
    compare = commands.add_parser("compare")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--label", default="")
    compare.add_argument("--json")
    args = parser.parse_args(argv)
    commands = {
        "recipe": run_recipe,
        "engine": run_engine,
        "versus": run_versus,
        "compare": run_compare,
        "attention": run_attention,
        "linear": run_linear,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
