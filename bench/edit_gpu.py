"""Qwen-Image-Edit on one GPU, full size, random weights: the diffusers recipe vs qwen-batch's engine.

    python bench/edit_gpu.py versus --task edit --steps 6 --images 2 --variants bf16-compile,fp8-compile-b4 \\
        --compile-cache DIR --work DIR --json OUT.jsonl
    python bench/edit_gpu.py versus --task edit-plus --steps 6 --images 2 --variants bf16-compile --json OUT.jsonl
    python bench/edit_gpu.py versus --tiny --task edit --steps 2 --images 2 --variants bf16-eager   # CPU dry run

`versus` runs, in this one process on one GPU, with the same instructions, input images and seeds:
(a) the recipe: `QwenImageEditPipeline` (`--task edit`, one input image a row) or
`QwenImageEditPlusPipeline` (`--task edit-plus`, two a row), every component resident in bf16, one
`pipe(image=..., prompt=..., negative_prompt=" ", true_cfg_scale=4.0, ...)` per row (the model card's
call); (b) qwen-batch's engine variants (bench/qwen_image_gpu.py's VARIANTS: memory mode, compile, batch
size, the engine's speed levers), running its stages as `qwen-batch run` does (plan_run, encode_stage,
denoise_stage, finalize) over an edit manifest of the same rows, on the full-size random edit model
(bench/full_size.py); then (a) once more. Each run is one JSON line; each variant gets its speed as a
ratio to the recipe measured before it and to the mean of both recipe runs, and its images' differences
from the recipe's.

Per image at 50 steps (`extrapolated` when fewer steps ran): the median CUDA-event-timed transformer
forward times the forwards of 50 steps, plus the measured rest. The recipe's rest is everything else in
its `pipe()` call, the VL encoding of instruction and negative prompt with the image(s) and the VAE
encode of the inputs included. The engine's is its per-batch overhead (noise, scheduler, VAE decode, PNG
writes) shared by the batch's rows, plus its encode stage's seconds per image: stage 1 (reading the
inputs, Qwen2.5-VL over instruction and image(s), the VAE encode, cache writes) without loading and
freeing the encoder, as the recipe's figure is without its load.

Input images are synthetic (seeded gradients, shapes and noise), 1024x1024 PNGs by default. The
tokenizer is the tiny model's (a smaller vocabulary: a few more tokens per instruction than the real
one); the image tokens, which dominate the VL sequence and the DiT's, are the real count.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.full_size import FULL_SIZE_MODELS, full_size_source, resident_pipeline
from bench.qwen_image_gpu import (
    FULL_STEPS,
    VARIANTS,
    RssPeak,
    forward_figures,
    free_gpu,
    gpu_peak_gib,
    matmul_tflops,
    planned,
    timed_denoise,
    timed_recipe_rows,
    versions,
    versus,
    with_encode_stage,
)

TASKS = {"edit": 1, "edit-plus": 2}  # task -> input images per row
INSTRUCTIONS = [
    "make the sky a deep orange sunset",
    "replace the background with a sandy beach and turquoise sea under a clear sky",
    "turn it into a pencil sketch",
    "add a small red umbrella in the lower left corner and make the lighting warmer, as in late afternoon",
    "remove the text",
    "change the season to winter with fresh snow on every surface, frost on the edges and a pale grey sky",
    "make the colours more saturated and add soft film grain",
    "put the two objects side by side on a wooden table in a bright kitchen with morning light from a window",
]


def instructions(count: int) -> list[str]:
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(count)]


def write_inputs(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """`count` deterministic RGB PNGs of `size` x `size`: a colour gradient, a few discs and noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    y, x = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        rng = np.random.default_rng(seed + index)
        corners = rng.uniform(0, 255, size=(4, 3))
        pixels = (
            corners[0] * ((1 - x) * (1 - y))[..., None]
            + corners[1] * (x * (1 - y))[..., None]
            + corners[2] * ((1 - x) * y)[..., None]
            + corners[3] * (x * y)[..., None]
        )
        for _ in range(5):
            cx, cy, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            pixels[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, 8, size=pixels.shape)
        path = folder / f"input{index:03d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def edit_rows(task: str, count: int, inputs: list[Path]) -> list[dict]:
    """The rows both sides run: id, instruction, input image paths (1 or 2), seed."""
    per_row = TASKS[task]
    return [
        {
            "id": f"e{index:03d}",
            "prompt": text,
            "images": [str(path) for path in inputs[index * per_row : (index + 1) * per_row]],
            "seed": 1000 + index,
        }
        for index, text in enumerate(instructions(count))
    ]


