"""Host RAM and speed of the memory tiers, full size, the model read from disk (issue 26).

    python bench/host_memory.py write DIR                      # full-size random Qwen-Image, published layout
    python bench/host_memory.py write-file DIR OUT --layout fp8|gguf-q4_k   # its transformer as one file
    python bench/host_memory.py tier --model DIR [--transformer FILE] --gpu-gib 24 --host-gib 10 --json OUT.jsonl
    python bench/host_memory.py versus-memory --model DIR --mode fp8 --gpu-gib 24   # disk-loaded vs built in memory
    python bench/host_memory.py diffusers-gguf --model DIR --transformer FILE --gpu-gib 24   # diffusers' own way

`tier` is `qwen-batch run` on a manifest of a few 1024x1024 prompts (stages timed apart, as
bench/qwen_image_gpu.py does): the GPU capped to emulate a smaller card (`set_per_process_memory_fraction`)
and the planner told the host's RAM; bench/scripts/in_cgroup.sh runs each tier inside a cgroup v2 memory
limit of that RAM, so a regression is an OOM kill, not a number. It reports, per stage, the process's
peak RSS (sampled, and VmHWM), its anonymous part (what the process allocated) and its file part
(mapped checkpoint pages), next to the planner's prediction; load seconds; the peak GPU; the median
steady forward and seconds per image extrapolated to 50 steps.

`write` builds the random weights on the GPU (seconds) and saves them as diffusers does
(`save_pretrained`, 5 GB shards), so loading goes through the real files. `write-file` writes the
transformer as ComfyUI's fp8 e4m3fn single file, or as a GGUF Q4_K file of random 4-bit blocks (the
`gguf` package cannot quantize K types; random blocks cost the same bytes and dequantization, and speed
and memory are what is measured here). Kept free of Prefect and S3: the GPU machine has neither.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.full_size import EmulatedGpu, build_pipeline, build_transformer, full_size_source
from bench.qwen_image_gpu import (
    FULL_STEPS,
    ForwardTimer,
    forward_figures,
    free_gpu,
    gpu_peak_gib,
    versions,
    write,
    write_manifest,
)
from qwen_batch.memory.planner import GPU_MEMORY_ENV, HOST_MEMORY_ENV

GiB = 2**30


# --- Host memory, sampled -----------------------------------------------------------------------------


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


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- Writing checkpoints -------------------------------------------------------------------------------


def run_write(args) -> None:
    started = time.perf_counter()
    components = {name: None for name in ("text_encoder", "vae") if name in args.skip}
    pipe = build_pipeline("cuda", torch.bfloat16, **components)
    built = time.perf_counter() - started
    pipe.save_pretrained(args.directory, max_shard_size="5GB", safe_serialization=True)
    del pipe
    free_gpu()
    sizes = {
        part.name: round(sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 1e9, 2)
        for part in Path(args.directory).iterdir()
        if part.is_dir()
    }
    write({"run": "write", "directory": args.directory, "build_s": round(built, 1),
           "total_s": round(time.perf_counter() - started, 1), "gb": sizes}, args.json)  # fmt: skip


def run_write_file(args) -> None:
    from qwen_batch.weights.single_file import write_transformer_file

    started = time.perf_counter()
    path = Path(args.output)
    transformer = build_transformer("cuda", torch.bfloat16)
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    if args.layout == "gguf-q4_k":
        write_random_q4_k(transformer.state_dict(), linears, path)
    else:
        write_transformer_file(transformer.state_dict(), linears, path, args.layout)
    del transformer
    free_gpu()
    write({"run": "write-file", "layout": args.layout, "path": str(path), "gb": round(path.stat().st_size / 1e9, 2),
           "seconds": round(time.perf_counter() - started, 1)}, args.json)  # fmt: skip


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


# --- A tier: the real engine, from disk ---------------------------------------------------------------


def run_tier(args) -> None:
    write(tier_result(args), args.json)


def _setup(args) -> tuple[EmulatedGpu, Path]:
    os.environ[GPU_MEMORY_ENV] = str(args.gpu_gib)
    if args.host_gib:
        os.environ[HOST_MEMORY_ENV] = str(args.host_gib)
    gpu = EmulatedGpu(args.gpu_gib)
    gpu.apply()
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-tier-"))
    work.mkdir(parents=True, exist_ok=True)
    return gpu, work


def tier_result(args) -> dict:
    from qwen_batch.run.engine import RunConfig, encode_stage, finalize, plan_generator, plan_run, release_generator

    result = {"run": "tier", "label": args.label, **versions(), "steps_run": args.steps, "prompts": args.prompts}
    result.update({"gpu_gib": args.gpu_gib, "host_gib": args.host_gib, "transformer": args.transformer})
    result.update(cgroup_figures())
    _, work = _setup(args)
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
    generator = plan_generator(plan)
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


# --- The same mode, loaded from disk and built in memory, in one process -------------------------------


def run_versus_memory(args) -> None:
    """Per-forward time of `--mode` with the transformer streamed from the files against today's path (the
    weights handed over in host memory and placed by `place_transformer`), same process, same GPU cap.
    `--rounds` repeats the pair in ABBA order (disk, memory, memory, disk, ...), so a drift of the GPU's
    clocks over the run weighs on both sides alike; each side reports its median forward."""
    from qwen_batch.run.engine import (
        RunConfig,
        denoise_stage,
        encode_stage,
        plan_generator,
        plan_run,
        release_generator,
    )

    gpu, work = _setup(args)
    manifest = write_manifest(work / "manifest.parquet", args.prompts, args.steps, args.size)
    results = {"run": "versus-memory", "label": args.label, **versions(), "mode": args.mode, "gpu_gib": args.gpu_gib}
    results["rounds"] = args.rounds
    full_size_source(gpu, on_host=lambda stage: args.mode != "bf16", device=args.device, tiny=args.device == "cpu")
    models = {"disk": args.model, "memory": "full-size-random"}
    order = [label for r in range(args.rounds) for label in (("disk", "memory") if r % 2 == 0 else ("memory", "disk"))]
    runs: dict[str, list[dict]] = {"disk": [], "memory": []}
    for index, label in enumerate(order):
        config = RunConfig(str(manifest), str(work / f"out-{label}-{index}"), model=models[label],
                           device=args.device, memory_mode=args.mode, compile=args.compile,
                           cache=str(work / "cache"), batch_size=args.batch_size)  # fmt: skip
        plan = plan_run(config)
        encode = encode_stage(plan)
        started = time.perf_counter()
        generator = plan_generator(plan)
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
    write(results, args.json)


# --- diffusers' own way with a GGUF file ----------------------------------------------------------------


def run_diffusers_gguf(args) -> None:
    """diffusers' recipe for a GGUF transformer on a small card: `from_single_file` with
    `GGUFQuantizationConfig`, the pipeline with `enable_model_cpu_offload()`, one `pipe()` per prompt."""
    from diffusers import GGUFQuantizationConfig, QwenImagePipeline, QwenImageTransformer2DModel

    from bench.qwen_image_gpu import prompts

    _setup(args)
    result = {"run": "diffusers-gguf", "label": args.label, **versions(), "gpu_gib": args.gpu_gib}
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
    write(result, args.json)


def run_versus_diffusers_gguf(args) -> None:
    """Ours (the tier) and then diffusers' recipe, in one process, on the same capped GPU and the same file."""
    run_tier(args)
    free_gpu()
    run_diffusers_gguf(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    written = commands.add_parser("write")
    written.add_argument("directory")
    written.add_argument("--skip", nargs="*", default=[], choices=("text_encoder", "vae"))
    written.add_argument("--json")
    file = commands.add_parser("write-file")
    file.add_argument("output")
    file.add_argument("--layout", choices=("fp8", "bf16", "gguf-q4_k"), required=True)
    file.add_argument("--json")
    for name in ("tier", "versus-memory", "diffusers-gguf", "versus-diffusers-gguf"):
        command = commands.add_parser(name)
        command.add_argument("--model", required=True)
        command.add_argument("--transformer")
        command.add_argument("--gpu-gib", type=float, required=True)
        command.add_argument("--host-gib", type=float)
        command.add_argument("--mode", default="auto")
        command.add_argument("--batch-size", type=int)
        command.add_argument("--steps", type=int, default=3)
        command.add_argument("--prompts", type=int, default=2)
        command.add_argument("--size", type=int, default=1024)
        command.add_argument("--compile", default="off")
        command.add_argument("--label", default="")
        command.add_argument("--rounds", type=int, default=2, help="versus-memory: pairs of runs, ABBA order")
        command.add_argument("--device", default="cuda", help="cpu: a dry run with the tiny model")
        command.add_argument("--work")
        command.add_argument("--json")
    args = parser.parse_args(argv)
    {
        "write": run_write,
        "write-file": run_write_file,
        "tier": run_tier,
        "versus-memory": run_versus_memory,
        "diffusers-gguf": run_diffusers_gguf,
        "versus-diffusers-gguf": run_versus_diffusers_gguf,
    }[args.command](args)


if __name__ == "__main__":
    main()
