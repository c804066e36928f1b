"""LoRA adapters and a fixed sampling shift on edit rows (Qwen-Image-Edit and Edit-Plus, tiny models, CPU).

The same contract as text-to-image (tests/test_adapters.py): each row equals diffusers'
`QwenImageEditPipeline` / `QwenImageEditPlusPipeline` with its adapters loaded through
`load_lora_weights` + `set_adapters` and its shift's scheduler, within 2/255 per pixel, alone and
batched beside rows with other adapters, scales and shifts, or none (the Edit-Lightning recipe).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, run
from qwen_batch.tiny.lora import write_tiny_lora
from qwen_batch.weights.model_source import resolve_model
from tests.support import diffusers_adapters, pixels
from tests.test_edit import SMALL, TOLERANCE, as_png, diffusers_edit, edit_row, write_edit_manifest
from tests.test_edit import inputs as inputs  # the module-scoped fixture of input images


def lora(path: str, scale: float = 1.0) -> dict:
    return {"path": path, "scale": scale}


def check_against_diffusers(pipe, manifest, outputs) -> None:
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        images = [Image.open(url).convert("RGB") for url in request.images]
        with diffusers_adapters(pipe, request):
            reference = pixels(as_png(diffusers_edit(pipe, request, images)))
        for label, output in outputs.items():
            ours = pixels(output / "images" / f"{request.id}.png")
            assert ours.shape == reference.shape, (request.id, label)
            assert np.abs(ours - reference).max() <= TOLERANCE, (request.id, label)


@pytest.fixture(scope="module")
def edit_folder(inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit-adapters")
    shutil.copytree(inputs / "img", folder / "img")
    for model in ("tiny-edit", "tiny-edit-plus"):
        write_tiny_lora(model, folder / f"{model}-style.safetensors", rank=4, layout="comfyui", seed=1)
        write_tiny_lora(model, folder / f"{model}-lightning.safetensors", rank=4, layout="kohya", seed=2)
    return folder


def test_edit_rows_with_adapters_and_shifts_match_diffusers_alone_and_batched(edit_folder):
    from diffusers import QwenImageEditPipeline

    style, lightning = "tiny-edit-style.safetensors", "tiny-edit-lightning.safetensors"
    rows = [
        edit_row("styled", "img/square.png", "make it red", seed=1, loras=[lora(style)], **SMALL),
        edit_row("plain", "img/square.png", "make it red", seed=1, **SMALL),
        edit_row("lightning", "img/square2.png", "turn it green", seed=2, true_cfg_scale=1.0, num_inference_steps=4,
                 scheduler_shift=3.0, loras=[lora(lightning, 0.8)], **SMALL),
        edit_row("styled-2", "img/square2.png", "add snow", seed=3, loras=[lora(style)], **SMALL),
        edit_row("both", "img/wide.jpg", "a sunset sky", seed=4, loras=[lora(style, 0.5), lora(lightning, 0.5)]),
    ]  # fmt: skip
    manifest = write_edit_manifest(edit_folder / "edits.parquet", rows)
    outputs = {}
    for batch_size in (1, 3):
        output = edit_folder / f"out{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu"))
        assert summary.exit_code == 0 and summary.generated == len(rows), summary.problems
        assert summary.denoise.adapter_fuses == 3
        outputs[batch_size] = output
    styled, plain = (pixels(outputs[3] / "images" / f"{name}.png") for name in ("styled", "plain"))
    assert np.abs(styled - plain).max() > 20  # the adapter changes the edit
    pipe = QwenImageEditPipeline.from_pretrained(resolve_model("tiny-edit").location, dtype=torch.float32)
    check_against_diffusers(pipe, manifest, outputs)


def test_edit_plus_rows_with_adapters_match_diffusers(edit_folder):
    from diffusers import QwenImageEditPlusPipeline

    style, lightning = "tiny-edit-plus-style.safetensors", "tiny-edit-plus-lightning.safetensors"
    pair = ["img/square.png", "img/wide.jpg"]
    rows = [
        {"id": "pair", "images": pair, "prompt": "put the two together", "seed": 1, "loras": [lora(style)]},
        {"id": "pair-plain", "images": pair, "prompt": "put the two together", "seed": 1},
        {"id": "pair-fast", "images": pair, "prompt": "swap colours", "seed": 2, "true_cfg_scale": 1.0,
         "num_inference_steps": 4, "scheduler_shift": 3.0, "loras": [lora(lightning)]},
    ]  # fmt: skip
    for row in rows:
        row.setdefault("num_inference_steps", 2)
        row.update(SMALL)
    manifest = write_edit_manifest(edit_folder / "plus.parquet", rows)
    output = edit_folder / "plus-out"
    summary = run(RunConfig(str(manifest), str(output), batch_size=2, device="cpu"))
    assert summary.exit_code == 0 and summary.generated == 3, summary.problems
    pipe = QwenImageEditPlusPipeline.from_pretrained(resolve_model("tiny-edit-plus").location, dtype=torch.float32)
    check_against_diffusers(pipe, manifest, {"batch 2": output})
