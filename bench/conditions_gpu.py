"""ControlNet and inpainting rows on one GPU, full size, random weights: diffusers' pipelines vs qwen-batch.

    python bench/conditions_gpu.py versus --task controlnet --steps 10 --images 4 \\
        --variants bf16-compile,fp8-compile-b4 --compile-cache DIR --work DIR --json OUT.jsonl
    python bench/conditions_gpu.py versus --task inpaint --steps 10 --images 4 --variants bf16-compile --json OUT.jsonl
    python bench/conditions_gpu.py versus --tiny --task controlnet --steps 2 --images 2 --variants bf16-eager  # CPU

`versus` runs, in this one process on one GPU, with the same prompts, input images and seeds, at 1024x1024
with negative prompt " " and true CFG 4:
(a) the recipe: `QwenImageControlNetPipeline` with a full-size Union ControlNet (5 blocks, random weights,
`bench/full_size.py`'s `build_controlnet`, saved once and loaded back with `from_pretrained`), one control
image a row at scale 1 (`--task controlnet`); or `QwenImageInpaintPipeline` with an init image and a mask
(`--task inpaint`, `--strength`, 1.0 by default: every step runs, the unmasked area reset after each); every
component resident in bf16, one `pipe()` per row, the model card's call;
(b) qwen-batch's engine variants (bench/qwen_image_gpu.py's VARIANTS) running its stages as `qwen-batch run`
does over a manifest of the same rows (`control_image`, or `init_image` + `mask_image` + `strength`), the
ControlNet given as `--controlnet FOLDER` (the same files); then (a) once more. Each run is one JSON line;
each variant gets its speed as a ratio to the recipe before it and to the mean of both recipe runs, and its
images' differences from the recipe's.

Per image at 50 steps (`extrapolated` when fewer steps ran): the median CUDA-event-timed forwards (the
transformer's two per step, the ControlNet's one) times the forwards of 50 steps, plus the measured rest. The
recipe's rest is everything else in its `pipe()` call: text encoding, the VAE encode of its control or init
image and mask, the scheduler, the decode. The engine's is its per-batch rest (noise, scheduler, the inpainting
blend, decode, PNG writes) shared by the batch's rows, plus its encode stage's seconds per image without
loading and freeing the encoder and the VAE: the texts through Qwen2.5-VL and the images' VAE encodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.edit_gpu import timing, write_inputs
from bench.full_size import FULL_SIZE_MODEL, build_controlnet, full_size_source, resident_pipeline
from bench.qwen_image_gpu import (
    FULL_STEPS,
    VARIANTS,
    RssPeak,
    forward_figures,
    free_gpu,
    gpu_peak_gib,
    matmul_tflops,
    planned,
    prompts,
    timed_denoise,
    timed_recipe_rows,
    versions,
    versus,
    with_encode_stage,
)

TASKS = ("controlnet", "inpaint")


def write_masks(folder: Path, count: int, size: int) -> list[Path]:
    """`count` masks (white repaints): a centred box of a different size for each row."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        mask = Image.new("L", (size, size), 0)
        margin = size // 8 + (index * size // 32) % (size // 4)
        ImageDraw.Draw(mask).rectangle((margin, margin, size - margin, size - margin), fill=255)
        path = folder / f"mask{index:03d}.png"
        mask.save(path)
        paths.append(path)
    return paths


def condition_rows(args, inputs: Path) -> list[dict]:
    """The rows both sides run: id, prompt, seed, and the control image or the init image and its mask."""
    images = write_inputs(inputs, args.images, args.size)
    masks = write_masks(inputs / "masks", args.images, args.size) if args.task == "inpaint" else [None] * args.images
    return [
        {"id": f"c{index:03d}", "prompt": text, "seed": 1000 + index, "image": str(image), "mask": mask and str(mask)}
        for index, (text, image, mask) in enumerate(zip(prompts(args.images), images, masks, strict=True))
    ]


