"""On a CUDA GPU (`pytest -m gpu`): transformer files and the host-lean modes with the tiny model.

fp8 files computed with fp8 matmuls, GGUF resident and streamed, offload with a pinned budget smaller
than the model (the rest streamed from the memory-mapped file), fp8-offload. Streaming moves weights,
never the arithmetic: a mode and its streamed twin give the same images exactly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.run.engine import RunConfig, release_generator, run
from tests.support import differing_images, small_row, write_manifest

pytestmark = pytest.mark.gpu

ROWS = [
    small_row("fox", "A red fox running through a snowy birch forest under a full moon", seed=1),
    small_row("cat", "a cat", negative_prompt="blurry, low quality", seed=2),
    small_row("nocfg", "a lighthouse in a storm", true_cfg_scale=1.0, seed=3),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("gpu-files")
    written = {}
    for layout, name in (("fp8", "tiny-fp8.safetensors"), ("gguf-q8_0", "tiny-q8.gguf"), ("gguf-q4_0", "tiny-q4.gguf")):
        assert main(["tiny-model", str(folder / name), "--format", layout, "-q"]) == 0
        written[layout] = folder / name
    return written


def generate(tmp_path, name: str, **options) -> tuple:
    release_generator()
    manifest = write_manifest(tmp_path / f"{name}.parquet", ROWS)
    summary = run(RunConfig(str(manifest), str(tmp_path / name), device="cuda", **options))
    assert summary.exit_code == 0 and summary.generated == len(ROWS), name
    for row in pq.read_table(tmp_path / name / "results.parquet").to_pylist():
        with Image.open(row["image"]) as image:  # a NaN anywhere decodes to a flat image
            assert np.asarray(image).std() > 5, f"{name}: flat image for {row['id']}"
    return summary, tmp_path / name


def test_an_fp8_file_runs_as_stored_with_fp8_matmuls(tmp_path, files, caplog):
    from qwen_batch.memory.placement import fp8_compute_available

    with caplog.at_level("INFO", logger="qwen_batch.run.engine"):
        generate(tmp_path, "fp8", transformer=str(files["fp8"]), memory_mode="fp8")
    placed = " ".join(record.getMessage() for record in caplog.records if "denoise: transformer" in record.getMessage())
    assert "fp8 as stored in the file" in placed
    assert ("fp8 matmuls" in placed) is fp8_compute_available("cuda")


@pytest.mark.parametrize("layout", ["gguf-q8_0", "gguf-q4_0"])
def test_gguf_resident_and_streamed_give_the_same_images(tmp_path, files, layout):
    _, resident = generate(tmp_path, f"{layout}-resident", transformer=str(files[layout]), memory_mode="gguf")
    _, streamed = generate(tmp_path, f"{layout}-offload", transformer=str(files[layout]), memory_mode="offload")
    assert not differing_images([row["id"] for row in ROWS], resident, streamed, 0)


def test_offload_with_a_small_pinned_budget_streams_the_rest_from_the_file(tmp_path, monkeypatch):
    """Pinned for a third of the blocks only: the others are read from the memory-mapped checkpoint and pinned
    on the fly as they stream. Same images as everything pinned."""
    import qwen_batch.memory.placement as memory_modes

    _, pinned = generate(tmp_path, "all-pinned", memory_mode="offload")
    original = memory_modes.decide_run_memory

    def budgeted(*args, **kwargs):
        memory = original(*args, **kwargs)
        return replace(memory, denoiser=replace(memory.denoiser, pinned_bytes=60_000))

    monkeypatch.setattr("qwen_batch.run.engine.decide_run_memory", budgeted)
    _, partial = generate(tmp_path, "partly-pinned", memory_mode="offload")
    assert not differing_images([row["id"] for row in ROWS], pinned, partial, 0)


def test_fp8_offload_streams_fp8_weights_and_stays_close_to_bf16(tmp_path):
    from tests.support import pixels

    _, exact = generate(tmp_path, "bf16", memory_mode="bf16", compile="off")
    _, fp8 = generate(tmp_path, "fp8-offload", memory_mode="fp8-offload")
    for row in ROWS:
        difference = np.abs(pixels(exact / "images" / f"{row['id']}.png") - pixels(fp8 / "images" / f"{row['id']}.png"))
        assert difference.mean() < 12, row["id"]


def test_streamed_loading_puts_every_weight_on_the_gpu_without_a_host_copy(tiny_model):
    from diffusers import QwenImageTransformer2DModel

    from qwen_batch.memory.placement import Placement
    from qwen_batch.memory.streamed_load import load_transformer
    from qwen_batch.weights.transformer_file import published_weights

    config = QwenImageTransformer2DModel.load_config(tiny_model, subfolder="transformer")
    reference = QwenImageTransformer2DModel.from_pretrained(
        tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    loaded = load_transformer(published_weights(tiny_model, config), Placement("bf16"), "cuda", torch.bfloat16).model
    for name, tensor in reference.state_dict().items():
        ours = loaded.state_dict()[name]
        assert ours.is_cuda and torch.equal(ours.cpu(), tensor), name
