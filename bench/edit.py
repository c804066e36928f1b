"""How fast are image edits (Qwen-Image-Edit, Edit-Plus) against the diffusers recipe in the same process?

    python -m bench.edit --only edit-fp8,edit-plus-fp8 --json out.jsonl
    python -m bench.edit --model tiny --only edit-bf16                  # the same code on the CPU, tiny model

The recipe: `QwenImageEditPipeline` (one input image a row) or `QwenImageEditPlusPipeline` (two), every
component resident in bf16, one `pipe(image=..., prompt=..., negative_prompt=" ", true_cfg_scale=4.0, ...)`
per row (the model card's call); the engine over an edit manifest of the same rows (bench/versus.py), on the
full-size random edit model (bench/full_size.py). No width or height: the output takes the input's size.

Per image at 50 steps: the median forward times the forwards of 50 steps, plus the measured rest. The
recipe's rest is everything else in its `pipe()` call, the VL encoding of instruction and negative prompt
with the image(s) and the VAE encode of the inputs included. The engine's is its per-batch overhead (noise,
scheduler, VAE decode, PNG writes) shared by the batch's rows, plus its encode stage's seconds per image:
stage 1 (reading the inputs, Qwen2.5-VL over instruction and image(s), the VAE encode, cache writes) without
loading and freeing the encoder, as the recipe's figure is without its load.

Input images are synthetic (seeded gradients, shapes and noise), 1024x1024 PNGs. The tokenizer is the tiny
model's (a smaller vocabulary: a few more tokens per instruction than the real one); the image tokens, which
dominate the VL sequence and the DiT's, are the real count.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from bench.full_size import FULL_SIZE_MODELS, full_size_source, resident_pipeline
from bench.harness import Scenario, main, scenarios
from bench.measure import FULL_STEPS, RssPeak, forward_figures, timing
from bench.rows import instructions, write_inputs
from bench.versus import Comparison

INPUTS_PER_ROW = {"edit": 1, "edit-plus": 2}


class Edit(Comparison):
    """Edit rows of `task` ("edit" or "edit-plus"): `count` instructions, each with its input image(s) of
    `size` x `size`, written to the work folder."""

    timed_models = ("transformer",)

    def __init__(self, runner, task: str, count: int, steps: int, size: int):
        self.task, self.size = task, size
        self.inputs = runner.work / "inputs"
        per_row = INPUTS_PER_ROW[task]
        paths = write_inputs(self.inputs, count * per_row, size)
        rows = [
            {
                "id": f"e{index:03d}",
                "prompt": text,
                "images": [str(path) for path in paths[index * per_row : (index + 1) * per_row]],
                "seed": 1000 + index,
            }
            for index, text in enumerate(instructions(count))
        ]
        super().__init__(runner, rows, steps)

    def recipe_fields(self) -> dict:
        return {"images": len(self.rows), "input_size": self.size}

    def recipe_pipeline(self):
        return resident_pipeline(self.tiny, task=self.task)

    def recipe_call(self, pipe, row: dict, seed: int, steps: int):
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in row["images"]]
        return pipe(
            image=images[0] if self.task == "edit" else images,
            prompt=row["prompt"],
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    def recipe_spies(self, pipe) -> list[tuple[object, str]]:
        return [(pipe, "encode_prompt"), (pipe, "_encode_vae_image")]

    def recipe_figures(self, result: dict, walls: list[float], timers: dict, image, spies: list) -> None:
        timer, (encodes, vae_encodes) = timers["transformer"], spies
        figures = forward_figures(timer, skip=0)
        figures.pop("forward_s_per_row_at_64_text_tokens")  # normalised to 4096 image tokens: misleading here
        per_image_measured = statistics.median(walls)
        overhead = per_image_measured - figures["forward_s"] * 2 * self.steps
        result.update(figures)
        result["width"], result["height"] = image.size
        result["dit_image_tokens"] = timer.shapes[0][1] if timer.shapes else None
        # instruction (and negative prompt) with the image(s) through Qwen2.5-VL; each input image's VAE encode
        result.update(encodes.figures("encode_prompt"))
        result.update(vae_encodes.figures("vae_encode"))
        result["seconds_per_image_measured"] = round(per_image_measured, 2)
        result["overhead_per_image_s"] = round(overhead, 3)
        result["seconds_per_image_at_50_steps"] = round(figures["forward_s"] * 2 * FULL_STEPS + overhead, 2)
        result["extrapolated"] = self.steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / result["seconds_per_image_at_50_steps"], 1)

    def write_manifest(self, path: Path) -> Path:
        """An edit manifest (docs/manifest.md): `image` for Edit, `images` lists for Edit-Plus; no width or
        height, so the output takes the input's size at about 1024x1024, as the pipelines do."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, count = self.rows, len(self.rows)
        columns = {"id": [row["id"] for row in rows], "prompt": [row["prompt"] for row in rows]}
        if self.task == "edit":
            columns["image"] = [row["images"][0] for row in rows]
        else:
            columns["images"] = pa.array([row["images"] for row in rows], pa.list_(pa.string()))
        columns |= {
            "negative_prompt": [" "] * count,
            "seed": pa.array([row["seed"] for row in rows], pa.int64()),
            "num_inference_steps": pa.array([self.steps] * count, pa.int64()),
            "true_cfg_scale": [4.0] * count,
        }
        pq.write_table(pa.table(columns), path)
        return path

    def model_source(self, on_host, timings: dict[str, float], gpu):
        return full_size_source(on_host=on_host, device=self.device, timings=timings, tiny=self.tiny, task=self.task)

    def run_config(self) -> dict:
        return {"allow_inputs": (str(self.inputs),)}

    def engine_fields(self) -> dict:
        return {"images": len(self.rows), "input_size": self.size}

    def encode(self, plan, timings: dict[str, float], result: dict):
        """Stage 1: read the inputs, encode instructions with their images and the images' latents. Loading and
        freeing the encoder are timed apart (the recipe's per-image figure has no load either)."""
        from qwen_batch.pipeline.conditions.edit import EditEncoder
        from qwen_batch.run.engine import encode_stage

        result["pipeline"] = plan.pipeline_class
        rss = RssPeak()
        timings.clear()
        targets = [(EditEncoder, name) for name in ("__init__", "close", "encode_texts", "encode_latents")]
        with timing(*targets) as (load, close, texts, latents):
            encode = encode_stage(plan)
        images = len(self.rows)
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
        return encode

    def summary_fields(self) -> dict:
        return {
            "task": self.task,
            "model": FULL_SIZE_MODELS[self.task],
            "steps_run": self.steps,
            "images": len(self.rows),
        }


def versus(runner, task: str, variants: tuple[str, ...], images: int = 2, steps: int = 6, size: int = 1024) -> None:
    """The recipe, the engine's `variants`, the recipe again, over `images` rows (output images)."""
    Edit(runner, task, images, steps, size).versus(variants)


def edit(variants: tuple[str, ...], images: int = 2) -> dict:
    return {"task": "edit", "variants": variants, "images": images}


def edit_plus(variants: tuple[str, ...]) -> dict:
    # One output image: the recipe's call with two 1024x1024 inputs takes 8 s at 6 steps.
    return {"task": "edit-plus", "variants": variants, "images": 1}


SCENARIOS = scenarios(
    Scenario("edit-bf16", versus, edit(("bf16-compile",)), "Edit, the bf16 engine against the recipe", 5),
    Scenario("edit-fp8", versus, edit(("fp8-compile-b4",)), "Edit, the fp8 engine against the recipe", 7),
    Scenario("edit-plus-bf16", versus, edit_plus(("bf16-compile",)), "Edit-Plus, bf16 against the recipe", 3),
    Scenario("edit-plus-fp8", versus, edit_plus(("fp8-compile-b4",)), "Edit-Plus, fp8 against the recipe", 6),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
