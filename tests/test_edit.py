"""Edit manifests: the same staged pipeline with Qwen-Image-Edit and Edit-Plus (tiny models, CPU).

The contract: a row's output equals diffusers' `QwenImageEditPipeline` (or `QwenImageEditPlusPipeline`)
on the same input image, instruction and `torch.Generator("cpu").manual_seed(seed)`, within 2/255 per
pixel, alone or in a batch. Then: bad input images fail their row only, resume skips finished rows,
and stage 2 never reads an input image.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.errors import ConfigError, ManifestError
from qwen_batch.manifest import read_manifest
from qwen_batch.outputs.png import read_png_metadata
from qwen_batch.run.engine import RunConfig, denoise_stage, encode_stage, finalize, plan_run, run
from qwen_batch.weights.model_source import resolve_model
from tests.support import differing_images, diffusers_reference, fa4_layout, pixels

TOLERANCE = 2  # of 255


def make_input(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> Path:
    """A smooth, seeded RGB picture (not noise, so the VAE latents are not degenerate)."""
    generator = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    channels = [np.sin(x * generator.uniform(2, 8) + y * generator.uniform(2, 8) + c) for c in range(3)]
    array = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path


def write_edit_manifest(path: Path, rows: list[dict]) -> Path:
    names = list(dict.fromkeys(name for row in rows for name in row))
    types = {
        "seed": pa.int64(),
        "num_inference_steps": pa.int64(),
        "width": pa.int64(),
        "height": pa.int64(),
        "true_cfg_scale": pa.float64(),
        "images": pa.list_(pa.string()),
    }
    table = pa.table({name: pa.array([row.get(name) for row in rows], type=types.get(name)) for name in names})
    pq.write_table(table, path)
    return path


def edit_row(row_id: str, image: str, prompt: str, **overrides) -> dict:
    return {"id": row_id, "image": image, "prompt": prompt, "num_inference_steps": 2, "seed": 7, **overrides}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("edit-inputs")
    (folder / "img").mkdir()
    make_input(folder / "img" / "square.png", (256, 256), 1)
    make_input(folder / "img" / "square2.png", (256, 256), 2)
    make_input(folder / "img" / "wide.jpg", (320, 192), 3, "JPEG")
    make_input(folder / "img" / "tall.webp", (192, 320), 4, "WEBP")
    return folder


# The input is always encoded at about 1 megapixel (as diffusers does); small outputs keep the VAE
# decode cheap on the CPU, and two rows take the size from their input.
SMALL = {"width": 256, "height": 256}
ROWS = [
    edit_row("red", "img/square.png", "make it red", seed=1),
    edit_row("blue", "img/square2.png", "make the whole picture blue and add a moon", seed=2, **SMALL),
    edit_row("neg", "img/square.png", "add snow", negative_prompt="blurry, dark", seed=3, **SMALL),
    edit_row("nocfg", "img/square2.png", "turn it green", true_cfg_scale=1.0, seed=4, **SMALL),
    edit_row("wide", "img/wide.jpg", "a sunset sky", seed=5),
    edit_row("sized", "img/tall.webp", "make it brighter", width=256, height=384, seed=6),
]


def diffusers_edit(pipe, request, images: list[Image.Image]):
    return diffusers_reference(pipe, request, image=images if len(images) > 1 else images[0])


def as_png(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


@pytest.fixture(scope="module")
def edit_runs(inputs):
    manifest = write_edit_manifest(inputs / "edits.parquet", ROWS)
    outputs = {}
    for batch_size in (1, 3):
        output = inputs / f"out-batch{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu"))
        assert summary.exit_code == 0, summary.problems
        assert summary.generated == len(ROWS)
        outputs[batch_size] = output
    return manifest, outputs


def test_edit_rows_match_diffusers_edit_pipeline_alone_and_batched(edit_runs):
    from diffusers import QwenImageEditPipeline

    manifest, outputs = edit_runs
    pipe = QwenImageEditPipeline.from_pretrained(resolve_model("tiny-edit").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        with Image.open(request.images[0]) as opened:
            reference = pixels(as_png(diffusers_edit(pipe, request, [opened.convert("RGB")])))
        for batch_size, output in outputs.items():
            ours = pixels(output / "images" / f"{request.id}.png")
            assert ours.shape == reference.shape, (request.id, batch_size)
            assert np.abs(ours - reference).max() <= TOLERANCE, (request.id, batch_size)


def test_edit_rows_with_the_text_stream_packed_are_the_padded_ones(edit_runs, tmp_path, monkeypatch):
    """The default under FlashAttention-4: edit rows' text (instruction plus the VL tokens of the input,
    conditional and negative of different lengths) runs packed to its real tokens, and the images are
    those of the padded path."""
    manifest, outputs = edit_runs
    packs = fa4_layout(monkeypatch, packed=True)
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=3, device="cpu"))
    assert summary.exit_code == 0 and summary.generated == len(ROWS), summary.problems
    assert packs
    assert not differing_images([row["id"] for row in ROWS], tmp_path / "out", outputs[3], TOLERANCE)


def test_edit_outputs_differ_and_follow_the_input_size(edit_runs):
    _, outputs = edit_runs
    images = outputs[3] / "images"
    blue, snow = pixels(images / "blue.png"), pixels(images / "neg.png")
    assert np.abs(blue - snow).max() > 20  # guards the contract test against a constant output
    with Image.open(images / "wide.png") as wide, Image.open(images / "sized.png") as sized:
        # 320x192 at about 1024x1024 area, multiples of 32, as diffusers computes it; explicit sizes win.
        assert wide.size == (1312, 800)
        assert sized.size == (256, 384)


def test_results_record_inputs_and_their_hashes(edit_runs, inputs):
    import hashlib

    _, outputs = edit_runs
    table = pq.read_table(outputs[3] / "results.parquet").to_pylist()
    by_id = {row["id"]: row for row in table}
    assert [row["id"] for row in table] == [row["id"] for row in ROWS]
    red = by_id["red"]
    source = inputs / "img" / "square.png"
    assert red["status"] == "ok"
    assert red["input_images"] == [str(source.resolve())]
    assert red["input_sha256"] == [hashlib.sha256(source.read_bytes()).hexdigest()]
    assert (by_id["wide"]["width"], by_id["wide"]["height"]) == (1312, 800)
    metadata = read_png_metadata((outputs[3] / "images" / "red.png").read_bytes())
    assert metadata["input_sha256"] == red["input_sha256"]
    assert metadata["images"] == red["input_images"]


def test_second_run_skips_everything_and_loads_no_model(edit_runs):
    manifest, outputs = edit_runs
    summary = run(RunConfig(str(manifest), str(outputs[3]), batch_size=3, device="cpu"))
    assert summary.generated == 0 and summary.skipped == len(ROWS) and summary.exit_code == 0
    assert summary.encode.encoded == 0


def test_stage_two_never_reads_the_input_images(inputs, tmp_path):
    """Encode, then take the input images away: the denoise stage still makes every image."""
    folder = tmp_path / "job"
    shutil.copytree(inputs / "img", folder / "img")
    manifest = write_edit_manifest(folder / "m.parquet", ROWS[1:3])
    plan = plan_run(RunConfig(str(manifest), str(folder / "out"), device="cpu"))
    encoded = encode_stage(plan)
    assert encoded.encoded == 4  # two rows, instruction and negative prompt each, seen with their image
    shutil.rmtree(folder / "img")
    summary = finalize(plan, encoded, denoise_stage(plan))
    assert summary.generated == 2 and summary.exit_code == 0


def test_bad_input_images_fail_their_row_and_the_others_run(inputs, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(inputs / "img", folder / "img")
    (folder / "img" / "text.png").write_text("not an image")
    good = (folder / "img" / "square.png").read_bytes()
    (folder / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (600, 600), "white").save(folder / "img" / "big.png")  # over the pixel limit below
    outside = tmp_path / "elsewhere.png"
    make_input(outside, (64, 64), 9)
    rows = [
        edit_row("good", "img/square.png", "make it red", **SMALL),
        edit_row("missing", "img/nope.png", "x", **SMALL),
        edit_row("text", "img/text.png", "x", **SMALL),
        edit_row("truncated", "img/truncated.png", "x", **SMALL),
        edit_row("bomb", "img/big.png", "x", **SMALL),
        edit_row("outside", str(outside), "x", **SMALL),
        edit_row("escape", "../elsewhere.png", "x", **SMALL),
        edit_row("etc", "file:///etc/passwd", "x", **SMALL),
    ]
    manifest = write_edit_manifest(folder / "m.parquet", rows)
    cache = str(tmp_path / "cache")  # shared by both runs below: the second encodes only its new rows
    summary = run(RunConfig(str(manifest), str(folder / "out"), device="cpu", max_input_pixels=300_000, cache=cache))
    assert summary.exit_code == 1
    results = {row["id"]: row for row in pq.read_table(folder / "out" / "results.parquet").to_pylist()}
    assert results["good"]["status"] == "ok"
    for row_id in ("missing", "text", "truncated", "bomb"):
        assert results[row_id]["status"] == "failed", row_id
    for row_id in ("outside", "escape", "etc"):
        assert results[row_id]["status"] == "invalid", row_id
        assert "outside the allowed input locations" in results[row_id]["error"]
    assert "300000" in results["bomb"]["error"].replace(",", "") or "pixel" in results["bomb"]["error"]
    assert "nope.png" in results["missing"]["error"]

    # The operator can allow another location explicitly.
    allowed = run(
        RunConfig(str(manifest), str(folder / "out2"), device="cpu", allow_inputs=(str(tmp_path),), cache=cache)
    )
    outcome = {row["id"]: row["status"] for row in pq.read_table(folder / "out2" / "results.parquet").to_pylist()}
    assert outcome["outside"] == "ok" and outcome["escape"] == "ok" and outcome["etc"] == "invalid"
    assert allowed.exit_code == 1


def test_multi_image_rows_match_diffusers_edit_plus(inputs, tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    rows = [
        {"id": "pair", "images": ["img/square.png", "img/wide.jpg"], "prompt": "put the two together", "seed": 1},
        {"id": "pair2", "images": ["img/square2.png", "img/wide.jpg"], "prompt": "swap colours", "seed": 2},
        {"id": "one", "images": ["img/tall.webp"], "prompt": "make it night", "seed": 3},
    ]
    for row in rows:
        row.update(num_inference_steps=2, **({} if row["id"] == "one" else SMALL))  # the pairs share a batch
    folder = tmp_path / "plus"
    shutil.copytree(inputs / "img", folder / "img")
    manifest = write_edit_manifest(folder / "m.parquet", rows)
    summary = run(RunConfig(str(manifest), str(folder / "out"), batch_size=2, device="cpu"))
    assert summary.exit_code == 0 and summary.generated == 3, summary.problems

    pipe = QwenImageEditPlusPipeline.from_pretrained(resolve_model("tiny-edit-plus").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        images = [Image.open(url).convert("RGB") for url in request.images]
        reference = pixels(as_png(diffusers_edit(pipe, request, images)))
        ours = pixels(folder / "out" / "images" / f"{request.id}.png")
        assert ours.shape == reference.shape, request.id
        assert np.abs(ours - reference).max() <= TOLERANCE, request.id


def test_task_detection_and_mismatched_models(inputs, tmp_path):
    manifest = write_edit_manifest(inputs / "detect.parquet", ROWS[:1])
    assert read_manifest(str(manifest)).task == "edit"
    with pytest.raises(ConfigError, match="text-to-image"):
        plan_run(RunConfig(str(manifest), str(tmp_path / "o"), model=str(resolve_model("tiny").location)))
    with pytest.raises(ManifestError, match="--task edit needs a column"):
        pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), tmp_path / "t2i.parquet")
        read_manifest(str(tmp_path / "t2i.parquet"), task="edit")
    with pytest.raises(ManifestError, match="--task edit"):
        read_manifest(str(manifest), task="generate")  # 'image' is a results column for text-to-image


def test_the_edit_encoder_follows_the_memory_mode(inputs, tmp_path):
    """fp8 storage for the VL encoder (as a small GPU gets it) still edits every row."""
    folder = tmp_path / "fp8"
    shutil.copytree(inputs / "img", folder / "img")
    manifest = write_edit_manifest(folder / "m.parquet", ROWS[1:2])
    plan = plan_run(RunConfig(str(manifest), str(folder / "out"), device="cpu", memory_mode="fp8"))
    assert plan.memory.encoder_mode == "fp8"
    summary = finalize(plan, encode_stage(plan), denoise_stage(plan))
    assert summary.generated == 1 and summary.exit_code == 0


def test_the_edit_encoder_out_of_gpu_memory_halves_its_batch(inputs, tmp_path, monkeypatch):
    from qwen_batch.pipeline.conditions.edit import EditEncoder

    original = EditEncoder.encode_texts
    sizes: list[int] = []

    def encode_texts(self, items):
        sizes.append(len(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(self, items)

    monkeypatch.setattr(EditEncoder, "encode_texts", encode_texts)
    folder = tmp_path / "oom"
    shutil.copytree(inputs / "img", folder / "img")
    manifest = write_edit_manifest(folder / "m.parquet", [{**row, "true_cfg_scale": 1.0} for row in ROWS[1:4]])
    summary = run(RunConfig(str(manifest), str(folder / "out"), device="cpu", encode_batch_size=8))
    assert summary.exit_code == 0 and summary.generated == 3
    assert sizes == [3, 2, 1, 1, 1]  # halved down to single instructions, every row edited
