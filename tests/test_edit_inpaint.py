"""Edit-inpainting: an edit row with a `mask_image` equals diffusers' `QwenImageEditInpaintPipeline` (tiny edit
model, CPU, within 2/255), alone and batched with plain edit rows; rows it cannot take say why. (One masked
row: the pipeline always works at about 1 megapixel, which is slow on the CPU.)"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, run
from qwen_batch.weights.model_source import resolve_model
from tests.support import diffusers_reference, pixels
from tests.test_edit import edit_row, make_input, write_edit_manifest

TOLERANCE = 2  # of 255


def _mask(path, size) -> str:
    image = Image.new("RGB", size, "black")
    width, height = size
    ImageDraw.Draw(image).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill="white")
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit-inpaint")
    square = str(make_input(folder / "square.png", (256, 256), 1))
    rows = [
        edit_row(
            "patch",
            square,
            "put a red apple here",
            mask_image=_mask(folder / "m.png", (256, 256)),
            strength=0.9,
            num_inference_steps=3,
        ),
        edit_row("plain-edit", square, "make it blue", width=256, height=256),
        edit_row("sized", square, "x", mask_image=str(folder / "m.png"), width=256, height=256),
        edit_row("strength-alone", square, "x", strength=0.5),
    ]
    manifest = write_edit_manifest(folder / "m.parquet", rows)
    outputs = {}
    for batch_size in (1, 4):
        output = folder / f"batch{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), model="tiny-edit", batch_size=batch_size, device="cpu"))
        assert summary.generated == 2 and summary.invalid == 2, summary
        outputs[batch_size] = output
    return manifest, outputs


def test_edit_inpainting_rows_match_diffusers(setup):
    from diffusers import QwenImageEditInpaintPipeline

    manifest, outputs = setup
    pipe = QwenImageEditInpaintPipeline.from_pretrained(resolve_model("tiny-edit").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        if request.mask_image is None:
            continue
        image = diffusers_reference(
            pipe,
            request,
            image=Image.open(request.images[0]).convert("RGB"),
            mask_image=Image.open(request.mask_image).convert("RGB"),
            strength=request.strength,
        )
        ours = pixels(outputs[4] / "images" / f"{request.id}.png")
        reference = pixels(image)
        assert ours.shape == reference.shape, request.id
        assert np.abs(ours - reference).max() <= TOLERANCE, request.id


def test_rows_are_the_same_alone_and_batched(setup):
    _, outputs = setup
    for row_id in ("patch", "plain-edit"):
        alone, batched = (pixels(outputs[size] / "images" / f"{row_id}.png") for size in (1, 4))
        assert np.abs(alone - batched).max() <= TOLERANCE, row_id


def test_rows_it_cannot_take_say_why(setup):
    _, outputs = setup
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    assert "take their size from the input image" in results["sized"]["error"]
    assert "needs mask_image" in results["strength-alone"]["error"]
    assert results["patch"]["status"] == "ok" and len(results["patch"]["input_sha256"]) == 2
