"""Never a garbage image: a row whose latents or decoded pixels are not finite (NaN or infinity: fp16 overflow, a
NaN in an adapter or a checkpoint) yields `NotFinite` in place of its image, saying at which stage, and its
batch-mates are the images they are without it. On the tiny Qwen-Image and Qwen-Image-2.1 models, CPU.

Adapters are fused into the weights for a whole batch (`Request.batch_key`), so a NaN adapter spoils its whole
batch; one bad row among good batch-mates is a row whose cached prompt embedding holds a NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.pipeline.denoise.decoded import DecodedImages, NotFinite, not_finite_rows
from qwen_batch.run.engine import RunConfig, encode_stage, generator_for, plan_run, release_generator, run
from qwen_batch.tiny.lora import write_tiny_lora
from tests.support import small_row, write_manifest

NAN_LORA = "nan.safetensors"


def write_nan_lora(model: str, path: Path) -> Path:
    """A tiny adapter for `model` with one weight NaN: enough to spoil every latent it touches."""
    from safetensors.torch import load_file, save_file

    write_tiny_lora(model, path, rank=4, seed=7)
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# --- DecodedImages ---------------------------------------------------------------------------------------------


def test_rows_not_finite_yield_not_finite_with_their_stage():
    latents = torch.zeros(3, 16, 8)
    latents[1, 3, 2] = float("nan")
    decoded = torch.zeros(3, 3, 4, 4)
    decoded[1] = float("nan")  # after bad latents, the pixels are bad too: the latents are named
    decoded[2, 0, 1, 1] = float("inf")
    pixels = torch.full((3, 4, 4, 3), 128, dtype=torch.uint8)
    images = DecodedImages(pixels, not_finite_rows(latents, decoded))
    assert len(images) == 3
    first, second, third = list(images)
    assert isinstance(first, Image.Image) and first.size == (4, 4)
    assert second == NotFinite("latents") and third == NotFinite("pixels")
    assert "latents were not finite" in second.message and "no image written" in second.message
    assert "decoded pixels were not finite" in third.message


@pytest.mark.gpu
def test_on_the_gpu_the_flags_come_back_with_the_pixels():
    latents = torch.zeros(2, 16, 8, device="cuda")
    latents[0, 0, 0] = float("inf")
    decoded = torch.zeros(2, 3, 4, 4, device="cuda", dtype=torch.bfloat16)
    pixels = torch.full((2, 4, 4, 3), 7, dtype=torch.uint8, device="cuda")
    images = list(DecodedImages(pixels, not_finite_rows(latents, decoded)))
    assert images[0] == NotFinite("latents")
    assert isinstance(images[1], Image.Image) and np.asarray(images[1]).max() == 7


def test_without_flags_every_row_is_an_image():
    images = DecodedImages(torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    images.steps_computed = [(2, None), (1, None)]
    assert all(isinstance(image, Image.Image) for image in images)
    assert images.steps_computed == [(2, None), (1, None)]


def test_pasting_back_into_the_init_image_passes_a_row_not_finite_through():
    from qwen_batch.pipeline.conditions.image_start import OverlaidImages

    kept = torch.zeros(8, 8, 4, dtype=torch.uint8)
    images = [Image.new("RGB", (8, 8)), NotFinite("latents")]
    overlaid = list(OverlaidImages(images, [(kept, (0, 0, 8, 8))] * 2, scale=8))
    assert isinstance(overlaid[0], Image.Image) and overlaid[1] == NotFinite("latents")


# --- on the tiny models -----------------------------------------------------------------------------------------


class Batches:
    """A planned and encoded run whose rows the test hands to the generator itself, batch by batch."""

    def __init__(self, folder: Path, model: str, rows: list[dict]):
        manifest = write_manifest(folder / "m.parquet", rows)
        self.plan = plan_run(RunConfig(str(manifest), str(folder / "out"), model=model, device="cpu"))
        encode_stage(self.plan)
        self.generator = generator_for(self.plan)
        self.rows = self.plan.family.cached_rows(self.plan.cache, self.plan.is_edit)
        self.requests = {request.id: request for request in self.plan.todo}

    def generate(self, ids: list[str], nan_prompt: str | None = None) -> dict:
        """The rows' images (or NotFinite) by id; `nan_prompt`'s row with a NaN in its prompt embedding."""
        items = [self.rows.resolve(self.requests[row_id]) for row_id in ids]
        loaded = [self.rows.load(item) for item in items]
        prompts = [row.prompt for row in loaded]
        if nan_prompt is not None:
            position = ids.index(nan_prompt)
            prompts[position] = prompts[position].clone()
            prompts[position][0, 0] = float("nan")
        requests = [row.request for row in loaded]
        negatives = [row.negative for row in loaded] if requests[0].uses_cfg else None
        images = self.generator.generate(requests, prompts, negatives, self.rows.conditions(loaded, items))
        return dict(zip(ids, self.rows.finished(images, loaded), strict=True))


def same_pixels(first, second) -> bool:
    return isinstance(first, Image.Image) and np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("model", ["tiny", "tiny-2.1"])
def test_a_row_not_finite_fails_alone_and_its_batch_mates_are_unchanged(tmp_path, tiny_model, model):
    write_nan_lora(model, tmp_path / NAN_LORA)
    rows = [
        small_row("a", "a red fox in the snow", seed=1),
        small_row("bad", "a lighthouse at dusk, oil paint", seed=2),
        small_row("b", "a bowl of lemons", seed=3),
        small_row("nan-adapter", "a red fox in the snow", seed=1, loras=[{"path": NAN_LORA, "scale": 1.0}]),
        small_row("nan-adapter-2", "a bowl of lemons", seed=3, loras=[{"path": NAN_LORA, "scale": 1.0}]),
    ]
    batches = Batches(tmp_path, model, rows)
    try:
        alone = batches.generate(["a", "b"])
        with_bad = batches.generate(["a", "bad", "b"], nan_prompt="bad")
        adapter = batches.generate(["nan-adapter", "nan-adapter-2"])  # the NaN adapter fused for the batch
        after = batches.generate(["a", "b"])  # and taken out again exactly: no NaN left in the weights
    finally:
        release_generator()
    assert with_bad["bad"] == NotFinite("latents")
    assert adapter == {"nan-adapter": NotFinite("latents"), "nan-adapter-2": NotFinite("latents")}
    for row_id in ("a", "b"):
        assert same_pixels(with_bad[row_id], alone[row_id]), row_id
        assert same_pixels(after[row_id], alone[row_id]), row_id


def test_a_row_whose_decoded_pixels_are_not_finite_names_the_decode(tmp_path, tiny_model, monkeypatch):
    """Finite latents the VAE turns into NaN (as an fp16 overflow in the decoder would): the pixels' stage."""
    batches = Batches(tmp_path, "tiny", [small_row("a", "a red fox", seed=1), small_row("b", "a kite", seed=2)])
    vae = batches.generator.pipe.vae
    decode = vae.decode

    def overflowing(latents, **kwargs):
        output = decode(latents, **kwargs)
        output[0][1, 0, 0, 0, 0] = float("nan")  # row b's first pixel
        return output

    monkeypatch.setattr(vae, "decode", overflowing)
    try:
        images = batches.generate(["a", "b"])
    finally:
        release_generator()
    assert isinstance(images["a"], Image.Image) and images["b"] == NotFinite("pixels")


def test_a_run_records_a_row_not_finite_as_failed_and_writes_no_image(tmp_path, tiny_model):
    write_nan_lora("tiny", tmp_path / NAN_LORA)
    rows = [
        small_row("a", "a red fox in the snow", seed=1),
        small_row("nan-adapter", "a red fox in the snow", seed=1, loras=[{"path": NAN_LORA, "scale": 1.0}]),
        small_row("b", "a bowl of lemons", seed=3),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    run(RunConfig(str(manifest), str(output), batch_size=3, device="cpu"))
    results = {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}
    assert results["nan-adapter"]["status"] == "failed"
    assert "not finite" in results["nan-adapter"]["error"]
    assert not (output / "images" / "nan-adapter.png").exists()
    for row_id in ("a", "b"):
        assert results[row_id]["status"] == "ok", results[row_id]["error"]
        assert (output / "images" / f"{row_id}.png").exists()
