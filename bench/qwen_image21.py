"""How fast is Qwen-Image-2.1 (bf16, fp8, Turbo's 8 steps) against diffusers' `QwenImage21Pipeline` in the same
process, how close are its images, and which GPU memory does each mode need?

    python -m bench.qwen_image21 --list
    python -m bench.qwen_image21 --only bf16,fp8 --json out.jsonl
    python -m bench.qwen_image21 --model tiny --only bf16          # the same code on the CPU, tiny 2.1 model

1024x1024, 50 steps, CFG 1, on the full-size random transformer and VAE (bench/full_size21.py), prompts as
embeddings of 12-240 tokens. diffusers runs one image per call (as the published anchors: 7.74 s on an H200,
vLLM-Omni's best 5.93 s); the engine runs batches of 4 through `ImageGenerator21` (compiled, in the mode of the
scenario) over the same modules and the same embeddings, in the same process. Then the engine alone on a GPU
capped to the mode's tier (bf16: 24 GiB, fp8: 16 GiB) at batch 1, and Turbo's 8-step grid.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.full_size import EmulatedGpu
from bench.full_size21 import build_pipeline, full_size_source, prompt_embeddings
from bench.harness import Scenario, main, scenarios
from bench.measure import RssPeak, free_gpu, gpu_peak_gib, peak_rss_gib, reset_peak, synchronize
from qwen_batch.families.qwen_image21.tiny import TURBO_SIGMAS
from qwen_batch.memory.modes import BF16, FP8
from qwen_batch.weights.model_source import resolve_model

SEED = 1000


def versus(runner, mode: str, images: int = 4, steps: int = 50, size: int = 1024, batch: int = 4, tier_gib=None):
    """diffusers image by image, then the engine in batches, on one pipeline's modules; then the tier and Turbo."""
    from qwen_batch.families.qwen_image21.generator import ImageGenerator21
    from qwen_batch.memory.placement import Placement

    device = runner.device
    dtype = torch.float32 if runner.tiny else torch.bfloat16
    rss = RssPeak()
    pipe = build_pipeline(device, dtype, runner.tiny)
    embeddings = prompt_embeddings(images, device, dtype, hidden=pipe.transformer.config.context_in_dim)
    result = {"run": f"qwen-image-2.1 {mode}", "mode": mode, "images": images, "steps": steps, "size": size}

    # diffusers, one image per call, a 2-step call first (its kernels' first use).
    _diffusers(pipe, embeddings[0], 2, size, 0)
    walls, references = [], []
    for index, embedding in enumerate(embeddings):
        started = time.perf_counter()
        references.append(_diffusers(pipe, embedding, steps, size, SEED + index))
        walls.append(time.perf_counter() - started)
    result["diffusers_s_per_image"] = round(statistics.mean(walls), 3)
    result["diffusers_peak_gpu_gib"] = gpu_peak_gib()
    runner.progress(f"diffusers: {result['diffusers_s_per_image']} s per image")

    reset_peak()
    started = time.perf_counter()
    generator = ImageGenerator21(full_size_source(pipe), device, dtype, Placement(mode, compile=not runner.tiny))
    result["engine_placement"] = generator.memory_mode
    result["engine_load_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    _engine(generator, embeddings[:batch], 3, size, SEED)  # compiles for this batch's shapes
    result["engine_warmup_s"] = round(time.perf_counter() - started, 1)
    ours, seconds = [], 0.0
    for begin in range(0, images, batch):
        started = time.perf_counter()
        ours += _engine(generator, embeddings[begin : begin + batch], steps, size, SEED + begin)
        seconds += time.perf_counter() - started
    result["engine_s_per_image"] = round(seconds / images, 3)
    result["engine_peak_gpu_gib"] = gpu_peak_gib()
    result["speedup"] = round(result["diffusers_s_per_image"] / result["engine_s_per_image"], 3)
    result.update(_differences(ours, references))
    runner.progress(f"engine: {result['engine_s_per_image']} s per image ({result['speedup']}x)")

    # Turbo: the same modules sampled on its fixed 8-sigma grid, batches as above.
    pipe.register_to_config(sample_sigmas=TURBO_SIGMAS)
    started = time.perf_counter()
    _engine(generator, embeddings[:batch], len(TURBO_SIGMAS), size, SEED)
    turbo = (time.perf_counter() - started) / min(batch, images)
    pipe.register_to_config(sample_sigmas=None)
    result["turbo_s_per_image"] = round(turbo, 3)
    result["turbo_images_per_hour"] = round(3600 / turbo)

    if tier_gib is not None and torch.cuda.is_available():  # the mode on its card: one row a batch
        cap = EmulatedGpu(tier_gib)
        free_gpu()
        reset_peak()
        cap.apply()
        try:
            _engine(generator, embeddings[:1], 3, size, SEED)  # compiles for one row
            reset_peak()
            started = time.perf_counter()
            _engine(generator, embeddings[:1], steps, size, SEED)
            result[f"tier_{tier_gib}gib_s_per_image"] = round(time.perf_counter() - started, 3)
            result[f"tier_{tier_gib}gib_peak_gpu_gib"] = gpu_peak_gib()
        except torch.OutOfMemoryError as error:
            result[f"tier_{tier_gib}gib_error"] = str(error)[:200]
        finally:
            cap.lift()
    result["peak_rss_gib"] = rss.stop()
    runner.write(result)
    generator.close()


def _diffusers(pipe, embedding, steps: int, size: int, seed: int) -> np.ndarray:
    synchronize()
    image = pipe(
        prompt_embeds=embedding[None],
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    synchronize()
    return np.asarray(image, dtype=np.int16)


def _engine(generator, embeddings, steps: int, size: int, seed: int) -> list[np.ndarray]:
    from qwen_batch.families.qwen_image21.rows import Batch21
    from qwen_batch.manifest import Request

    requests = [
        Request(index=i, id=f"p{i}", prompt=f"p{i}", negative_prompt=" ", width=size, height=size, seed=seed + i,
                num_inference_steps=steps, true_cfg_scale=1.0)
        for i in range(len(embeddings))
    ]  # fmt: skip
    conditions = Batch21(
        prompt_slots=[torch.zeros(len(embedding), dtype=torch.bool) for embedding in embeddings],
        negative_slots=None,
        image_latents=[[] for _ in embeddings],
        image_shapes=[() for _ in embeddings],
    )
    images = generator.generate(requests, list(embeddings), None, conditions)
    return [np.asarray(image, dtype=np.int16) for image in images]  # iterating waits for the GPU


def _differences(ours: list[np.ndarray], references: list[np.ndarray]) -> dict:
    differences = [np.abs(a - b) for a, b in zip(ours, references, strict=True)]
    mse = statistics.mean(float((difference.astype(np.float64) ** 2).mean()) for difference in differences)
    return {
        "vs_diffusers_max": int(max(difference.max() for difference in differences)),
        "vs_diffusers_mean": round(statistics.mean(float(difference.mean()) for difference in differences), 3),
        "vs_diffusers_psnr_db": round(10 * np.log10(255**2 / mse), 1) if mse else None,
    }


def kernels(runner, rows: int = 4, size: int = 1024, prefix: int = 200) -> None:
    """Where a decode step's time goes: the attention kernels on its shapes, its GEMMs' rates, and the kernels of
    a few engine steps by total time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = runner.device, (torch.float32 if runner.tiny else torch.bfloat16)
    heads, head_dim = (2, 16) if runner.tiny else (32, 128)
    tokens = (size // 16) ** 2
    query = torch.randn(rows, heads, tokens, head_dim, device=device, dtype=dtype)
    key, value = (torch.randn(rows, heads, tokens + prefix, head_dim, device=device, dtype=dtype) for _ in range(2))
    flops = 4 * rows * heads * tokens * (tokens + prefix) * head_dim
    result = {"run": "qwen-image-2.1 kernels", "rows": rows, "tokens": tokens, "prefix": prefix, "attention": {}}
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend) if backend is not None else _nothing():
                seconds = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value))
            result["attention"][name] = {"ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12)}
        except RuntimeError as error:
            result["attention"][name] = str(error)[:120]
    width = heads * head_dim
    result["gemm"] = {}
    for n, k in ((width, width), (3 * width, width), (3 * width * 2, width), (width, 3 * width)):
        a = torch.randn(rows * tokens, k, device=device, dtype=dtype)
        b = torch.randn(n, k, device=device, dtype=dtype)
        seconds = _timed(lambda a=a, b=b: torch.nn.functional.linear(a, b))
        result["gemm"][f"{rows * tokens}x{k}->{n}"] = round(2 * rows * tokens * k * n / seconds / 1e12)
    if torch.cuda.is_available():
        result["profile"] = _profile(runner, rows, size)
    runner.write(result)


def step_graphs(runner, size: int = 1024, steps: int = 20) -> None:
    """Does CUDA-graph replay of the steps after the first pay? bf16 compiled, batch 1 and 4, 50-step and Turbo
    schedules, each with and without `StepGraph`, on one generator; the images of the two must be identical."""
    from qwen_batch.families.qwen_image21.generator import ImageGenerator21
    from qwen_batch.memory.placement import Placement

    dtype = torch.float32 if runner.tiny else torch.bfloat16
    pipe = build_pipeline(runner.device, dtype, runner.tiny)
    embeddings = prompt_embeddings(4, runner.device, dtype, hidden=pipe.transformer.config.context_in_dim)
    generator = ImageGenerator21(full_size_source(pipe), runner.device, dtype, Placement(BF16, compile=not runner.tiny))
    result = {"run": "qwen-image-2.1 step graphs", "size": size, "steps": steps}
    for batch in (1, 4):
        _engine(generator, embeddings[:batch], 3, size, SEED)  # compiles for this batch's shapes
        for schedule, count in (("default", steps), ("turbo", len(TURBO_SIGMAS))):
            pipe.register_to_config(sample_sigmas=TURBO_SIGMAS if schedule == "turbo" else None)
            images = {}
            for graphs in (False, True):
                generator.step_graphs = graphs and torch.cuda.is_available()
                _engine(generator, embeddings[:batch], count, size, SEED)  # the graph's own first use
                started = time.perf_counter()
                images[graphs] = _engine(generator, embeddings[:batch], count, size, SEED)
                seconds = (time.perf_counter() - started) / batch
                result[f"batch{batch}_{schedule}_{'graphs' if graphs else 'plain'}_s_per_image"] = round(seconds, 3)
            result[f"batch{batch}_{schedule}_graphs_vs_plain_max"] = int(
                max(np.abs(a - b).max() for a, b in zip(images[False], images[True], strict=True))
            )
            runner.progress(str({key: value for key, value in result.items() if key.startswith(f"batch{batch}")}))
    pipe.register_to_config(sample_sigmas=None)
    generator.step_graphs = False
    runner.write(result)
    generator.close()


def _profile(runner, rows: int, size: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from qwen_batch.families.qwen_image21.generator import ImageGenerator21
    from qwen_batch.memory.placement import Placement

    pipe = build_pipeline(runner.device, torch.bfloat16, False)
    embeddings = prompt_embeddings(rows, runner.device, torch.bfloat16)
    generator = ImageGenerator21(full_size_source(pipe), runner.device, torch.bfloat16, Placement(BF16, compile=True))
    _engine(generator, embeddings, 3, size, SEED)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        _engine(generator, embeddings, 6, size, SEED)
    events = [event for event in profiler.key_averages() if event.device_type.name == "CUDA"]
    total = sum(event.self_device_time_total for event in events)
    top = sorted(events, key=lambda event: -event.self_device_time_total)[:14]
    generator.close()
    return {
        "gpu_ms": round(total / 1e3, 1),
        "top": [[event.key[:90], round(100 * event.self_device_time_total / total, 1)] for event in top],
    }


def _timed(call, repeats: int = 10) -> float:
    call()
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize()
    return (time.perf_counter() - started) / repeats


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- From disk: the published layout, the whole CLI run, host RAM in a cgroup ----------------------------------


def checkpoint_folder(runner) -> Path:
    return runner.root / ("checkpoint-2.1-tiny" if runner.tiny else "checkpoint-2.1")


def write_checkpoint(runner) -> None:
    """The full-size random 2.1 model saved as the published one is laid out (diffusers' and transformers'
    `save_pretrained`, 5 GB shards): transformer 14.2 GB, Qwen3-VL encoder 17.5 GB, VAE; the processor and
    scheduler from the tiny model. Written once per work folder; the page cache dropped afterwards."""
    from bench.memory_tiers import drop_page_cache

    folder = checkpoint_folder(runner)
    tiny = Path(resolve_model("tiny-2.1").location)
    if not (folder / "model_index.json").exists():
        started = time.perf_counter()
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        if runner.tiny:
            shutil.copytree(tiny, staging)
        else:
            _save_full_size(staging, tiny)
        staging.rename(folder)
        sizes = {part.name: round(sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 1e9, 2)
                 for part in folder.iterdir() if part.is_dir()}  # fmt: skip
        runner.write({"run": "write", "folder": str(folder), "s": round(time.perf_counter() - started, 1), "gb": sizes})
    drop_page_cache(runner)


def _save_full_size(folder: Path, tiny: Path) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from bench.full_size import _building
    from bench.full_size21 import build_transformer, build_vae

    for part in ("processor", "scheduler"):
        shutil.copytree(tiny / part, folder / part)
    shutil.copy(tiny / "model_index.json", folder / "model_index.json")
    for name, build in (("transformer", build_transformer), ("vae", build_vae)):
        module = build("cuda", torch.bfloat16)
        module.save_pretrained(folder / name, max_shard_size="5GB", safe_serialization=True)
        del module
        free_gpu()
    # Qwen3-VL-8B-Instruct's sizes over the tiny encoder's config (its token ids are the tiny vocabulary's).
    config = Qwen3VLConfig.from_pretrained(tiny / "text_encoder")
    text = {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}  # fmt: skip
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
              "deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304}  # fmt: skip
    config.text_config.update(text)
    config.text_config.rope_parameters["mrope_section"] = [24, 20, 20]
    config.vision_config.update(vision)
    with _building("cuda", torch.bfloat16, 1):
        encoder = Qwen3VLForConditionalGeneration(config).eval()
    encoder.save_pretrained(folder / "text_encoder", max_shard_size="5GB", safe_serialization=True)
    del encoder
    free_gpu()


def from_disk(runner, mode: str, gpu_gib: float, rows: int = 4, steps: int = 20, size: int = 1024) -> None:
    """`qwen-batch run`'s stages on the checkpoint from disk, on a card capped to `gpu_gib`, inside the scenario's
    cgroup: peak RSS (VmHWM, and its anonymous and file-backed parts) and GPU memory per stage, seconds."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.memory_tiers import HostPeak, cgroup_figures
    from qwen_batch.memory.planner import GPU_MEMORY_ENV
    from qwen_batch.run.engine import RunConfig, run

    os.environ[GPU_MEMORY_ENV] = str(gpu_gib)
    EmulatedGpu(gpu_gib if torch.cuda.is_available() else None).apply()
    work = runner.work
    work.mkdir(parents=True, exist_ok=True)
    texts = [f"a photograph of object {index}, {'with many details, ' * index}studio light" for index in range(rows)]
    table = {"id": [f"p{i}" for i in range(rows)], "prompt": texts, "seed": list(range(rows)),
             "width": [size] * rows, "height": [size] * rows, "num_inference_steps": [steps] * rows}  # fmt: skip
    pq.write_table(pa.table(table), work / "m.parquet")
    host = HostPeak()
    started = time.perf_counter()
    summary = run(RunConfig(str(work / "m.parquet"), str(work / "out"), model=str(checkpoint_folder(runner)),
                            memory_mode=mode, device=runner.device))  # fmt: skip
    result = {"run": f"qwen-image-2.1 from disk {mode}", "mode": mode, "gpu_gib": gpu_gib, "rows": rows,
              "steps": steps, "size": size, "generated": summary.generated, "failed": summary.failed,
              "seconds": round(time.perf_counter() - started, 1), **host.stop(), "vm_hwm_gib": peak_rss_gib(),
              "encode_peak_gpu_gib": summary.encode.peak_gpu_gib, "denoise_peak_gpu_gib": summary.denoise.peak_gpu_gib,
              "denoise_s_per_image": round(summary.denoise.seconds / max(summary.generated, 1), 2),
              **cgroup_figures()}  # fmt: skip
    runner.write(result)


SCENARIOS = scenarios(
    Scenario(
        "bf16", versus, {"mode": BF16, "tier_gib": 24}, "bf16 against diffusers; the 24 GiB tier", 5, process=True
    ),
    Scenario(
        "fp8", versus, {"mode": FP8, "tier_gib": 16}, "fp8 against diffusers bf16; the 16 GiB tier", 6, process=True
    ),
    Scenario("kernels", kernels, {}, "a decode step's attention kernels, GEMM rates and top kernels", 2, process=True),
    Scenario("step-graphs", step_graphs, {}, "CUDA-graph replay of the cached steps, batch 1 and 4", 4, process=True),
    Scenario(
        "bf16-24g-from-disk",
        from_disk,
        {"mode": BF16, "gpu_gib": 24},
        "bf16 from disk on a 24 GiB card in 12 GiB of RAM (at 10 the planner refuses: it asks 9 and keeps headroom)",
        4,
        host_gib=12,
        prepare=write_checkpoint,
    ),
    Scenario(
        "fp8-16g-from-disk",
        from_disk,
        {"mode": FP8, "gpu_gib": 16},
        "fp8 from disk on a 16 GiB card in 10 GiB of RAM",
        4,
        host_gib=10,
        prepare=write_checkpoint,
    ),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
