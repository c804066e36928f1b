"""How much GPU and host memory does each memory tier need, and how fast is it?

    python -m bench.memory_tiers --only tier-24,tier-16 --json out.jsonl          # emulated cards, model in memory
    python -m bench.memory_tiers --only fp8-24g-in-10g --json out.jsonl           # from disk, in a 10 GiB cgroup
    python -m bench.memory_tiers --model tiny --only tier-24,fp8-24g-in-10g       # the same code on the CPU

Two kinds of scenario, each in a process of its own:

- **emulated cards, the model built in memory** (`tier-*`, `bf16-eager-48`, `sequential-16`): the engine alone
  on the full-size random model (bench/throughput.py's `engine`), the process's GPU memory capped to a smaller
  card's (`set_per_process_memory_fraction`) and the planner told that card's size: what `--memory-mode auto`
  picks and whether its prediction holds (docs/memory.md; the H100 table).
- **from disk, in a cgroup of the host's RAM** (`*g-*g`, `gguf-*`, `*-disk-vs-memory`, ...): `qwen-batch run` on a
  manifest of a few 1024x1024 prompts with the model read from its files, as a user's run reads it: the
  full-size random checkpoint in the published layout (`--checkpoint`, written once: 58 GB on the device's 64
  GB disk) or its transformer as a GGUF Q4_K file of random 4-bit blocks (the `gguf` package cannot quantize K
  types; random blocks cost the same bytes and dequantization). Each runs inside a cgroup v2 memory limit
  (bench/scripts/in_cgroup.sh, swap off), so a regression is an OOM kill, not a number, with the page cache
  dropped first. A line gives, per stage, the process's peak RSS (sampled, and VmHWM), its anonymous part
  (what the process allocated) and its file part (mapped checkpoint pages), next to the planner's prediction;
  load seconds; the peak GPU; the median steady forward and seconds per image extrapolated to 50 steps.

Kept free of Prefect and S3: the GPU machine has neither.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.adapters import switching
from bench.full_size import FULL_SIZE_MODEL, EmulatedGpu, build_pipeline, build_transformer, full_size_source
from bench.harness import Scenario, environment, main, scenarios
from bench.measure import FULL_STEPS, ForwardTimer, forward_figures, free_gpu, gpu_peak_gib, reset_peak, synchronize
from bench.rows import prompts, write_manifest
from bench.throughput import engine

GiB = 2**30
GGUF_FILE = "q4k.gguf"  # the transformer as one GGUF Q4_K file, in the checkpoint's folder


@dataclass
class Tier:
    """One run's settings: the card emulated (`gpu_gib`), the host RAM the planner is told (`host_gib`), the
    model folder and transformer file, and the run's own."""

    label: str
    model: str
    device: str
    work: Path
    gpu_gib: float
    host_gib: float | None = None
    mode: str = "auto"
    batch_size: int | None = None
    steps: int = 3
    prompts: int = 2
    size: int = 1024
    compile: str = "off"
    transformer: str | None = None
    rounds: int = 2


def setup(args: Tier) -> tuple[EmulatedGpu, Path]:
    """Tell the planner the card and host, cap this process's GPU memory to the card's."""
    from qwen_batch.memory.planner import GPU_MEMORY_ENV, HOST_MEMORY_ENV

    os.environ[GPU_MEMORY_ENV] = str(args.gpu_gib)
    if args.host_gib:
        os.environ[HOST_MEMORY_ENV] = str(args.host_gib)
    gpu = EmulatedGpu(args.gpu_gib)
    gpu.apply()
    args.work.mkdir(parents=True, exist_ok=True)
    return gpu, args.work


# --- Host memory, sampled -------------------------------------------------------------------------------------


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


class HostPeak:
    """Peak RSS and its anonymous and file-backed parts over a span, sampled every 20 ms."""

    def __init__(self):
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _take(self) -> None:
        now = status()
        for key, name in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
            self.peak[key] = max(self.peak[key], now.get(name, 0))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self.thread.join()
        self._take()
        return {f"peak_{key}_gib": round(value / GiB, 2) for key, value in self.peak.items()}


