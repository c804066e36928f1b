"""On a CUDA GPU (run there with `pytest -m gpu`): the engine in bf16, stage memory, batch invariance."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.run.engine import RunConfig, denoise_stage, encode_stage, finalize, plan_run, release_generator
from tests.support import diffusers_reference, small_row, write_manifest

pytestmark = pytest.mark.gpu

ROWS = [
    small_row("fox", "A red fox running through a snowy birch forest under a full moon", seed=1),
    small_row("cat", "a cat", negative_prompt="blurry, low quality", seed=2),
    small_row("zh", "一只在月光下奔跑的狐狸", seed=3),
    small_row("wide", "a desert caravan at sunset", width=384, height=256, seed=5),
]


def test_cli_runs_on_cuda_in_bf16(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    assert main(["run", str(manifest), "--output", str(tmp_path / "out"), "--device", "cuda"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"generated\s+4\n", printed) and "peak GPU (denoise)" in printed
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert all(row["status"] == "ok" for row in rows)
    with Image.open(rows[0]["image"]) as image:
        assert np.asarray(image).std() > 5, "bf16 on the GPU must not give flat (NaN) images"


def test_the_text_encoder_is_gone_from_the_gpu_before_the_transformer_loads(tmp_path, tiny_model):
    release_generator()
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), device="cuda"))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    encode = encode_stage(plan)
    assert encode.encoded == 6 and encode.peak_gpu_gib > 0  # 4 prompts, " " and one negative prompt
    assert torch.cuda.memory_allocated() - before < 2**20, "stage 1 must free the encoder"
    denoise = denoise_stage(plan)
    assert denoise.generated == 4
    finalize(plan, encode, denoise)


def test_batching_changes_images_no_more_than_the_common_recipe_differs_from_us(tmp_path, tiny_model):
    """In bf16 on a GPU, kernels round differently per shape, and the tiny random model amplifies
    rounding (diffusers' own bf16 and fp32 images differ by ~20/255 on average), so exact equality is
    not the contract here. The contract: batching moves an image no more than running the same row
    through diffusers' pipeline does (bench/consistency.py writes the full comparison)."""
    from diffusers import QwenImagePipeline

    from qwen_batch.manifest import read_manifest

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    for batch_size in (1, 4):
        output = str(tmp_path / f"b{batch_size}")
        assert (
            main(["run", str(manifest), "-o", output, "--device", "cuda", "-q", "--batch-size", str(batch_size)]) == 0
        )
    release_generator()
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    batching, recipe = [], []
    for request in read_manifest(str(manifest)).requests:
        alone, batched = (
            np.asarray(Image.open(tmp_path / f"b{size}" / "images" / f"{request.id}.png"), dtype=np.int16)
            for size in (1, 4)
        )
        reference = diffusers_reference(pipe, request)
        batching.append(np.abs(alone - batched).mean())
        recipe.append(np.abs(alone - np.asarray(reference, dtype=np.int16)).mean())
    print(f"mean |batch 1 - batch 4| {np.mean(batching):.2f}/255, mean |ours - diffusers| {np.mean(recipe):.2f}/255")
    assert np.mean(batching) <= 1.5 * np.mean(recipe) + 0.5
