"""Rows that start from an image (image-to-image) and repaint a mask (inpainting): diffusers' own pipelines
row for row, alone and batched with plain rows, with clear reasons for rows that cannot run.

Within 2/255 per pixel on the CPU in float32 with the tiny model, against `QwenImageImg2ImgPipeline` and
`QwenImageInpaintPipeline` with `generator=torch.Generator("cpu").manual_seed(seed)`.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from qwen_batch.manifest import read_manifest
from qwen_batch.outputs.png import PARAMETERS_KEY, read_png_metadata
from qwen_batch.run.engine import RunConfig, run
from tests.support import diffusers_reference, pixels, small_row, write_manifest

TOLERANCE = 2  # of 255


def _photo(path, size=(256, 256), seed=0) -> str:
    """A picture with structure (gradients and shapes), so the start visibly shapes the image."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 64), rng.integers(0, height - 64)
        draw.ellipse((x0, y0, x0 + 60, y0 + 60), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(path)
    return str(path)


def _mask(path, size=(256, 256)) -> str:
    """White (repaint) in the middle, black (keep) around it."""
    image = Image.new("RGB", size, "black")
    ImageDraw.Draw(image).rectangle((64, 64, 191, 191), fill="white")
    image.save(path)
    return str(path)


def _small_mask(path, size=(384, 256)) -> str:
    """A small white patch off-centre on the wide image: its padded box is a part of the image."""
    image = Image.new("RGB", size, "black")
    ImageDraw.Draw(image).ellipse((220, 60, 300, 140), fill="white")
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("starts")
    return {
        "photo": _photo(folder / "photo.png"),
        "other": _photo(folder / "other.png", seed=7),
        "wide": _photo(folder / "wide.png", size=(384, 256), seed=3),
        "mask": _mask(folder / "mask.png"),
        "small-mask": _small_mask(folder / "small-mask.png"),
        "folder": folder,
    }


def _rows(inputs) -> list[dict]:
    photo, other, mask = inputs["photo"], inputs["other"], inputs["mask"]
    return [
        small_row("i2i", "a watercolor of the same scene", init_image=photo, strength=0.6, seed=1),
        small_row("i2i-other", "an oil painting", init_image=other, strength=0.6, seed=2, num_inference_steps=2),
        small_row("i2i-full", "a pencil sketch", init_image=photo, strength=1.0, seed=3, num_inference_steps=3),
        small_row(
            "inpaint",
            "a red apple on the table",
            init_image=photo,
            mask_image=mask,
            strength=0.9,
            seed=4,
            num_inference_steps=3,
        ),
        small_row(
            "inpaint-2",
            "a blue cup",
            init_image=other,
            mask_image=mask,
            strength=0.9,
            seed=5,
            num_inference_steps=3,
            true_cfg_scale=1.0,
        ),
        small_row("plain", "a lighthouse in a storm", seed=6),
        # Inpainting on the mask's padded box only (diffusers' padding_mask_crop), pasted back at the init size.
        small_row(
            "crop",
            "a green pear",
            init_image=inputs["wide"],
            mask_image=inputs["small-mask"],
            strength=0.9,
            mask_crop_padding=16,
            seed=7,
            num_inference_steps=3,
        ),
        small_row("crop-no-mask", "x", init_image=photo, mask_crop_padding=8),
        # The guards' twins: "i2i" without its init image, "inpaint" without its mask.
        small_row("i2i-twin", "a watercolor of the same scene", seed=1),
        small_row(
            "inpaint-twin", "a red apple on the table", init_image=photo, strength=0.9, seed=4, num_inference_steps=3
        ),
        # Rows that cannot run, each with its reason:
        small_row("mask-alone", "x", mask_image=mask),
        small_row("bad-strength", "x", init_image=photo, strength=1.5),
        small_row("zero-strength", "x", init_image=photo, strength=0.0),
        small_row("mask-size", "x", init_image=inputs["wide"], mask_image=mask, width=384),
        small_row("missing", "x", init_image=str(inputs["folder"] / "nowhere.png")),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, inputs):
    folder = tmp_path_factory.mktemp("start-runs")
    manifest = write_manifest(inputs["folder"] / "m.parquet", _rows(inputs))  # inputs beside it: allowed
    outputs = {}
    for batch_size in (1, 4):
        output = folder / f"batch{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu"))
        assert summary.generated == 9, summary
        outputs[batch_size] = output
    return manifest, outputs


def _reference(pipe, request, **extra) -> np.ndarray:
    image = diffusers_reference(
        pipe, request, image=Image.open(request.init_image).convert("RGB"), strength=request.strength, **extra
    )
    return pixels(image)