def cgroup_figures() -> dict:
    """This process's cgroup v2 memory limit and peak, when it runs inside one (bench/scripts/in_cgroup.sh)."""
    try:
        path = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        peak = (folder / "memory.peak").read_text().strip() if (folder / "memory.peak").exists() else None
    except (OSError, IndexError):
        return {}
    return {
        "cgroup": str(folder),
        "cgroup_limit_gib": None if limit == "max" else round(int(limit) / GiB, 2),
        "cgroup_peak_gib_so_far": round(int(peak) / GiB, 2) if peak else None,
    }


# --- A tier: the real engine, from disk ----------------------------------------------------------------


def tier_result(args: Tier) -> dict:
    from qwen_batch.run.engine import RunConfig, encode_stage, finalize, generator_for, plan_run, release_generator

    result = {"run": "tier", "label": args.label, **environment(), "steps_run": args.steps, "prompts": args.prompts}
    result.update({"gpu_gib": args.gpu_gib, "host_gib": args.host_gib, "transformer": args.transformer})
    result.update(cgroup_figures())
    _, work = setup(args)
    manifest = write_manifest(work / "manifest.parquet", args.prompts, args.steps, args.size)
    config = RunConfig(
        manifest=str(manifest),
        output=str(work / f"out-{args.label}"),
        model=args.model,
        transformer=args.transformer,
        batch_size=args.batch_size,
        device=args.device,
        memory_mode=args.mode,
        compile=args.compile,
        cache=str(work / f"cache-{args.label}"),
    )
    started = time.perf_counter()
    host = HostPeak()
    plan = plan_run(config)
    result["plan_s"] = round(time.perf_counter() - started, 2)
    memory = plan.memory
    result["planned"] = {
        "encode_mode": memory.encoder_mode,
        "denoise_mode": memory.denoiser.mode,
        "batch_size": memory.batch_size,
        "pinned_gib": None if memory.denoiser.pinned_bytes is None else round(memory.denoiser.pinned_bytes / GiB, 2),
        "predicted": {
            stage: {"peak_gpu_gib": part.peak_gpu_gib, "host_gib": part.host_gib, "s_per_image": part.seconds_per_image}
            for stage, part in (("encode", memory.plan.encode), ("denoise", memory.plan.denoise))
        }
        if memory.plan
        else None,
    }
    reset_peak()
    encode_started = time.perf_counter()
    encode = encode_stage(plan)
    result["encode"] = {
        "seconds_with_load": round(time.perf_counter() - encode_started, 2),
        "texts": encode.encoded,
        "peak_gpu_gib": encode.peak_gpu_gib,
        **host.stop(),
    }
    host = HostPeak()
    reset_peak()
    load_started = time.perf_counter()
    generator = generator_for(plan)
    synchronize()
    result["denoise_load"] = {
        "seconds": round(time.perf_counter() - load_started, 2),
        "peak_gpu_gib": gpu_peak_gib(),
        "placed": generator.memory_mode,
        **host.stop(),
    }
    host = HostPeak()
    timer = ForwardTimer(generator.pipe.transformer)
    from qwen_batch.run.engine import denoise_stage

    error = None
    try:
        denoise = denoise_stage(plan)
    except Exception as failure:  # an out-of-memory is a result too
        error, denoise = f"{type(failure).__name__}: {failure}", None
    result["denoise"] = {"peak_gpu_gib": gpu_peak_gib(), **host.stop()}
    if denoise is not None and denoise.generated:
        finalize(plan, encode, denoise)
        figures = forward_figures(timer, skip=1)
        batches = -(-denoise.generated // memory.batch_size)
        overhead = (denoise.seconds - figures["total_forward_s"]) / batches
        forwards_per_step = round(figures["forwards"] / (args.steps * batches))
        per_batch = figures["forward_s"] * forwards_per_step * FULL_STEPS + overhead
        result.update(figures)
        result["denoise"].update(
            {
                "images": denoise.generated,
                "seconds": round(denoise.seconds, 2),
                "overhead_per_batch_s": round(overhead, 2),
                "seconds_per_image_at_50_steps": round(per_batch / (denoise.generated / batches), 2),
            }
        )
        result["seconds_per_image_at_50_steps"] = result["denoise"]["seconds_per_image_at_50_steps"]
        result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)
    if error or denoise is None or denoise.failed:
        result["error"] = error or next((r.error for r in denoise.records if r.error), "no image")
    timer.remove()
    release_generator()
    final = status()
    result["vm_hwm_gib"] = round(final["VmHWM"] / GiB, 2)
    result.update({key + "_end": value for key, value in cgroup_figures().items() if key.startswith("cgroup_peak")})
    result["peak_host_gib"] = max(result[s].get("peak_rss_gib", 0) for s in ("encode", "denoise_load", "denoise"))
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


