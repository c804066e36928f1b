"""How much do batching and bf16 change an image? Per-pixel differences on the tiny model, on the GPU.

    python -m bench.consistency --json out.jsonl
    python -m bench.consistency --model tiny          # on the CPU (bf16 on the CPU says little about the GPU)

For each row: qwen-batch alone (batch 1) vs in a batch of 4, and both against diffusers' `QwenImagePipeline`
called per prompt, in bf16 and fp32, all in one process. The tiny model either way: this is about arithmetic,
not speed (tests/test_gpu.py asserts the bounds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.harness import Scenario, main, scenarios
from bench.measure import free_gpu
from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, release_generator, run
from qwen_batch.weights.model_source import ensure_tiny_model
from tests.support import diffusers_reference, small_row, write_manifest

ROWS = [
    small_row("fox", "A red fox running through a snowy birch forest under a full moon", seed=1),
    small_row("cat", "a cat", negative_prompt="blurry, low quality", seed=2),
    small_row("zh", "一只在月光下奔跑的狐狸", seed=3),
    small_row("short", "a lighthouse", seed=4),
]


def pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if isinstance(image_or_path, (str, Path)) else image_or_path
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def batching_and_dtype(runner) -> None:
    """Each row alone and in a batch of 4, through qwen-batch and diffusers, in bf16 and fp32: per-pixel
    differences of the pairs that say what batching, bf16 and the engine change."""
    from diffusers import QwenImagePipeline

    folder = runner.work
    manifest = write_manifest(folder / "m.parquet", ROWS)
    requests = read_manifest(str(manifest)).requests
    report = {"run": "consistency", "rows": {}}
    images = {}
    for dtype in ("bf16", "fp32"):
        for batch in (1, 4):
            out = folder / f"{dtype}-b{batch}"
            run(RunConfig(str(manifest), str(out), batch_size=batch, device=runner.device, dtype=dtype))
            release_generator()
            for request in requests:
                images[(dtype, f"b{batch}", request.id)] = pixels(out / "images" / f"{request.id}.png")
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        pipe = QwenImagePipeline.from_pretrained(str(ensure_tiny_model()), dtype=torch_dtype).to(runner.device)
        pipe.set_progress_bar_config(disable=True)
        for request in requests:
            image = diffusers_reference(pipe, request)
            images[(dtype, "diffusers", request.id)] = pixels(image)
        del pipe
        free_gpu()

    pairs = {
        "bf16 b1 vs b4": (("bf16", "b1"), ("bf16", "b4")),
        "bf16 b1 vs diffusers bf16": (("bf16", "b1"), ("bf16", "diffusers")),
        "bf16 b4 vs diffusers bf16": (("bf16", "b4"), ("bf16", "diffusers")),
        "fp32 b1 vs b4": (("fp32", "b1"), ("fp32", "b4")),
        "fp32 b4 vs diffusers fp32": (("fp32", "b4"), ("fp32", "diffusers")),
        "diffusers bf16 vs diffusers fp32": (("bf16", "diffusers"), ("fp32", "diffusers")),
    }
    for request in requests:
        row = {}
        for name, (a, b) in pairs.items():
            difference = np.abs(images[(*a, request.id)] - images[(*b, request.id)])
            row[name] = {"max": int(difference.max()), "mean": round(float(difference.mean()), 3)}
        report["rows"][request.id] = row
    runner.write(report)


SCENARIOS = scenarios(
    Scenario("batching-and-dtype", batching_and_dtype, {}, "a row alone, in a batch, and diffusers', bf16 and fp32", 2),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
