"""How fast are ControlNet and inpainting rows against diffusers' own pipelines in the same process?

    python -m bench.conditions --only controlnet-bf16,inpaint-bf16 --json out.jsonl
    python -m bench.conditions --model tiny --only controlnet-bf16      # the same code on the CPU, tiny models

1024x1024, negative prompt " ", true CFG 4, 4 rows, seeds from 1000. The recipe:
`QwenImageControlNetPipeline` with a full-size Union ControlNet (5 blocks, random weights,
`bench/full_size.py`'s `build_controlnet`, saved once and loaded back with `from_pretrained`), one control
image a row at scale 1; or `QwenImageInpaintPipeline` with an init image and a mask (strength 1.0: every
step runs, the unmasked area reset after each); every component resident in bf16, one `pipe()` per row. The
engine: a manifest of the same rows (`control_image`, or `init_image` + `mask_image` + `strength`), the
ControlNet given as `--controlnet FOLDER` (the same files); bench/versus.py runs the two sides.

Per image at 50 steps: the median forwards (the transformer's two per step, the ControlNet's one) times the
forwards of 50 steps, plus the measured rest. The recipe's rest is everything else in its `pipe()` call: text
encoding, the VAE encode of its control or init image and mask, the scheduler, the decode. The engine's is
its per-batch rest (noise, scheduler, the inpainting blend, decode, PNG writes) shared by the batch's rows,
plus its encode stage's seconds per image without loading and freeing the encoder and the VAE.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.full_size import build_controlnet, resident_pipeline
from bench.harness import Scenario, main, scenarios
from bench.measure import FULL_STEPS, RssPeak, forward_figures, free_gpu, timing
from bench.rows import prompts, write_inputs, write_masks
from bench.versus import Comparison


class Conditioned(Comparison):
    """Rows of `task` ("controlnet" or "inpaint"): `count` prompts, each with its control image, or its init
    image and mask, of `size` x `size`, written to the work folder; inpainting rows at `strength`."""

    def __init__(self, runner, task: str, count: int, steps: int, size: int, strength: float = 1.0):
        if task == "inpaint" and strength != 1.0 and steps != FULL_STEPS:
            # Both sides would run int(steps * strength) steps, which the 50-step extrapolation does not model.
            raise ValueError("a strength below 1 needs 50 steps (no extrapolation)")
        self.task, self.size, self.strength = task, size, strength
        self.timed_models = ("transformer", "controlnet") if task == "controlnet" else ("transformer",)
        self.inputs = runner.work / "inputs"
        images = write_inputs(self.inputs, count, size)
        masks = write_masks(self.inputs / "masks", count, size) if task == "inpaint" else [None] * count
        rows = [
            {
                "id": f"c{index:03d}",
                "prompt": text,
                "seed": 1000 + index,
                "image": str(image),
                "mask": mask and str(mask),
            }
            for index, (text, image, mask) in enumerate(zip(prompts(count), images, masks, strict=True))
        ]
        super().__init__(runner, rows, steps)
        self.controlnet = ensure_controlnet(runner) if task == "controlnet" else None

    def recipe_fields(self) -> dict:
        strength = self.strength if self.task == "inpaint" else None
        return {"images": len(self.rows), "width": self.size, "height": self.size, "strength": strength}

    def recipe_pipeline(self):
        from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImageInpaintPipeline

        base = resident_pipeline(self.tiny)
        names = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
        components = {name: getattr(base, name) for name in names}
        if self.task == "inpaint":
            pipe = QwenImageInpaintPipeline(**components)
        else:
            dtype, device = (torch.float32, "cpu") if self.tiny else (torch.bfloat16, "cuda")
            controlnet = QwenImageControlNetModel.from_pretrained(str(self.controlnet), torch_dtype=dtype).to(device)
            pipe = QwenImageControlNetPipeline(**components, controlnet=controlnet.eval())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def recipe_call(self, pipe, row: dict, seed: int, steps: int):
        from PIL import Image

        image = Image.open(row["image"]).convert("RGB")
        if self.task == "inpaint":
            task = {"image": image, "mask_image": Image.open(row["mask"]), "strength": self.strength}
        else:
            task = {"control_image": image, "controlnet_conditioning_scale": 1.0}
        return pipe(
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=self.size,
            height=self.size,
            generator=torch.Generator("cpu").manual_seed(seed),
            **task,
        ).images[0]

    def recipe_figures(self, result: dict, walls: list[float], timers: dict, image, spies: list) -> None:
        timer, control_timer = timers["transformer"], timers.get("controlnet")
        figures = forward_figures(timer, skip=0)
        figures.pop("forward_s_per_row_at_64_text_tokens")
        steps_run = figures["forwards"] / 2 / len(self.rows)  # the steps `strength` leaves, as the pipeline cuts them
        in_forwards = figures["total_forward_s"]
        per_step = figures["forward_s"] * 2
        if control_timer is not None:
            control = forward_figures(control_timer, skip=0)
            in_forwards += control["total_forward_s"]
            per_step += control["forward_s"]
            result["controlnet"] = {"forward_s": control["forward_s"], "forwards": control["forwards"]}
        rest = statistics.mean(walls) - in_forwards / len(self.rows)
        full_steps = FULL_STEPS * steps_run / self.steps
        result.update(figures)
        result["seconds_per_image_measured"] = round(statistics.median(walls), 2)
        result["rest_per_image_s"] = round(rest, 3)
        result["seconds_per_image_at_50_steps"] = round(per_step * full_steps + rest, 2)
        result["extrapolated"] = self.steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)

    def write_manifest(self, path: Path) -> Path:
        """A manifest of the same rows (docs/manifest.md): `control_image`, or `init_image`, `mask_image` and
        `strength`; width and height given, as the recipe's call gives them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, count = self.rows, len(self.rows)
        columns = {
            "id": [row["id"] for row in rows],
            "prompt": [row["prompt"] for row in rows],
            "negative_prompt": [" "] * count,
            "width": pa.array([self.size] * count, pa.int64()),
            "height": pa.array([self.size] * count, pa.int64()),
            "seed": pa.array([row["seed"] for row in rows], pa.int64()),
            "num_inference_steps": pa.array([self.steps] * count, pa.int64()),
            "true_cfg_scale": [4.0] * count,
        }
        if self.task == "inpaint":
            columns |= {
                "init_image": [row["image"] for row in rows],
                "mask_image": [row["mask"] for row in rows],
                "strength": [self.strength] * count,
            }
        else:
            columns["control_image"] = [row["image"] for row in rows]
        pq.write_table(pa.table(columns), path)
        return path

    def run_config(self) -> dict:
        return {"allow_inputs": (str(self.inputs),), "controlnet": str(self.controlnet) if self.controlnet else None}

    def engine_fields(self) -> dict:
        return {"images": len(self.rows), "width": self.size, "height": self.size}

    def encode(self, plan, timings: dict[str, float], result: dict):
        """Stage 1: texts, then the images' VAE encodes; loading and freeing the encoder and the VAE timed apart."""
        from qwen_batch.pipeline.conditions.cached_images import _StartEncoder
        from qwen_batch.pipeline.encode import PromptEncoder
        from qwen_batch.run.engine import encode_stage

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
            "seconds_per_image": round(work_seconds / len(self.rows), 3),
            "peak_gpu_gib": encode.peak_gpu_gib,
            "peak_host_gib": rss.stop(),
        }
        return encode

    def summary_fields(self) -> dict:
        summary = {"task": self.task, "steps_run": self.steps, "images": len(self.rows), "size": self.size}
        if self.task == "inpaint":
            summary["strength"] = self.strength
        return summary