# --- The same mode, loaded from disk and built in memory, in one process -----------------------------------


def versus_memory_result(args: Tier) -> dict:
    """Per-forward time of `--mode` with the transformer streamed from the files against today's path (the
    weights handed over in host memory and placed by `place_transformer`), same process, same GPU cap.
    `--rounds` repeats the pair in ABBA order (disk, memory, memory, disk, ...), so a drift of the GPU's
    clocks over the run weighs on both sides alike; each side reports its median forward."""
    from qwen_batch.run.engine import (
        RunConfig,
        denoise_stage,
        encode_stage,
        generator_for,
        plan_run,
        release_generator,
    )

    gpu, work = setup(args)
    manifest = write_manifest(work / "manifest.parquet", args.prompts, args.steps, args.size)
    results = {"run": "versus-memory", "label": args.label, **environment(), "mode": args.mode, "gpu_gib": args.gpu_gib}
    results["rounds"] = args.rounds
    full_size_source(gpu, on_host=lambda stage: args.mode != "bf16", device=args.device, tiny=args.device == "cpu")
    models = {"disk": args.model, "memory": FULL_SIZE_MODEL}
    order = [label for r in range(args.rounds) for label in (("disk", "memory") if r % 2 == 0 else ("memory", "disk"))]
    runs: dict[str, list[dict]] = {"disk": [], "memory": []}
    for index, label in enumerate(order):
        config = RunConfig(str(manifest), str(work / f"out-{label}-{index}"), model=models[label],
                           device=args.device, memory_mode=args.mode, compile=args.compile,
                           cache=str(work / "cache"), batch_size=args.batch_size)  # fmt: skip
        plan = plan_run(config)
        encode = encode_stage(plan)
        started = time.perf_counter()
        generator = generator_for(plan)
        synchronize()
        load = time.perf_counter() - started
        timer = ForwardTimer(generator.pipe.transformer)
        denoise = denoise_stage(plan)
        figures = forward_figures(timer, skip=1)
        timer.remove()
        runs[label].append({"load_s": round(load, 1), "forward_s": figures["forward_s"],
                            "forward_s_per_row": figures["forward_s_per_row"], "images": denoise.generated,
                            "placed": generator.memory_mode})  # fmt: skip
        release_generator()
        free_gpu()
        del encode
    for label, measured in runs.items():
        results[label] = {**measured[0], "forward_s": statistics.median(run["forward_s"] for run in measured),
                          "forward_s_each": [run["forward_s"] for run in measured]}  # fmt: skip
    results["disk_over_memory_forward"] = round(results["disk"]["forward_s"] / results["memory"]["forward_s"], 4)
    return results


# --- diffusers' own way with a GGUF file ---------------------------------------------------------------------


def diffusers_gguf_result(args: Tier) -> dict:
    """diffusers' recipe for a GGUF transformer on a small card: `from_single_file` with
    `GGUFQuantizationConfig`, the pipeline with `enable_model_cpu_offload()`, one `pipe()` per prompt."""
    from diffusers import GGUFQuantizationConfig, QwenImagePipeline, QwenImageTransformer2DModel

    setup(args)
    result = {"run": "diffusers-gguf", "label": args.label, **environment(), "gpu_gib": args.gpu_gib}
    result.update(cgroup_figures())
    host = HostPeak()
    started = time.perf_counter()
    transformer = QwenImageTransformer2DModel.from_single_file(
        args.transformer,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        config=args.model,
        subfolder="transformer",
        torch_dtype=torch.bfloat16,
    )
    pipe = QwenImagePipeline.from_pretrained(args.model, transformer=transformer, torch_dtype=torch.bfloat16)
    if args.device == "cuda":
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    result["load_s"] = round(time.perf_counter() - started, 1)
    result["load"] = host.stop()
    host = HostPeak()
    timer = ForwardTimer(pipe.transformer)
    reset_peak()
    seconds = []
    for index, prompt in enumerate(prompts(args.prompts)):
        begin = time.perf_counter()
        pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, width=args.size, height=args.size,
             num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(1000 + index))  # fmt: skip
        seconds.append(time.perf_counter() - begin)
    figures = forward_figures(timer, skip=2)
    result.update(figures)
    per_step = figures["forward_s"] * 2  # cond and uncond: two calls per step
    overhead = statistics.median(seconds[1:] or seconds) - args.steps * per_step
    result["seconds_per_image_at_50_steps"] = round(FULL_STEPS * per_step + overhead, 2)
    result["pipe_seconds"] = [round(s, 2) for s in seconds]
    result["peak_gpu_gib"] = gpu_peak_gib()
    result["generate"] = host.stop()
    result["vm_hwm_gib"] = round(status()["VmHWM"] / GiB, 2)
    return result