def test_image_to_image_rows_match_diffusers(runs, tiny_model):
    from diffusers import QwenImageImg2ImgPipeline

    manifest, outputs = runs
    pipe = QwenImageImg2ImgPipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    requests = {request.id: request for request in read_manifest(str(manifest)).requests}
    for row_id in ("i2i", "i2i-other", "i2i-full"):
        ours = pixels(outputs[4] / "images" / f"{row_id}.png")
        assert np.abs(ours - _reference(pipe, requests[row_id])).max() <= TOLERANCE, row_id


def test_inpainting_rows_match_diffusers(runs, tiny_model):
    from diffusers import QwenImageInpaintPipeline

    manifest, outputs = runs
    pipe = QwenImageInpaintPipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    requests = {request.id: request for request in read_manifest(str(manifest)).requests}
    for row_id in ("inpaint", "inpaint-2"):
        request = requests[row_id]
        reference = _reference(pipe, request, mask_image=Image.open(request.mask_image).convert("RGB"))
        ours = pixels(outputs[4] / "images" / f"{row_id}.png")
        assert np.abs(ours - reference).max() <= TOLERANCE, row_id


def test_inpainting_a_padded_box_matches_diffusers_padding_mask_crop(runs, tiny_model):
    from diffusers import QwenImageInpaintPipeline

    manifest, outputs = runs
    pipe = QwenImageInpaintPipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    request = next(r for r in read_manifest(str(manifest)).requests if r.id == "crop")
    mask = Image.open(request.mask_image).convert("RGB")
    reference = _reference(pipe, request, mask_image=mask, padding_mask_crop=request.mask_crop_padding)
    ours = pixels(outputs[4] / "images" / "crop.png")
    assert ours.shape == reference.shape == (256, 384, 3)  # the init image's size, not the row's 256x256
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_rows_are_the_same_alone_and_batched_with_other_kinds(runs):
    _, outputs = runs
    for row_id in ("i2i", "i2i-other", "i2i-full", "inpaint", "inpaint-2", "plain", "inpaint-twin"):
        alone = pixels(outputs[1] / "images" / f"{row_id}.png")
        batched = pixels(outputs[4] / "images" / f"{row_id}.png")
        assert np.abs(alone - batched).max() <= TOLERANCE, row_id


def test_the_start_and_the_mask_change_the_image(runs):
    """Guards the tests above (identical images everywhere would pass them): a row differs from its twin
    without the init image, and an inpainting row from its twin without the mask.
    (The tiny model's random VAE does not reconstruct pictures, so closeness to the photo proves nothing.)"""
    _, outputs = runs
    image = {
        name: pixels(outputs[1] / "images" / f"{name}.png") for name in ("i2i", "i2i-twin", "inpaint", "inpaint-twin")
    }
    assert np.abs(image["i2i"] - image["i2i-twin"]).max() > 20
    assert np.abs(image["inpaint"] - image["inpaint-twin"]).max() > 20


def test_rows_that_cannot_run_say_why_and_the_others_run(runs):
    _, outputs = runs
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    expected = {
        "mask-alone": ("invalid", "mask_image needs init_image"),
        "bad-strength": ("invalid", "strength 1.5 is out of range"),
        "zero-strength": ("invalid", "strength 0.0 is out of range"),
        "mask-size": ("failed", "mask_image is 256x256 but init_image is 384x256"),
        "missing": ("failed", "init_image"),
        "crop-no-mask": ("invalid", "mask_crop_padding needs mask_image"),
    }
    for row_id, (status, reason) in expected.items():
        assert results[row_id]["status"] == status and reason in results[row_id]["error"], results[row_id]
    for row_id in ("i2i", "inpaint", "plain"):
        assert results[row_id]["status"] == "ok"


def test_results_record_the_start_and_a_rerun_skips_every_row(runs):
    manifest, outputs = runs
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    inpaint = results["inpaint"]
    assert inpaint["init_image"].endswith("photo.png") and inpaint["mask_image"].endswith("mask.png")
    assert inpaint["strength"] == 0.9 and len(inpaint["input_sha256"]) == 2
    assert results["i2i"]["strength"] == 0.6 and len(results["i2i"]["input_sha256"]) == 1
    png = outputs[4] / "images" / "inpaint.png"
    metadata = read_png_metadata(png.read_bytes())
    assert metadata["mask_image"] == inpaint["mask_image"] and metadata["input_sha256"] == inpaint["input_sha256"]
    with Image.open(png) as image:
        assert "Denoising strength: 0.9" in image.text[PARAMETERS_KEY]

    again = run(RunConfig(str(manifest), str(outputs[4]), batch_size=4, device="cpu"))
    assert again.generated == 0 and again.skipped == 9


def test_a_replaced_input_image_regenerates_exactly_the_rows_that_read_it(runs, inputs):
    manifest, outputs = runs
    _photo(inputs["other"], seed=99)  # same name, new picture
    changed = run(RunConfig(str(manifest), str(outputs[1]), batch_size=4, device="cpu"))
    assert changed.generated == 2 and changed.skipped == 7  # i2i-other and inpaint-2 start from other.png