def ensure_controlnet(args, work: Path) -> Path:
    """The ControlNet's folder, both sides load it: the tiny one for a dry run, else a full-size random one
    built on the GPU and saved once (3.5 GB in bf16)."""
    if args.tiny:
        from qwen_batch.tiny.controlnet import ensure_tiny_controlnet

        return ensure_tiny_controlnet("union")
    folder = work / "controlnet"
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        controlnet = build_controlnet()
        controlnet.save_pretrained(folder)
        del controlnet
        free_gpu()
        print(f"full-size ControlNet written to {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


# --- (a) the recipe -------------------------------------------------------------------------------------


def recipe_pipeline(args, controlnet_folder: Path | None):
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImageInpaintPipeline

    base = resident_pipeline(args.tiny)
    components = {
        name: getattr(base, name) for name in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    }
    if args.task == "inpaint":
        pipe = QwenImageInpaintPipeline(**components)
    else:
        dtype, device = (torch.float32, "cpu") if args.tiny else (torch.bfloat16, "cuda")
        controlnet = QwenImageControlNetModel.from_pretrained(str(controlnet_folder), torch_dtype=dtype).to(device)
        pipe = QwenImageControlNetPipeline(**components, controlnet=controlnet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recipe_result(args, rows: list[dict], controlnet_folder: Path | None, out: Path | None) -> dict:
    from PIL import Image

    result = {"run": "recipe", "task": args.task, **versions(), "steps_run": args.steps, "images": len(rows)}
    result.update(width=args.size, height=args.size, strength=args.strength if args.task == "inpaint" else None)
    result["matmul_tflops"] = matmul_tflops()
    started = time.perf_counter()
    pipe = recipe_pipeline(args, controlnet_folder)
    result["pipeline"] = type(pipe).__name__
    result["load_s"] = round(time.perf_counter() - started, 1)

    def call(row: dict, seed: int, steps: int):
        image = Image.open(row["image"]).convert("RGB")
        if args.task == "inpaint":
            task = {"image": image, "mask_image": Image.open(row["mask"]), "strength": args.strength}
        else:
            task = {"control_image": image, "controlnet_conditioning_scale": 1.0}
        return pipe(
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
            **task,
        ).images[0]

    call(rows[0], 0, 2)  # warm-up: cuBLAS handles, cuDNN autotuning
    timed = ("transformer", "controlnet") if args.task == "controlnet" else ("transformer",)
    walls, timers, _ = timed_recipe_rows(pipe, call, rows, args.steps, out, timed)
    timer, control_timer = timers["transformer"], timers.get("controlnet")
    figures = forward_figures(timer, skip=0)
    figures.pop("forward_s_per_row_at_64_text_tokens")
    steps_run = figures["forwards"] / 2 / len(rows)  # the steps `strength` leaves, as the pipeline cuts them
    in_forwards = figures["total_forward_s"]
    per_step = figures["forward_s"] * 2
    if control_timer is not None:
        control = forward_figures(control_timer, skip=0)
        in_forwards += control["total_forward_s"]
        per_step += control["forward_s"]
        result["controlnet"] = {"forward_s": control["forward_s"], "forwards": control["forwards"]}
        control_timer.remove()
    rest = statistics.mean(walls) - in_forwards / len(rows)
    full_steps = FULL_STEPS * steps_run / args.steps
    result.update(figures)
    result["seconds_per_image_measured"] = round(statistics.median(walls), 2)
    result["rest_per_image_s"] = round(rest, 3)
    result["seconds_per_image_at_50_steps"] = round(per_step * full_steps + rest, 2)
    result["extrapolated"] = args.steps != FULL_STEPS
    result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)
    result["peak_gpu_gib"] = gpu_peak_gib()
    timer.remove()
    pipe = None  # the engine variants that follow in this process need the GPU
    free_gpu()
    return result


# --- (b) qwen-batch's engine ----------------------------------------------------------------------------


def write_manifest(path: Path, args, rows: list[dict]) -> Path:
    """A manifest of the same rows (docs/manifest.md): `control_image`, or `init_image`, `mask_image` and
    `strength`; width and height given, as the recipe's call gives them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = len(rows)
    columns = {
        "id": [row["id"] for row in rows],
        "prompt": [row["prompt"] for row in rows],
        "negative_prompt": [" "] * count,
        "width": pa.array([args.size] * count, pa.int64()),
        "height": pa.array([args.size] * count, pa.int64()),
        "seed": pa.array([row["seed"] for row in rows], pa.int64()),
        "num_inference_steps": pa.array([args.steps] * count, pa.int64()),
        "true_cfg_scale": [4.0] * count,
    }
    if args.task == "inpaint":
        columns |= {
            "init_image": [row["image"] for row in rows],
            "mask_image": [row["mask"] for row in rows],
            "strength": [args.strength] * count,
        }
    else:
        columns["control_image"] = [row["image"] for row in rows]
    pq.write_table(pa.table(columns), path)
    return path


def engine_result(args, rows, inputs: Path, controlnet_folder, label: str, mode: str, compile_: str, batch_size: int):
    from qwen_batch.pipeline.conditions.cached_images import _StartEncoder
    from qwen_batch.pipeline.encode import PromptEncoder
    from qwen_batch.run.engine import RunConfig, encode_stage

    device = "cpu" if args.tiny else "cuda"
    timings: dict[str, float] = {}
    plan_holder = {}

    def on_host(stage: str) -> bool:  # as bench/qwen_image_gpu.py: modes other than bf16 place weights themselves
        memory = plan_holder["plan"].memory
        return (memory.encoder_mode if stage == "encode" else memory.denoiser.mode) != "bf16"

    full_size_source(on_host=on_host, device=device, timings=timings, tiny=args.tiny)
    work = Path(args.work_root) / label
    work.mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        manifest=str(write_manifest(work / "manifest.parquet", args, rows)),
        output=str(work / "out"),
        model=FULL_SIZE_MODEL,
        batch_size=batch_size,
        device=device,
        memory_mode=mode,
        compile=compile_,
        compile_cache=args.compile_cache,
        cache=str(work / "cache"),
        allowed_inputs=(str(inputs),),
        controlnet=str(controlnet_folder) if controlnet_folder else None,
    )
    result = {"run": "engine", "task": args.task, "label": label, **versions(), "steps_run": args.steps}
    result.update(images=len(rows), width=args.size, height=args.size)
    plan = planned(config, result)
    if plan is None:
        return result
    plan_holder["plan"] = plan

    # Stage 1: texts, then the images' VAE encodes; loading and freeing the encoder and the VAE timed apart.
    rss = RssPeak()
    timings.clear()
    targets = [
        (PromptEncoder, "__init__"),
        (PromptEncoder, "close"),
        (_StartEncoder, "__init__"),
        (_StartEncoder, "close"),
    ]
    started = time.perf_counter()
    with timing(*targets) as timers:
        encode = encode_stage(plan)
    stage_seconds = time.perf_counter() - started  # the texts' stats do not count the images' VAE encodes
    loading = sum(sum(timer.seconds) for timer in timers)
    work_seconds = stage_seconds - loading
    result["encode"] = {
        "seconds_with_load_and_free": round(stage_seconds, 2),
        "load_and_free_seconds": round(loading, 2),
        "seconds_per_image": round(work_seconds / len(rows), 3),
        "peak_gpu_gib": encode.peak_gpu_gib,
        "peak_host_gib": rss.stop(),
    }

    # Stage 2: load (build + placement) then denoise, timed apart; the ControlNet's forwards timed too.
    result.update(timed_denoise(plan, encode, timings, args.steps))
    return with_encode_stage(result, args.steps)


# --- (a) and (b) in one process -------------------------------------------------------------------------


def run_versus(args) -> None:
    """The recipe, then engine variants, then the recipe again, in this one process on the same GPU,
    with the same rows; each variant's speed as a ratio to the recipe, and its images against the
    recipe's (and against the first variant's)."""
    if args.task == "inpaint" and args.strength != 1.0 and args.steps != FULL_STEPS:
        # Both sides would run int(steps * strength) steps, which the 50-step extrapolation does not model.
        raise SystemExit("--strength below 1 needs --steps 50 (no extrapolation)")
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen-conditions-versus-"))
    inputs = work / "inputs"
    rows = condition_rows(args, inputs)
    controlnet_folder = ensure_controlnet(args, work) if args.task == "controlnet" else None

    def run_engine(label: str, mode: str, compile_: str, batch_size: int) -> dict:
        engine_args = argparse.Namespace(**vars(args), work_root=str(work))
        return engine_result(engine_args, rows, inputs, controlnet_folder, label, mode, compile_, batch_size)

    summary = {"task": args.task, "steps_run": args.steps, "images": args.images, "size": args.size}
    if args.task == "inpaint":
        summary["strength"] = args.strength
    versus(
        lambda images: recipe_result(args, rows, controlnet_folder, images),
        run_engine,
        args.variants.split(","),
        work,
        args.json,
        **summary,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    versus_ = commands.add_parser("versus")
    versus_.add_argument("--task", choices=TASKS, default="controlnet")
    versus_.add_argument("--steps", type=int, default=10)
    versus_.add_argument("--images", type=int, default=4, help="rows (output images) per run")
    versus_.add_argument("--size", type=int, default=1024, help="output and input images are SIZE x SIZE")
    versus_.add_argument("--strength", type=float, default=1.0, help="inpaint: the rows' strength")
    versus_.add_argument("--variants", default="bf16-compile", help=", ".join(VARIANTS))
    versus_.add_argument("--compile-cache", help="inductor cache folder shared between runs")
    versus_.add_argument("--work", help="folder for inputs, the ControlNet, manifests, caches and images")
    versus_.add_argument("--json", help="append each result as a JSON line to this file")
    versus_.add_argument("--tiny", action="store_true", help="dry run on the CPU with the tiny models")
    args = parser.parse_args(argv)
    {"versus": run_versus}[args.command](args)


if __name__ == "__main__":
    main()