def ensure_controlnet(runner) -> Path:
    """The ControlNet's folder, both sides load it: the tiny one in a dry run, else a full-size random one
    built on the GPU and saved once in the work root (3.5 GB in bf16), kept for the next scenarios."""
    if runner.tiny:
        from qwen_batch.tiny.controlnet import ensure_tiny_controlnet

        return ensure_tiny_controlnet("union")
    folder = runner.root / "controlnet"
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        controlnet = build_controlnet()
        controlnet.save_pretrained(folder)
        del controlnet
        free_gpu()
        runner.progress(f"full-size ControlNet written to {folder} in {time.perf_counter() - started:.1f} s")
    return folder


def versus(runner, task: str, variants: tuple[str, ...], images: int = 4, steps: int = 6, size: int = 1024) -> None:
    """The recipe, the engine's `variants`, the recipe again, over `images` rows."""
    Conditioned(runner, task, images, steps, size).versus(variants)


SCENARIOS = scenarios(
    Scenario(
        "controlnet-bf16",
        versus,
        {"task": "controlnet", "variants": ("bf16-compile",)},
        "ControlNet rows, bf16 engine against QwenImageControlNetPipeline",
        5,
    ),
    Scenario(
        "controlnet-fp8",
        versus,
        {"task": "controlnet", "variants": ("fp8-compile-b4",)},
        "ControlNet rows, fp8 (transformer and ControlNet) against the pipeline",
        9,
    ),
    Scenario(
        "inpaint-bf16",
        versus,
        {"task": "inpaint", "variants": ("bf16-compile",)},
        "inpainting rows, bf16 engine against QwenImageInpaintPipeline",
        4,
    ),
    Scenario(
        "inpaint-fp8",
        versus,
        {"task": "inpaint", "variants": ("fp8-compile-b4",)},
        "inpainting rows, fp8 engine against the pipeline",
        7,
    ),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
