"""LoRA adapters on Qwen-Image-2.1 rows (the tiny 2.1 model, CPU).

The contract: a row with adapters equals diffusers' `QwenImage21Pipeline` called for that row alone with the same
adapters loaded through `load_lora_weights` and weighted with `set_adapters(names, weights)`, and the row's CPU
generator, within 2/255 per channel, alpha included, in a run of batches of 4 whose other rows use other adapter
sets or none. Then: the adapters really change the image, each set is fused once, the adapters are checked
against 2.1's own transformer (a Qwen-Image adapter makes only its row invalid, naming the file), and the layout
of a Qwen-Image transformer is what it was.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.adapters.loras import layout_of_config, transformer_layout
from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, run
from qwen_batch.tiny.lora import write_tiny_lora
from qwen_batch.weights.model_source import resolve_model
from tests.support import diffusers_adapters, small_row, write_manifest

TOLERANCE = 2  # of 255
MODEL = "tiny-2.1"


def lora(path: str, scale: float = 1.0) -> dict:
    return {"path": path, "scale": scale}


PROMPT = "A red fox running through a snowy birch forest under a full moon"
ROWS = [
    small_row("style", PROMPT, seed=1, loras=[lora("style.safetensors")]),
    small_row("plain", PROMPT, seed=1),
    small_row("style-2", "a lighthouse on a cliff at dusk, waves below, oil paint", seed=2, loras=[lora("style.safetensors")]),
    small_row("half", PROMPT, seed=1, loras=[lora("style.safetensors", 0.5)]),
    small_row("detail", PROMPT, seed=1, loras=[lora("detail.safetensors")]),
    small_row("mix", "a cat", seed=3, loras=[lora("detail.safetensors", 0.7), lora("style.safetensors", -0.5)]),
    small_row("guided-style", "a bowl of lemons", negative_prompt="blurry, dark", true_cfg_scale=3.0, seed=4, loras=[lora("style.safetensors")]),
    small_row("plain-2", "a bowl of lemons", seed=4),
    small_row("qwen-image-adapter", PROMPT, seed=1, loras=[lora("qwen-image.safetensors")]),
]  # fmt: skip
INVALID = {"qwen-image-adapter"}
# style x1.0 (three rows in two batch kinds), style x0.5, detail, detail x0.7 + style x-0.5: four sets.
ADAPTER_SETS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    """Two 2.1 adapters (`detail` in ComfyUI's layout, which diffusers' converter reads) and a Qwen-Image one.
    After `tiny_model`, which points QWEN_BATCH_HOME at the session's home: the run and the diffusers baseline
    then use the same tiny 2.1 model (module fixtures run before the per-test home is set)."""
    folder = tmp_path_factory.mktemp("adapters-21")
    write_tiny_lora(MODEL, folder / "style.safetensors", rank=4, seed=1)
    write_tiny_lora(MODEL, folder / "detail.safetensors", rank=8, layout="comfyui", seed=2)
    write_tiny_lora("tiny", folder / "qwen-image.safetensors", rank=4, seed=3)
    return folder


@pytest.fixture(scope="module")
def outcome(folder):
    manifest = write_manifest(folder / "rows.parquet", ROWS)
    output = folder / "out"
    summary = run(RunConfig(str(manifest), str(output), model=MODEL, batch_size=4, device="cpu"))
    return manifest, output, summary


def rgba(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGBA", image.mode
        return np.asarray(image, dtype=np.int16)


def diffusers_alone(pipe, request) -> np.ndarray:
    guidance = {"negative_prompt": request.negative_prompt} if request.uses_cfg else {}
    with diffusers_adapters(pipe, request):
        image = pipe(
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            true_cfg_scale=request.true_cfg_scale,
            num_inference_steps=request.num_inference_steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            **guidance,
        ).images[0]
    assert image.mode == "RGBA"
    return np.asarray(image, dtype=np.int16)


def test_the_run_generates_every_row_but_the_qwen_image_adapters(outcome):
    _, _, summary = outcome
    assert (summary.generated, summary.invalid, summary.exit_code) == (len(ROWS) - len(INVALID), len(INVALID), 1)


def test_rows_with_adapters_match_diffusers_alone(outcome):
    from diffusers import QwenImage21Pipeline

    manifest, output, _ = outcome
    pipe = QwenImage21Pipeline.from_pretrained(resolve_model(MODEL).location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    requests = read_manifest(str(manifest), family_rules=_rules()).requests
    assert {request.id for request in requests} == {row["id"] for row in ROWS}
    for request in requests:
        if request.id in INVALID:
            continue
        expected = diffusers_alone(pipe, request)
        ours = rgba(output / "images" / f"{request.id}.png")
        assert ours.shape == expected.shape, request.id
        assert np.abs(ours - expected).max() <= TOLERANCE, request.id


def test_adapters_and_scales_really_change_the_image(outcome):
    """Guards the test above: an adapter that changed nothing (or was never fused) would pass it."""
    _, output, _ = outcome
    image = {name: rgba(output / "images" / f"{name}.png") for name in ("plain", "style", "half", "detail")}
    for name in ("style", "half", "detail"):
        assert np.abs(image[name] - image["plain"]).max() > 10 * TOLERANCE, name
    assert np.abs(image["half"] - image["style"]).max() > 10 * TOLERANCE
    assert np.abs(image["detail"] - image["style"]).max() > 10 * TOLERANCE


def test_each_adapter_set_is_fused_once(outcome):
    _, _, summary = outcome
    assert summary.denoise.adapter_fuses == ADAPTER_SETS


def test_an_adapter_for_another_model_makes_only_its_row_invalid_naming_it(outcome, folder):
    _, output, _ = outcome
    results = {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}
    assert {row_id for row_id, row in results.items() if row["status"] != "ok"} == INVALID
    reason = results["qwen-image-adapter"]["error"]
    assert reason.startswith("loras[0]"), reason
    assert str(folder / "qwen-image.safetensors") in reason
    assert "matches no layer" in reason and "another model" in reason, reason
    assert not (output / "images" / "qwen-image-adapter.png").exists()


def test_the_layout_is_the_models_own_transformers():
    layout_21 = transformer_layout(resolve_model(MODEL))
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.gate_layer"} <= set(layout_21)
    assert not any("add_q_proj" in name or "txt_mlp" in name for name in layout_21)
    config = resolve_model("tiny").transformer_config()
    layout = transformer_layout(resolve_model("tiny"))
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.txt_mlp.net.2"} <= set(layout)
    # A config that names no class is Qwen-Image's, as before.
    unnamed = {key: value for key, value in config.items() if key != "_class_name"}
    assert layout_of_config(unnamed) == layout


def _rules():
    from qwen_batch.families.qwen_image21 import FAMILY

    return FAMILY.rows