# --- The checkpoint on disk, and its transformer as one GGUF file ------------------------------------------------


def checkpoint_path(runner) -> Path:
    """The full-size checkpoint's folder (`--checkpoint`, default WORK/checkpoint); the tiny model's in a dry run."""
    if runner.tiny:
        from qwen_batch.weights.model_source import ensure_tiny_model

        return ensure_tiny_model()
    return Path(getattr(runner.args, "checkpoint", None) or runner.root / "checkpoint")


def gguf_path(runner) -> Path:
    return (runner.root if runner.tiny else checkpoint_path(runner)) / GGUF_FILE


def ensure_checkpoint(runner) -> Path:
    """The checkpoint, written first in a process of its own when its transformer's shards are missing (the
    GGUF file is deleted then: the device's 64 GB disk holds one of the two)."""
    folder = checkpoint_path(runner)
    if runner.tiny or (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists():
        return folder
    gguf_path(runner).unlink(missing_ok=True)
    runner.progress(f"writing the full-size checkpoint to {folder}")
    subprocess.run(runner.child_command("write-checkpoint"), check=True)
    return folder


def ensure_gguf(runner) -> Path:
    """The transformer as one GGUF Q4_K file beside the checkpoint's other parts, written in a process of its own
    when missing; the transformer's shards are deleted first to make room (a dry run: the tiny model's, Q4_0)."""
    path = gguf_path(runner)
    if path.exists():
        return path
    if runner.tiny:
        from qwen_batch.weights.model_source import ensure_tiny_model
        from qwen_batch.weights.single_file import write_model_transformer_file

        return write_model_transformer_file(ensure_tiny_model(), path, "gguf-q4_0")
    folder = ensure_checkpoint(runner) / "transformer"
    for shard in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        shard.unlink()
    subprocess.run(runner.child_command("write-gguf-q4k"), check=True)
    return path


def drop_page_cache(runner) -> None:
    """So that a tier's reads are its own cgroup's, not pages another process left."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        runner.progress("(page cache not dropped)")


def from_disk(runner) -> None:
    """A from-disk scenario's preparation: the checkpoint written, the page cache dropped."""
    ensure_checkpoint(runner)
    drop_page_cache(runner)


def from_gguf(runner) -> None:
    ensure_gguf(runner)
    drop_page_cache(runner)


def write_checkpoint(runner) -> None:
    """The full-size random pipeline built on the GPU (seconds) and saved as diffusers does (`save_pretrained`,
    5 GB shards), so that loading goes through the real files."""
    started = time.perf_counter()
    directory = checkpoint_path(runner)
    pipe = build_pipeline("cuda", torch.bfloat16)
    built = time.perf_counter() - started
    pipe.save_pretrained(directory, max_shard_size="5GB", safe_serialization=True)
    del pipe
    free_gpu()
    sizes = {
        part.name: round(sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 1e9, 2)
        for part in Path(directory).iterdir()
        if part.is_dir()
    }
    runner.write({"run": "write", "directory": str(directory), "build_s": round(built, 1),
                  "total_s": round(time.perf_counter() - started, 1), "gb": sizes})  # fmt: skip


def write_gguf(runner) -> None:
    """The transformer as a GGUF file of random Q4_K blocks (everything else F32): the size and dequantization
    cost of city96's Q4_K files."""
    started = time.perf_counter()
    path = gguf_path(runner)
    transformer = build_transformer("cuda", torch.bfloat16)
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    write_random_q4_k(transformer.state_dict(), linears, path)
    del transformer
    free_gpu()
    runner.write({"run": "write-file", "layout": "gguf-q4_k", "path": str(path), "gb": round(path.stat().st_size / 1e9, 2),
                  "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip


def write_random_q4_k(state_dict: dict, linears: set[str], path: Path) -> None:
    """A GGUF file with the blocks' linear weights as random Q4_K blocks (valid: small fp16 scales, random
    4-bit codes), everything else F32: the size and dequantization cost of city96's Q4_K files."""
    import gguf
    import numpy as np

    from qwen_batch.weights.single_file import GGUF_ARCHITECTURE, is_block_linear_weight

    kind = gguf.GGMLQuantizationType.Q4_K
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), arch=GGUF_ARCHITECTURE)
    generator = torch.Generator("cuda").manual_seed(0)
    for name, tensor in state_dict.items():
        if is_block_linear_weight(name, linears) and tensor.shape[-1] % block_size == 0:
            rows, columns = tensor.shape
            blocks = rows * columns // block_size
            raw = torch.randint(0, 256, (blocks, type_size), dtype=torch.uint8, device="cuda", generator=generator)
            scales = torch.full((blocks, 2), 0.002, dtype=torch.float16, device="cuda")  # d and dmin
            raw[:, :4] = scales.view(torch.uint8)
            data = raw.reshape(rows, columns // block_size * type_size).cpu().numpy()
            writer.add_tensor(name, data, raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(tensor.float().cpu().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- What the scenarios run -----------------------------------------------------------------------------------


def settings(runner, gguf: bool = False, **params) -> Tier:
    model = str(checkpoint_path(runner))
    transformer = str(gguf_path(runner)) if gguf else None
    return Tier(runner.scenario.name, model, runner.device, runner.work, transformer=transformer, **params)


def tier(runner, steps: int = 3, prompts: int = 2, size: int = 1024, **params) -> None:
    """`qwen-batch run` from the files on disk, stages timed apart, host memory sampled."""
    runner.write(tier_result(settings(runner, steps=steps, prompts=prompts, size=size, **params)))


def versus_memory(runner, steps: int = 3, prompts: int = 2, size: int = 1024, **params) -> None:
    """Per-forward time of a mode with the transformer streamed from the files against the weights built in
    memory and handed over in host RAM, same process, same GPU cap, in ABBA rounds."""
    runner.write(versus_memory_result(settings(runner, steps=steps, prompts=prompts, size=size, **params)))


def versus_diffusers_gguf(runner, steps: int = 3, prompts: int = 2, size: int = 1024, **params) -> None:
    """Ours (the tier) and then diffusers' own GGUF recipe, in one process, on the same capped GPU and file."""
    args = settings(runner, gguf=True, steps=steps, prompts=prompts, size=size, **params)
    runner.write(tier_result(args))
    free_gpu()
    runner.write(diffusers_gguf_result(args))


def two_sharing_a_host(runner, host_gib: float) -> None:
    """Two tiers at once in one cgroup (their parts `-a`, `-b`): memory only, since they share one GPU here."""
    a, b = (shlex.join(runner.child_command(f"{runner.scenario.name}-{half}")) for half in "ab")
    both = f"{a} & first=$!; {b}; second=$?; wait $first && exit $second"
    subprocess.run(runner.in_cgroup(host_gib, ["bash", "-c", both]), check=True)


def adapter_switching(runner, **params) -> None:
    """bench/adapters.py's switching with the model read from the checkpoint: fp8 reads originals back from it."""
    switching(runner, checkpoint=True, **params)


FP8_24 = {"gpu_gib": 24, "host_gib": 16, "prompts": 3}
TWO = {"gpu_gib": 24, "host_gib": 32, "prompts": 2}

SCENARIOS = scenarios(
    # Emulated cards, the model built in memory (the H100 table of docs/memory.md): each its own process.
    Scenario("bf16-eager-48", engine, {"mode": "bf16", "batch_size": 4, "prompts": 4, "steps": 6, "gpu_gib": 48},
             "bf16, eager, on a 48 GiB card", 3, process=True),
    Scenario("tier-24", engine, {"gpu_gib": 24, "prompts": 2, "steps": 4}, "what auto picks for 24 GiB", 3, process=True),
    Scenario("tier-24-fp8-forced", engine, {"gpu_gib": 24, "plan_gib": 25, "mode": "fp8", "batch_size": 1,
             "prompts": 2, "steps": 4}, "fp8 at batch 1 on 24 GiB, planned as 25", 3, process=True),
    Scenario("tier-16", engine, {"gpu_gib": 16, "prompts": 4, "steps": 4}, "what auto picks for 16 GiB", 4, process=True),
    Scenario("tier-12", engine, {"gpu_gib": 12, "prompts": 4, "steps": 4}, "what auto picks for 12 GiB", 4, process=True),
    Scenario("tier-8", engine, {"gpu_gib": 8, "prompts": 4, "steps": 4}, "what auto picks for 8 GiB", 5, process=True),
    Scenario("sequential-16", engine, {"gpu_gib": 16, "mode": "sequential", "batch_size": 1, "prompts": 1,
             "steps": 2}, "sequential offload on 16 GiB", 4, process=True),
    # From disk, each in a cgroup of its host's RAM (docs/memory.md, "the tiers from disk").
    Scenario("fp8-24g-in-10g", tier, FP8_24, "a 24 GiB card in fp8 within 10 GiB of RAM", 3, host_gib=10,
             prepare=from_disk),
    Scenario("fp8-24g-in-10g-compiled", tier, {**FP8_24, "compile": "on"}, "the same, compiled", 6, host_gib=10,
             prepare=from_disk),
    Scenario("bf16-80g-in-10g", tier, {"gpu_gib": 80, "host_gib": 16, "mode": "bf16", "prompts": 4},
             "an 80 GiB card in bf16 within 10 GiB of RAM", 3, host_gib=10, prepare=from_disk),
    Scenario("16g-32g", tier, {"gpu_gib": 16, "host_gib": 32, "prompts": 3}, "16 GiB card, 32 GiB of RAM", 4,
             host_gib=32, prepare=from_disk),
    Scenario("12g-32g", tier, {"gpu_gib": 12, "host_gib": 32, "prompts": 3}, "12 GiB card, 32 GiB of RAM", 4,
             host_gib=32, prepare=from_disk),
    Scenario("two-on-64g", two_sharing_a_host, {"host_gib": 64}, "two 24 GiB fp8 processes in one 64 GiB host", 4,
             prepare=from_disk),
    Scenario("two-on-64g-a", tier, TWO, "one of the two", part_of="two-on-64g"),
    Scenario("two-on-64g-b", tier, TWO, "the other", part_of="two-on-64g"),
    Scenario("fp8-disk-vs-memory", versus_memory, {"mode": "fp8", "gpu_gib": 24, "prompts": 4},
             "fp8 loaded from disk against built in memory, one process", 5, process=True, prepare=from_disk),
    Scenario("bf16-disk-vs-memory-abba", versus_memory, {"mode": "bf16", "gpu_gib": 80, "prompts": 4, "rounds": 4},
             "bf16 from disk against in memory, four ABBA rounds", 6, process=True, prepare=from_disk),
    Scenario("fp8-adapter-switching-16g", adapter_switching, {"mode": "fp8", "compile": "off", "rows": 8},
             "fp8 adapter switching, originals read back from the checkpoint, 16 GiB of RAM", 4, host_gib=16,
             prepare=from_disk),
    Scenario("gguf-16g-16g", tier, {"gguf": True, "gpu_gib": 16, "host_gib": 16, "prompts": 2},
             "a 4-bit GGUF transformer, 16 GiB card, 16 GiB of RAM", 4, host_gib=16, prepare=from_gguf),
    Scenario("gguf-8g-16g", tier, {"gguf": True, "gpu_gib": 8, "host_gib": 16, "prompts": 2},
             "the GGUF file streamed on an 8 GiB card, 16 GiB of RAM", 4, host_gib=16, prepare=from_gguf),
    Scenario("gguf-24g-vs-diffusers", versus_diffusers_gguf, {"gpu_gib": 24, "host_gib": 64, "prompts": 2},
             "the GGUF file, ours against diffusers' GGUF recipe, 24 GiB card", 6, process=True, prepare=from_gguf),
    Scenario("write-checkpoint", write_checkpoint, {}, "the full-size checkpoint, written", part_of="from-disk tiers"),
    Scenario("write-gguf-q4k", write_gguf, {}, "its transformer as a GGUF Q4_K file", part_of="gguf tiers"),
)  # fmt: skip


def options(parser) -> None:
    parser.add_argument("--checkpoint", help="the full-size checkpoint's folder, written when missing "
                        "(default WORK/checkpoint)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__, options=options))
