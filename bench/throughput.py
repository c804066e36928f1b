"""How fast is text-to-image, bf16 and fp8, against the diffusers recipe in the same process?

    python -m bench.throughput --list
    python -m bench.throughput --only bf16,fp8 --json out.jsonl     # the headline ratios (docs/benchmarks.md)
    python -m bench.throughput --model tiny --only bf16             # the same code on the CPU, tiny model

1024x1024, true CFG 4, negative prompt " ", prompts of 8-60 words, seeds from 1000, on the full-size random
model (bench/full_size.py). The `versus` scenarios run the recipe (`QwenImagePipeline`, every component
resident, one `pipe()` per prompt), then the engine variants (bench/versus.py's VARIANTS), then the recipe
again, in one process (bench/versus.py says how the figures are taken). The engine-alone scenarios run
`qwen-batch run`'s stages once: GPU busy over 200 prompts, a profiled run, a compile cache cold then warm.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.full_size import EmulatedGpu, resident_pipeline
from bench.harness import Scenario, main, scenarios
from bench.measure import FULL_STEPS, RssPeak, forward_figures, host_to_gpu_gbps, image_differences
from bench.rows import prompts, write_manifest
from bench.versus import Comparison, levers


class TextToImage(Comparison):
    """Text-to-image rows: `QwenImagePipeline` against the engine; the engine may run on an emulated smaller
    card (`gpu_gib`: the process's GPU memory capped) and be planned for one (`plan_gib`)."""

    def __init__(self, runner, count: int, steps: int, size: int, gpu_gib=None, plan_gib=None):
        rows = [
            {"id": f"p{index:03d}", "prompt": text, "seed": 1000 + index} for index, text in enumerate(prompts(count))
        ]
        super().__init__(runner, rows, steps)
        self.size, self.gpu_gib, self.plan_gib = size, gpu_gib, plan_gib
        self.image_format = "png"

    def run_config(self) -> dict:
        return {"image_format": self.image_format}

    def recipe_fields(self) -> dict:
        return {"width": self.size, "height": self.size}

    def before_load(self, result: dict) -> None:
        result["host_to_gpu_gbps"] = host_to_gpu_gbps()

    def recipe_pipeline(self):
        return resident_pipeline(self.tiny)

    def after_load(self, pipe, result: dict) -> None:
        # Encoder throughput: length-sorted batches of 16, as qwen-batch's stage 1 does.
        many = prompts(64)
        many.sort(key=len)
        with torch.inference_mode():
            pipe.encode_prompt(prompt=many[:16], device=self.device)  # warm-up
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            for begin in range(0, len(many), 16):
                pipe.encode_prompt(prompt=many[begin : begin + 16], device=self.device, max_sequence_length=1024)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        result["encode_prompts_per_s"] = round(len(many) / (time.perf_counter() - started), 1)

    def recipe_call(self, pipe, row: dict, seed: int, steps: int):
        return pipe(
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=self.size,
            height=self.size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    def recipe_figures(self, result: dict, walls: list[float], timers: dict, image, spies: list) -> None:
        figures = forward_figures(timers["transformer"], skip=0)
        per_image_measured = statistics.median(walls)
        overhead = per_image_measured - figures["forward_s"] * 2 * self.steps
        result.update(figures)
        result["seconds_per_image_measured"] = round(per_image_measured, 2)
        result["seconds_per_image_at_50_steps"] = round(figures["forward_s"] * 2 * FULL_STEPS + overhead, 2)
        result["extrapolated"] = self.steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)

    def write_manifest(self, path: Path) -> Path:
        return write_manifest(path, len(self.rows), self.steps, self.size)

    def engine_fields(self) -> dict:
        return {
            "width": self.size,
            "height": self.size,
            "emulated_gpu_gib": self.gpu_gib,
            "prompts": len(self.rows),
            "planned_for_gib": self.plan_gib or self.gpu_gib,
        }

    def encode(self, plan, timings: dict[str, float], result: dict):
        """Stage 1: loads, encodes, frees the text encoder."""
        from qwen_batch.run.engine import encode_stage

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
        return encode

    def engine_figures(self, result: dict) -> dict:
        per_image = result.get("denoise", {}).get("seconds_per_image_at_50_steps")
        if per_image:
            result["seconds_per_image_at_50_steps"] = per_image
            result["extrapolated"] = self.steps != FULL_STEPS
            result["images_per_hour_at_50_steps"] = round(3600 / per_image, 1)
        return result


# --- What the scenarios run -----------------------------------------------------------------------------------


def versus(runner, variants: tuple[str, ...], prompts: int = 8, steps: int = 6, size: int = 1024) -> None:
    """The recipe, the engine's `variants`, the recipe again: bench/versus.py."""
    TextToImage(runner, prompts, steps, size).versus(variants)


def engine(
    runner,
    mode: str = "auto",
    compile: str = "off",
    batch_size: int | None = None,
    prompts: int = 4,
    steps: int = 10,
    size: int = 1024,
    gpu_gib: float | None = None,
    plan_gib: float | None = None,
    attention: str | None = None,
    trace: bool = False,
    compile_cache: str | None = None,
    cold: bool = False,
    image_format: str = "png",
) -> None:
    """The engine alone, as `qwen-batch run` drives it, labelled with the scenario's name: on an emulated card
    of `gpu_gib` GiB (planned for `plan_gib` when given), `attention` the kernel for padded batches, `trace`
    profiling the denoise stage (its idle gaps in the line, the Chrome trace in the work folder). A
    `compile_cache` folder of its own under the work root, emptied first when `cold`, measures a cold and then
    a warm start in two processes."""
    from qwen_batch.memory.planner import GPU_MEMORY_ENV

    if plan_gib or gpu_gib:
        os.environ[GPU_MEMORY_ENV] = str(plan_gib or gpu_gib)
    comparison = TextToImage(runner, prompts, steps, size, gpu_gib, plan_gib)
    comparison.image_format = image_format
    if compile_cache:
        folder = runner.root / compile_cache
        if cold:
            shutil.rmtree(folder, ignore_errors=True)
        comparison.compile_cache = str(folder)
    label = runner.scenario.name
    with levers(attention=attention):
        result = comparison.engine_result(
            label,
            mode,
            compile,
            batch_size,
            runner.work,
            gpu=EmulatedGpu(gpu_gib),
            trace=str(runner.work / "trace.json") if trace else None,
        )
    if image_format != "png" or label.startswith("busy-200"):
        result["image_files"] = image_file_figures(runner.work / "out" / "images")
    runner.write(result)


def image_file_figures(folder: Path, sample: int = 16) -> dict:
    """The run's image files: bytes per image; and `sample` of them decoded and encoded again in each format (with
    the run's metadata and marks, on one CPU core): bytes and seconds per image."""
    from PIL import Image

    from qwen_batch.outputs.images import IMAGE_FORMATS, encode_image, read_image_metadata
    from qwen_batch.outputs.marks import Mark, xmp_packet

    files = sorted(path for path in folder.iterdir() if not path.name.startswith("."))
    figures = {"files": len(files), "bytes_per_image": round(statistics.mean(path.stat().st_size for path in files))}
    for image_format in IMAGE_FORMATS:
        sizes, seconds = [], []
        for path in files[:sample]:
            data = path.read_bytes()
            metadata = read_image_metadata(data)
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            started = time.perf_counter()
            encoded = encode_image(image, image_format, metadata, xmp=xmp_packet(Mark.for_row(False, "model")))
            seconds.append(time.perf_counter() - started)
            sizes.append(len(encoded))
        figures[image_format] = {
            "bytes_per_image": round(statistics.mean(sizes)),
            "encode_s_per_image": round(statistics.mean(seconds), 4),
        }
    return figures


def recipe(runner, prompts: int = 2, steps: int = 6, size: int = 1024) -> None:
    """The recipe alone, its images kept in its work folder (for `compare`)."""
    line = TextToImage(runner, prompts, steps, size).recipe_result(runner.work / "images")
    runner.write(line)


def compare(runner, a: str, b: str) -> None:
    """The images of two scenarios run before in the same work folder, per pixel."""

    def images(name: str) -> Path:
        folder = runner.root / "scenarios" / name
        found = folder / "images" if (folder / "images").is_dir() else folder / "out" / "images"
        if not found.is_dir():
            raise FileNotFoundError(f"no images of {name} in {runner.root}: run that scenario first")
        return found

    figures = image_differences(images(a), images(b))
    runner.write({"run": "compare", "label": runner.scenario.name, "a": a, "b": b, **figures})


BF16_LEVERS = (
    "bf16-compile-before",
    "bf16-compile-nopack",
    "bf16-compile-complex-rotary",
    "bf16-compile",
    "bf16-compile-split",
    "bf16-compile-nogelu",
)
INDUCTOR_LEVERS = (
    "bf16-compile-nocdt",
    "bf16-compile",
    "bf16-compile-bucket16",
    "bf16-compile-autotune",
    "bf16-compile-aten-autotune",
)
WITHOUT_FA4 = ("bf16-compile-before", "bf16-compile-nogelu", "bf16-compile", "bf16-compile-split")
FP8_LEVERS = ("fp8-compile-b4", "fp8-compile-b8", "fp8-compile-b4-nopack", "fp8-compile-b4-all")
BUSY = {"mode": "bf16", "compile": "on", "batch_size": 4, "steps": 2}

SCENARIOS = scenarios(
    Scenario("bf16", versus, {"variants": ("bf16-compile",)}, "the default bf16 engine against the recipe", 5),
    Scenario("fp8", versus, {"variants": ("fp8-compile-b4",)}, "the default fp8 engine against the recipe", 7),
    Scenario(
        "fp8-every-linear",
        versus,
        {"variants": ("fp8-compile-b4-all",)},
        "fp8 with --fp8-every-linear against the recipe",
        7,
    ),
    Scenario("bf16-levers", versus, {"variants": BF16_LEVERS}, "each bf16 speed lever against the recipe", 14),
    Scenario("inductor-levers", versus, {"variants": INDUCTOR_LEVERS}, "Inductor's options against the recipe", 14),
    Scenario(
        "bf16-without-fa4",
        versus,
        {"variants": WITHOUT_FA4},
        "bf16 with SDPA for every batch, as on GPUs older than Hopper",
        11,
        env={"QWEN_BATCH_ATTENTION": "sdpa"},
    ),
    Scenario("fp8-levers", versus, {"variants": FP8_LEVERS}, "fp8 at batch 4 and 8, padded, every linear", 20),
    Scenario("fp8-b2", versus, {"variants": ("fp8-compile-b2",), "prompts": 2}, "fp8 at batch 2, 2 prompts", 5),
    Scenario("busy-200", engine, {**BUSY, "prompts": 200}, "GPU busy over a 200-prompt manifest at 2 steps", 4),
    Scenario(
        "busy-200-webp",
        engine,
        {**BUSY, "prompts": 200, "image_format": "webp"},
        "GPU busy over 200 prompts at 2 steps, writing WebP; bytes and encode seconds per image for each format",
        4,
    ),
    Scenario("busy-trace", engine, {**BUSY, "prompts": 12, "trace": True}, "where the GPU idles: a profiled run", 2),
    # A compile cache cold, then warm, each in its own process (the second reads what the first compiled).
    Scenario(
        "bf16-compile-cold",
        engine,
        {"mode": "bf16", "compile": "on", "batch_size": 4, "steps": 6, "compile_cache": "cache-bf16", "cold": True},
        "bf16 compiled, first start: the compile",
        3,
        process=True,
    ),
    Scenario(
        "bf16-compile-warm",
        engine,
        {"mode": "bf16", "compile": "on", "batch_size": 4, "steps": 6, "compile_cache": "cache-bf16"},
        "bf16 compiled, second start: the compile cache read back",
        2,
        process=True,
    ),
    Scenario(
        "fp8-compile-cold",
        engine,
        {"mode": "fp8", "compile": "on", "batch_size": 1, "steps": 6, "compile_cache": "cache-fp8", "cold": True},
        "fp8 compiled, first start: the compile",
        6,
        process=True,
    ),
    Scenario(
        "fp8-compile-warm-24",
        engine,
        {"compile": "on", "steps": 6, "gpu_gib": 24, "compile_cache": "cache-fp8"},
        "fp8 compiled, second start, planned by --memory-mode auto for a 24 GiB card",
        4,
        process=True,
    ),
    Scenario("recipe", recipe, {}, "the recipe alone, 2 prompts, its images kept", 2),
    # Images of scenarios run before in the same work folder (bf16-eager-48 is bench/memory_tiers.py's).
    Scenario(
        "images-bf16-eager-vs-compiled",
        compare,
        {"a": "bf16-eager-48", "b": "bf16-compile-cold"},
        "bf16 eager against compiled, per pixel",
    ),
    Scenario(
        "images-recipe-vs-bf16-eager",
        compare,
        {"a": "recipe", "b": "bf16-eager-48"},
        "the recipe against the engine in bf16, eager, per pixel",
    ),
    Scenario(
        "images-fp8-vs-bf16-eager",
        compare,
        {"a": "bf16-eager-48", "b": "fp8-compile-cold"},
        "fp8 against bf16, per pixel",
    ),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
