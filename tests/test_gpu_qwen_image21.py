"""Qwen-Image-2.1 on a CUDA GPU (run there with `pytest -m gpu`): the tiny 2.1 model in bf16 through the CLI, a
row's image against diffusers' pipeline for that row alone, alone and batched, compiled and eager, and fp8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import release_generator
from qwen_batch.weights.model_source import resolve_model
from tests.test_qwen_image21 import _rules, diffusers_alone, make_image, row, write_manifest

pytestmark = pytest.mark.gpu

TOLERANCE = 2  # of 255

ROWS = [
    row("short", "a red fox", seed=1),
    row("long", "a lighthouse on a cliff at dusk, waves below, gulls, warm light in the windows", seed=2),
    row("guided", "a bowl of lemons", negative_prompt="blurry", true_cfg_scale=3.0, seed=3),
    row("image", "the same scene in winter", images=["img/photo.png"], seed=4),
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, tiny_model):  # tiny_model: the session's QWEN_BATCH_HOME, set before this module runs
    folder = tmp_path_factory.mktemp("gpu-21")
    (folder / "img").mkdir()
    make_image(folder / "img" / "photo.png", (96, 64), 1)
    return write_manifest(folder / "rows.parquet", ROWS)


@pytest.mark.parametrize("compile", ["off", "on"])
def test_rows_match_diffusers_alone_and_batched_in_bf16(manifest, tmp_path, compile):
    for batch_size in (1, 4):
        output = tmp_path / f"b{batch_size}"
        arguments = ["run", str(manifest), "-o", str(output), "--model", "tiny-2.1", "--device", "cuda", "-q"]
        assert main([*arguments, "--batch-size", str(batch_size), "--compile", compile]) == 0
    release_generator()
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(resolve_model("tiny-2.1").location, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    worst = {}
    for request in read_manifest(str(manifest), family_rules=_rules()).requests:
        reference = np.asarray(diffusers_alone(pipe, request, None), dtype=np.int16)
        for batch_size in (1, 4):
            with Image.open(tmp_path / f"b{batch_size}" / "images" / f"{request.id}.png") as image:
                ours = np.asarray(image, dtype=np.int16)
            worst[(request.id, batch_size)] = int(np.abs(ours - reference).max())
    print(f"compile {compile}: largest difference to diffusers alone, per (row, batch size): {worst}")
    assert max(worst.values()) <= TOLERANCE, worst


def test_fp8_runs_and_stays_close_to_bf16(manifest, tmp_path):
    outputs = {}
    for mode in ("bf16", "fp8"):
        output = tmp_path / mode
        arguments = ["run", str(manifest), "-o", str(output), "--model", "tiny-2.1", "--device", "cuda", "-q"]
        assert main([*arguments, "--memory-mode", mode, "--batch-size", "4"]) == 0
        outputs[mode] = output
    for row_ in ROWS:
        images = [
            np.asarray(Image.open(outputs[m] / "images" / f"{row_['id']}.png"), dtype=np.float64) for m in outputs
        ]
        mse = ((images[0] - images[1]) ** 2).mean()
        psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
        print(f"{row_['id']}: fp8 vs bf16 PSNR {psnr:.1f} dB")
        assert psnr > 20, (row_["id"], psnr)
