"""The correctness contract: a row's image is the same alone, in any batch, and through diffusers.

Within 2/255 per pixel, on the CPU in float32, for the tiny model. This is what makes batching and
the staged encode/denoise split safe: they change speed, never the picture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, run
from tests.support import differing_images, diffusers_reference, fa4_layout, pixels, small_row, write_manifest

TOLERANCE = 2  # of 255

ROWS = [
    # Different prompt lengths and negative prompts force padding and masks inside a batch.
    small_row("fox", "A red fox running through a snowy birch forest under a full moon, cinematic light", seed=1),
    small_row("cat", "a cat", negative_prompt="blurry, low quality, watermark", seed=2),
    small_row("zh", "一只在月光下奔跑的狐狸", seed=3),
    small_row("nocfg", "a lighthouse in a storm", true_cfg_scale=1.0, seed=4),
    small_row("wide", "a desert caravan at sunset", width=384, height=256, seed=5),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The same manifest generated alone (batch 1) and in batches of 2 and 4."""
    folder = tmp_path_factory.mktemp("contract")
    manifest = write_manifest(folder / "m.parquet", ROWS)
    outputs = {}
    for batch_size in (1, 2, 4):
        output = folder / f"batch{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu"))
        assert summary.generated == len(ROWS) and summary.exit_code == 0
        outputs[batch_size] = output
    return manifest, outputs


@pytest.mark.parametrize("batch_size", [2, 4])
def test_image_does_not_depend_on_the_batch(runs, batch_size):
    _, outputs = runs
    for row in ROWS:
        alone = pixels(outputs[1] / "images" / f"{row['id']}.png")
        batched = pixels(outputs[batch_size] / "images" / f"{row['id']}.png")
        assert np.abs(alone - batched).max() <= TOLERANCE, row["id"]


def test_images_match_diffusers_pipeline(runs, tiny_model):
    from diffusers import QwenImagePipeline

    manifest_path, outputs = runs
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest_path)).requests:
        reference = pixels(diffusers_reference(pipe, request))
        ours = pixels(outputs[4] / "images" / f"{request.id}.png")
        assert np.abs(ours - reference).max() <= TOLERANCE, request.id


def test_rows_really_differ(runs):
    """Guards the tests above: identical images everywhere would pass them trivially."""
    _, outputs = runs
    fox, cat = (pixels(outputs[1] / "images" / f"{name}.png") for name in ("fox", "cat"))
    assert np.abs(fox - cat).max() > 20
    assert fox.std() > 5


@pytest.mark.parametrize("lever", ["fa4 layout, text packed", "fa4 layout, text padded", "split CFG"])
def test_speed_levers_change_no_image(runs, tmp_path, monkeypatch, lever):
    """The throughput levers (docs/benchmarks.md) keep the contract: FlashAttention-4's layout (each
    row's real tokens a prefix; its masked stand-in here, as the CPU has no FlashAttention-4), with the
    text stream packed to its real tokens or padded, and CFG's halves as two forwards each give the
    same images as the default path."""
    import qwen_batch.pipeline.denoise.text

    packed = []
    if lever == "split CFG":
        monkeypatch.setattr(qwen_batch.pipeline.denoise.text, "CFG_LAYOUT", "split")
    else:
        packed = fa4_layout(monkeypatch, packed=lever.endswith("packed"))
    manifest, outputs = runs
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu"))
    assert summary.generated == len(ROWS)
    assert not differing_images([row["id"] for row in ROWS], tmp_path / "out", outputs[4], TOLERANCE)
    assert bool(packed) == (lever == "fa4 layout, text packed")
