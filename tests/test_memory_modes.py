"""Each memory mode's wiring on the tiny model: what runs on the CPU here, the GPU-only modes behind
the `gpu` marker. Offload and sequential move weights, never the arithmetic: their output must equal
the resident one exactly; fp8 keeps the sensitive layers in bf16 and stays close."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.memory.placement import (
    COMPILE_CACHE_ENV,
    Placement,
    place_text_encoder,
    place_transformer,
    use_compile_cache,
)
from qwen_batch.pipeline.denoise.text import FP8_TEXT_MULTIPLE, TEXT_BUCKET, pad_embeddings
from tests.support import small_row, write_manifest


def _transformer(tiny_model):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


def _forward(transformer, device="cpu"):
    generator = torch.Generator("cpu").manual_seed(0)
    hidden = torch.randn(2, 16, 64, generator=generator).to(device)
    text = torch.randn(2, 5, transformer.config.joint_attention_dim, generator=generator).to(device)
    with torch.inference_mode():
        return transformer(
            hidden_states=hidden,
            timestep=torch.full((2,), 0.5, device=device),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0].cpu()


def test_fp8_stores_block_linears_in_fp8_but_keeps_the_sensitive_ones(tiny_model):
    reference = _forward(_transformer(tiny_model))
    transformer = _transformer(tiny_model)
    done = place_transformer(transformer, Placement("fp8"), "cpu", torch.float32)  # no fp8 matmuls: storage
    assert "layerwise casting" in done
    block = transformer.transformer_blocks[0]
    assert block.img_mlp.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert block.img_mlp.net[2].weight.dtype == torch.float32  # img_mlp's last linear stays
    assert transformer.img_in.weight.dtype == torch.float32 and transformer.proj_out.weight.dtype == torch.float32
    output = _forward(transformer)
    relative = (output - reference).norm() / reference.norm()
    assert 0 < relative < 0.1, relative


def test_fp8_every_linear_puts_the_image_mlps_last_linear_in_fp8_too(tiny_model):
    reference = _forward(_transformer(tiny_model))
    guarded = _transformer(tiny_model)
    place_transformer(guarded, Placement("fp8"), "cpu", torch.float32)
    transformer = _transformer(tiny_model)
    done = place_transformer(transformer, Placement("fp8", fp8_every_linear=True), "cpu", torch.float32)
    assert "img_mlp" not in done and "embedders in bf16" in done  # the placement line says what stays
    assert transformer.transformer_blocks[0].img_mlp.net[2].weight.dtype == torch.float8_e4m3fn
    assert transformer.img_in.weight.dtype == torch.float32 and transformer.proj_out.weight.dtype == torch.float32
    output = _forward(transformer)
    assert not torch.equal(output, _forward(guarded))
    relative = (output - reference).norm() / reference.norm()
    assert 0 < relative < 0.1, relative


def test_fp8_every_linear_outside_fp8_says_it_does_nothing(caplog):
    Placement("bf16", fp8_every_linear=True)
    assert "applies to the fp8 modes only: the transformer runs in bf16" in caplog.text


@pytest.mark.parametrize("mode", ["offload", "sequential"])
def test_offload_modes_move_weights_not_arithmetic(tiny_model, mode):
    reference = _forward(_transformer(tiny_model))
    transformer = _transformer(tiny_model)
    place_transformer(transformer, Placement(mode), "cpu", torch.float32)
    assert torch.equal(_forward(transformer), reference)


def test_the_text_encoder_drops_its_lm_head_and_keeps_its_hidden_states(tiny_model):
    from transformers import Qwen2_5_VLForConditionalGeneration

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, subfolder="text_encoder").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    place_text_encoder(encoder, "bf16", "cpu", torch.float32)
    assert isinstance(encoder.lm_head, torch.nn.Identity)
    with torch.inference_mode():
        assert torch.equal(encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1], before)


def test_ragged_text_is_padded_to_a_bucket_and_even_text_is_not_masked():
    ragged, mask = pad_embeddings([torch.ones(3, 8), torch.ones(70, 8)], "cpu", torch.float32)
    assert ragged.shape[1] == 2 * TEXT_BUCKET and mask.sum(dim=1).tolist() == [3, 70]
    even, no_mask = pad_embeddings([torch.ones(5, 8), torch.ones(5, 8)], "cpu", torch.float32)
    assert even.shape[1] == 5 and no_mask is None


def test_under_fp8_matmuls_even_short_text_is_padded_to_a_whole_bucket():
    """cuBLASLt refused the fp8 GEMM of the text MLP's 12,288-wide down-projection for 6 rows (H200)."""
    short, mask = pad_embeddings([torch.ones(5, 8), torch.ones(5, 8)], "cpu", torch.float32, FP8_TEXT_MULTIPLE)
    assert short.shape[1] == TEXT_BUCKET and mask.sum(dim=1).tolist() == [5, 5]
    exact, no_mask = pad_embeddings([torch.ones(128, 8)], "cpu", torch.float32, FP8_TEXT_MULTIPLE)
    assert exact.shape[1] == 128 and no_mask is None
    ragged, _ = pad_embeddings([torch.ones(3, 8), torch.ones(70, 8)], "cpu", torch.float32, FP8_TEXT_MULTIPLE)
    assert ragged.shape[1] == 2 * TEXT_BUCKET


def test_compile_cache_goes_to_the_folder_asked_for_else_under_the_home(tmp_path, monkeypatch, qwen_batch_home):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert use_compile_cache(None) == qwen_batch_home / "compile-cache"
    assert use_compile_cache(str(tmp_path / "cc")) == tmp_path / "cc"
    assert (tmp_path / "cc").is_dir()
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "cc")


@pytest.mark.parametrize("every_linear", [False, True])
def test_run_in_fp8_on_the_cpu_writes_images(tmp_path, tiny_model, capsys, caplog, every_linear):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    output = tmp_path / "out"
    flags = ["--memory-mode", "fp8", "-q"] + (["--fp8-every-linear"] if every_linear else [])
    with caplog.at_level("INFO", logger="qwen_batch.run.engine"):
        assert main(["run", str(manifest), "-o", str(output), "--device", "cpu", *flags]) == 0
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["ok", "ok"]
    placed = [record.getMessage() for record in caplog.records if "denoise: transformer fp8" in record.getMessage()]
    assert len(placed) == 1 and ("img_mlp.net.2" in placed[0]) is not every_linear, placed


def test_offload_on_the_cpu_is_a_usage_error(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat")])
    assert main(["run", str(manifest), "-o", str(tmp_path / "o"), "--device", "cpu", "--memory-mode", "offload"]) == 2
    assert "streams weights from host RAM to a GPU" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.parquet").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8 --fp8-every-linear", "offload", "sequential"])
def test_every_mode_generates_on_the_gpu(tmp_path, tiny_model, mode):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    output = tmp_path / mode.split()[0]
    flags = ["--memory-mode", *mode.split(), "-q"]
    assert main(["run", str(manifest), "-o", str(output), "--device", "cuda", *flags]) == 0
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for row in rows:  # a NaN anywhere in the batch decodes to a flat image
        with Image.open(row["image"]) as image:
            assert np.asarray(image).std() > 5, f"{mode}: flat (NaN) image for row {row['id']}"