class Timed:
    """Wall time of every call of `owner.name` (a class's function or an instance's method), the GPU
    synchronized before the clock stops; restored by `remove`."""

    def __init__(self, owner: object, name: str):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.seconds: list[float] = []
        timer = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return timer.original(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds.append(time.perf_counter() - started)

        setattr(owner, name, timed)

    def remove(self) -> None:
        if isinstance(self.owner, type):
            setattr(self.owner, self.name, self.original)
        else:
            delattr(self.owner, self.name)  # the class's method shows through again
        # Let a pipeline be freed (its GPU memory with it) once its user drops it: the owner and the
        # original bound method hold it, and a transformer with diffusers hooks is freed only by gc.
        self.owner = self.original = None

    def figures(self, prefix: str) -> dict:
        if not self.seconds:
            return {}
        return {
            f"{prefix}_calls": len(self.seconds),
            f"{prefix}_s_median": round(statistics.median(self.seconds), 4),
            f"{prefix}_s_total": round(sum(self.seconds), 3),
        }


@contextlib.contextmanager
def timing(*targets: tuple[object, str]) -> Iterator[list[Timed]]:
    timers = [Timed(owner, name) for owner, name in targets]
    try:
        yield timers
    finally:
        for timer in timers:
            timer.remove()


# --- (a) the recipe -------------------------------------------------------------------------------------


def recipe_result(args, rows: list[dict], out: Path | None) -> dict:
    from PIL import Image

    result = {"run": "recipe", "task": args.task, **versions(), "steps_run": args.steps, "images": len(rows)}
    result["input_size"] = args.size
    result["matmul_tflops"] = matmul_tflops()
    started = time.perf_counter()
    pipe = resident_pipeline(args.tiny, task=args.task)
    result["pipeline"] = type(pipe).__name__
    result["load_s"] = round(time.perf_counter() - started, 1)

    def call(row: dict, seed: int, steps: int):
        images = [Image.open(path).convert("RGB") for path in row["images"]]
        return pipe(
            image=images[0] if args.task == "edit" else images,
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    call(rows[0], 0, 2)  # warm-up: cuBLAS handles, cuDNN autotuning
    with timing((pipe, "encode_prompt"), (pipe, "_encode_vae_image")) as (encodes, vae_encodes):
        walls, timers, image = timed_recipe_rows(pipe, call, rows, args.steps, out)
    timer = timers["transformer"]
    figures = forward_figures(timer, skip=0)
    figures.pop("forward_s_per_row_at_64_text_tokens")  # normalised to 4096 image tokens: misleading here
    per_image_measured = statistics.median(walls)
    overhead = per_image_measured - figures["forward_s"] * 2 * args.steps
    result.update(figures)
    result["width"], result["height"] = image.size
    result["dit_image_tokens"] = timer.shapes[0][1] if timer.shapes else None
    # instruction (and negative prompt) with the image(s) through Qwen2.5-VL; each input image's VAE encode
    result.update(encodes.figures("encode_prompt"))
    result.update(vae_encodes.figures("vae_encode"))
    result["seconds_per_image_measured"] = round(per_image_measured, 2)
    result["overhead_per_image_s"] = round(overhead, 3)
    result["seconds_per_image_at_50_steps"] = round(figures["forward_s"] * 2 * FULL_STEPS + overhead, 2)
    result["extrapolated"] = args.steps != FULL_STEPS
    result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)
    result["peak_gpu_gib"] = gpu_peak_gib()
    timer.remove()
    pipe = None  # the engine variants that follow in this process need the GPU
    free_gpu()
    return result


# --- (b) qwen-batch's engine ----------------------------------------------------------------------------


def write_manifest(path: Path, task: str, rows: list[dict], steps: int) -> Path:
    """An edit manifest (docs/manifest.md): `image` for Edit, `images` lists for Edit-Plus; no width or
    height, so the output takes the input's size at about 1024x1024, as the pipelines do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = len(rows)
    columns = {"id": [row["id"] for row in rows], "prompt": [row["prompt"] for row in rows]}
    if task == "edit":
        columns["image"] = [row["images"][0] for row in rows]
    else:
        columns["images"] = pa.array([row["images"] for row in rows], pa.list_(pa.string()))
    columns |= {
        "negative_prompt": [" "] * count,
        "seed": pa.array([row["seed"] for row in rows], pa.int64()),
        "num_inference_steps": pa.array([steps] * count, pa.int64()),
        "true_cfg_scale": [4.0] * count,
    }
    pq.write_table(pa.table(columns), path)
    return path


def engine_result(args, rows: list[dict], inputs: Path, label: str, mode: str, compile_: str, batch_size: int):
    from qwen_batch.pipeline.conditions.edit import EditEncoder
    from qwen_batch.run.engine import (
        RunConfig,
        encode_stage,
    )

    device = "cpu" if args.tiny else "cuda"
    timings: dict[str, float] = {}
    plan_holder = {}

    def on_host(stage: str) -> bool:  # as bench/qwen_image_gpu.py: modes other than bf16 place weights themselves
        memory = plan_holder["plan"].memory
        return (memory.encoder_mode if stage == "encode" else memory.denoiser.mode) != "bf16"

    source = full_size_source(on_host=on_host, device=device, timings=timings, tiny=args.tiny, task=args.task)
    work = Path(args.work_root) / label
    work.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work / "manifest.parquet", args.task, rows, args.steps)
    config = RunConfig(
        manifest=str(manifest),
        output=str(work / "out"),
        model=source.name,
        batch_size=batch_size,
        device=device,
        memory_mode=mode,
        compile=compile_,
        compile_cache=args.compile_cache,
        cache=str(work / "cache"),
        allowed_inputs=(str(inputs),),
    )
    result = {"run": "engine", "task": args.task, "label": label, **versions(), "steps_run": args.steps}
    result.update(images=len(rows), input_size=args.size)
    plan = planned(config, result)
    if plan is None:
        return result
    plan_holder["plan"] = plan
    result["pipeline"] = plan.pipeline_class

    # Stage 1: read the inputs, encode instructions with their images and the images' latents. Loading and
    # freeing the encoder are timed apart (the recipe's per-image figure has no load either).
    rss = RssPeak()
    timings.clear()
    targets = [(EditEncoder, name) for name in ("__init__", "close", "encode_texts", "encode_latents")]
    with timing(*targets) as (load, close, texts, latents):
        encode = encode_stage(plan)
    images = len(rows)
    work_seconds = encode.seconds - sum(load.seconds) - sum(close.seconds)
    result["encode"] = {
        "texts": encode.encoded,
        "seconds_with_load_and_free": round(encode.seconds, 2),
        "load_seconds": round(sum(load.seconds), 2),
        "build_seconds": round(timings.get("build_seconds", 0.0), 2),
        "free_seconds": round(sum(close.seconds), 2),
        "seconds": round(work_seconds, 3),
        "seconds_per_image": round(work_seconds / images, 3),
        **texts.figures("vl_encode"),  # a batch of (instruction, its images) through Qwen2.5-VL
        "vl_encode_calls_s": [round(value, 3) for value in texts.seconds],
        **latents.figures("vae_encode"),  # one input image
        "peak_gpu_gib": encode.peak_gpu_gib,
        "peak_host_gib": rss.stop(),
    }

    # Stage 2: load (build + placement) then denoise, timed apart, as for text-to-image.
    result.update(timed_denoise(plan, encode, timings, args.steps))
    return with_encode_stage(result, args.steps)


# --- (a) and (b) in one process -------------------------------------------------------------------------


def run_versus(args) -> None:
    """The recipe, then engine variants, then the recipe again, in this one process on the same GPU,
    with the same rows; each variant's speed as a ratio to the recipe, and its images against the
    recipe's (and against the first variant's)."""
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-edit-versus-"))
    inputs = work / "inputs"
    rows = edit_rows(args.task, args.images, write_inputs(inputs, args.images * TASKS[args.task], args.size))

    def run_engine(label: str, mode: str, compile_: str, batch_size: int) -> dict:
        engine_args = argparse.Namespace(**vars(args), work_root=str(work))
        return engine_result(engine_args, rows, inputs, label, mode, compile_, batch_size)

    summary = {"task": args.task, "model": FULL_SIZE_MODELS[args.task], "steps_run": args.steps, "images": args.images}
    versus(
        lambda images: recipe_result(args, rows, images),
        run_engine,
        args.variants.split(","),
        work,
        args.json,
        **summary,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    versus = commands.add_parser("versus")
    versus.add_argument("--task", choices=tuple(TASKS), default="edit")
    versus.add_argument("--steps", type=int, default=6)
    versus.add_argument("--images", type=int, default=2, help="rows (output images) per run")
    versus.add_argument("--size", type=int, default=1024, help="input images are SIZE x SIZE")
    versus.add_argument("--variants", default="bf16-compile", help=", ".join(VARIANTS))
    versus.add_argument("--compile-cache", help="inductor cache folder shared between runs")
    versus.add_argument("--work", help="folder for inputs, manifests, caches and images")
    versus.add_argument("--json", help="append each result as a JSON line to this file")
    versus.add_argument("--tiny", action="store_true", help="dry run on the CPU with the tiny edit models")
    args = parser.parse_args(argv)
    {"versus": run_versus}[args.command](args)


if __name__ == "__main__":
    main()
