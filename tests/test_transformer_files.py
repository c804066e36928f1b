"""The transformer from one file (`--transformer`): ComfyUI's fp8 layout, a bf16 single file, GGUF Q8_0 and Q4_0.

The contract, on the CPU with the tiny model: a row run with each file equals diffusers' own
`QwenImagePipeline` whose transformer was loaded by `QwenImageTransformer2DModel.from_single_file` (GGUF
through `GGUFQuantizationConfig`), within 2/255 per pixel, alone and batched. The streamed loader gives the
same weights, bit for bit, as `from_pretrained`. A changed file regenerates its rows, results and PNGs name
the file and its hash, and a file that cannot be used is a usage error (exit 2) naming the file and the
reason, before any model loads and with nothing written.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.manifest import read_manifest
from qwen_batch.outputs.png import PARAMETERS_KEY, read_png_metadata
from qwen_batch.run.engine import RunConfig, run
from tests.support import differing_images, diffusers_reference, pixels, small_row, write_manifest

TOLERANCE = 2  # of 255
FORMATS = {"bf16": "safetensors", "fp8": "safetensors", "gguf-q8_0": "gguf", "gguf-q4_0": "gguf"}
ROWS = [
    small_row("fox", "A red fox running through a snowy birch forest under a full moon", seed=1),
    small_row("cat", "a cat", negative_prompt="blurry, low quality", seed=2),
    small_row("nocfg", "a lighthouse in a storm", true_cfg_scale=1.0, seed=3),
    small_row("zh", "一只在月光下奔跑的狐狸", seed=4),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """The tiny model's transformer in each single-file layout, written by `qwen-batch tiny-model --format`."""
    folder = tmp_path_factory.mktemp("transformer-files")
    written = {}
    for layout, extension in FORMATS.items():
        path = folder / f"tiny-{layout}.{extension}"
        assert main(["tiny-model", str(path), "--format", layout, "-q"]) == 0
        written[layout] = path
    return written


@pytest.fixture(scope="module")
def runs(tmp_path_factory, files):
    """Each file's rows generated alone (batch 1) and batched (batch 4)."""
    folder = tmp_path_factory.mktemp("transformer-runs")
    manifest = write_manifest(folder / "m.parquet", ROWS)
    outputs = {}
    for layout, path in files.items():
        for batch_size in (1, 4):
            output = folder / f"{layout}-b{batch_size}"
            config = RunConfig(str(manifest), str(output), transformer=str(path), batch_size=batch_size, device="cpu")
            summary = run(config)
            assert summary.exit_code == 0 and summary.generated == len(ROWS), layout
            outputs[layout, batch_size] = output
    return manifest, outputs


def diffusers_single_file_pipeline(tiny_model, layout: str, path):
    """diffusers' pipeline with its transformer from `from_single_file`: the contract's reference."""
    from diffusers import GGUFQuantizationConfig, QwenImagePipeline, QwenImageTransformer2DModel
    from safetensors.torch import load_file

    common = {"config": str(tiny_model), "subfolder": "transformer"}
    if layout.startswith("gguf"):
        quantization = GGUFQuantizationConfig(compute_dtype=torch.float32)
        transformer = QwenImageTransformer2DModel.from_single_file(
            str(path), quantization_config=quantization, **common
        )
    elif layout == "fp8":  # ComfyUI's key prefix: diffusers maps Qwen-Image keys one to one, so it goes first
        state = {key.removeprefix("model.diffusion_model."): value for key, value in load_file(path).items()}
        transformer = QwenImageTransformer2DModel.from_single_file(state, torch_dtype=torch.float32, **common)
    else:
        transformer = QwenImageTransformer2DModel.from_single_file(str(path), torch_dtype=torch.float32, **common)
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layout", list(FORMATS))
def test_rows_from_each_file_equal_diffusers_from_single_file_alone_and_batched(runs, files, tiny_model, layout):
    manifest, outputs = runs
    pipe = diffusers_single_file_pipeline(tiny_model, layout, files[layout])
    for request in read_manifest(str(manifest)).requests:
        reference = np.asarray(diffusers_reference(pipe, request), dtype=np.int16)
        for batch_size in (1, 4):
            ours = pixels(outputs[layout, batch_size] / "images" / f"{request.id}.png")
            assert np.abs(ours - reference).max() <= TOLERANCE, (layout, batch_size, request.id)


def test_each_layout_really_loads_its_own_weights(runs):
    """The quantized files give other images than the bf16 one (the comparison above is not vacuous)."""
    _, outputs = runs
    ids = [row["id"] for row in ROWS]
    for layout in ("fp8", "gguf-q4_0"):
        assert differing_images(ids, outputs[layout, 1], outputs["bf16", 1], 0), layout


def test_streamed_loading_gives_from_pretrained_weights_bit_for_bit(tiny_model):
    from diffusers import QwenImageTransformer2DModel

    from qwen_batch.memory.placement import Placement
    from qwen_batch.memory.streamed_load import load_transformer
    from qwen_batch.weights.transformer_file import published_weights

    config = QwenImageTransformer2DModel.load_config(tiny_model, subfolder="transformer")
    for dtype in (torch.float32, torch.bfloat16):
        reference = QwenImageTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=dtype)
        loaded = load_transformer(published_weights(tiny_model, config), Placement("bf16"), "cpu", dtype).model
        ours, theirs = loaded.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        # Same parameters (not buffers), same layout: the compute after loading is the same kernels.
        assert dict(loaded.named_parameters()).keys() == dict(reference.named_parameters()).keys()
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), (dtype, name)
            assert ours[name].stride() == tensor.stride(), (dtype, name)


def test_results_and_pngs_name_the_file_and_its_hash(runs, files):
    _, outputs = runs
    sha = hashlib.sha256(files["gguf-q4_0"].read_bytes()).hexdigest()
    rows = pq.read_table(outputs["gguf-q4_0", 1] / "results.parquet").to_pylist()
    assert {(row["transformer"], row["transformer_sha256"]) for row in rows} == {(str(files["gguf-q4_0"]), sha)}
    png = (outputs["gguf-q4_0", 1] / "images" / "fox.png").read_bytes()
    assert read_png_metadata(png)["transformer_sha256"] == sha
    with Image.open(io.BytesIO(png)) as image:
        assert f"Transformer: tiny-gguf-q4_0.gguf, Transformer hash: {sha[:10]}" in image.text[PARAMETERS_KEY]
    plain = pq.read_table(outputs["bf16", 1] / "results.parquet").to_pylist()
    assert all(row["transformer_sha256"] != sha for row in plain)


def test_a_changed_file_regenerates_its_rows(tmp_path, files):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:2])
    transformer = tmp_path / "transformer.gguf"
    transformer.write_bytes(files["gguf-q8_0"].read_bytes())
    config = RunConfig(str(manifest), str(tmp_path / "out"), transformer=str(transformer), device="cpu")
    assert run(config).generated == 2
    again = run(config)
    assert (again.generated, again.skipped) == (0, 2)
    transformer.write_bytes(files["gguf-q4_0"].read_bytes())  # same name, other weights
    changed = run(config)
    assert (changed.generated, changed.skipped) == (2, 0)
    without = run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu"))  # the model's own transformer
    assert without.generated == 2


def _truncated(source, target):
    target.write_bytes(source.read_bytes()[: source.stat().st_size - 100])
    return target


def _pickled(_, target):
    torch.save({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, target)
    return target


def _other_architecture(source, target):
    """A bf16 file with a block missing and a tensor of another size: another model."""
    from safetensors.torch import load_file, save_file

    tensors = {key: value for key, value in load_file(source).items() if not key.startswith("transformer_blocks.1.")}
    tensors["img_in.weight"] = torch.zeros(48, 64, dtype=torch.bfloat16)
    save_file(tensors, target)
    return target


def _int8_safetensors(source, target):
    from safetensors.torch import load_file, save_file

    tensors = load_file(source)
    tensors["transformer_blocks.0.attn.to_q.weight"] = tensors["transformer_blocks.0.attn.to_q.weight"].to(torch.int8)
    save_file(tensors, target)
    return target


def _unknown_gguf_type(_, target):
    import gguf

    writer = gguf.GGUFWriter(str(target), arch="qwen_image")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ2_0]
    raw = np.zeros((32, 256 // block * size), dtype=np.uint8)  # 32 rows of 256 values, as TQ2_0 bytes
    writer.add_tensor("img_in.weight", raw, raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (None, "missing.gguf", "no such file"),
        (_truncated, "cut.gguf", "truncated"),
        (_truncated, "cut.safetensors", "truncated"),
        (_pickled, "model.ckpt", "pickled PyTorch checkpoint"),
        (_other_architecture, "other.safetensors", "is not a transformer of this model"),
        (_int8_safetensors, "int8.safetensors", "stored as I8, a quantization qwen-batch does not know"),
        (_unknown_gguf_type, "tq2.gguf", "quantized as TQ2_0, which diffusers cannot dequantize"),
    ],
)
def test_an_unusable_file_is_a_usage_error_before_anything_loads(tmp_path, files, capsys, make, name, reason):
    source = files["gguf-q8_0"] if name.endswith(".gguf") else files["bf16"]
    target = tmp_path / name
    if make is not None:
        make(source, target)
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    output = tmp_path / "out"
    assert main(["run", str(manifest), "-o", str(output), "--transformer", str(target), "--device", "cpu", "-q"]) == 2
    error = capsys.readouterr().err
    assert str(target) in error and reason in error, error
    assert not output.exists()


def test_a_mode_the_file_cannot_run_is_refused(tmp_path, files, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    flags = ["--transformer", str(files["gguf-q4_0"]), "--memory-mode", "fp8", "--device", "cpu", "-q"]
    assert main(["run", str(manifest), "-o", str(tmp_path / "out"), *flags]) == 2
    assert "weights are gguf" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_rows_with_adapters_are_invalid_with_a_gguf_file_and_the_others_run(tmp_path, files, tiny_model):
    from qwen_batch.tiny.lora import write_tiny_lora

    adapter = write_tiny_lora("tiny", tmp_path / "style.safetensors", seed=1)
    rows = [ROWS[0], small_row("styled", "a fox", loras=[{"path": str(adapter), "scale": 1.0}])]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), transformer=str(files["gguf-q4_0"]), device="cpu"))
    assert (summary.generated, summary.invalid) == (1, 1)
    results = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    assert "cannot be fused into the GGUF-quantized transformer" in results["styled"]["error"]


def test_an_fp8_file_takes_adapters_and_gives_the_original_weights_back(tmp_path, files, tiny_model):
    """fp8 weights cannot take a fuse: the layers an adapter changes are dequantized from the file, fused and
    quantized again; a row without adapters after one with them is the image it is alone."""
    from qwen_batch.tiny.lora import write_tiny_lora

    adapter = write_tiny_lora("tiny", tmp_path / "style.safetensors", seed=1)
    plain = small_row("plain", "a fox", seed=7)
    rows = [small_row("styled", "a fox", seed=7, loras=[{"path": str(adapter), "scale": 1.0}]), plain]
    both = run(RunConfig(str(write_manifest(tmp_path / "m.parquet", rows)), str(tmp_path / "both"),
                         transformer=str(files["fp8"]), device="cpu", batch_size=1))  # fmt: skip
    alone = run(RunConfig(str(write_manifest(tmp_path / "p.parquet", [plain])), str(tmp_path / "alone"),
                          transformer=str(files["fp8"]), device="cpu"))  # fmt: skip
    assert both.generated == 2 and alone.generated == 1
    assert not differing_images(["plain"], tmp_path / "both", tmp_path / "alone", 0)
    styled, unstyled = (
        pixels(tmp_path / "both" / "images" / "styled.png"),
        pixels(tmp_path / "both" / "images" / "plain.png"),
    )
    assert np.abs(styled - unstyled).max() > TOLERANCE


def test_a_transformer_file_on_s3_is_copied_once(tmp_path, files, s3_endpoint, s3, bucket, monkeypatch):
    import qwen_batch.weights.transformer_file

    s3.put_object(Bucket=bucket, Key="models/tiny.gguf", Body=files["gguf-q8_0"].read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    copies = []
    original = qwen_batch.weights.transformer_file.download
    monkeypatch.setattr(
        qwen_batch.weights.transformer_file, "download", lambda *args: copies.append(args[0]) or original(*args)
    )
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    for output in ("a", "b"):
        config = RunConfig(
            str(manifest), str(tmp_path / output), transformer=f"s3://{bucket}/models/tiny.gguf", device="cpu"
        )
        assert run(config).generated == 1
    assert copies == [f"s3://{bucket}/models/tiny.gguf"]
    assert not differing_images(["fox"], tmp_path / "a", tmp_path / "b", 0)


def test_plan_reads_a_files_header_for_its_kind_and_size(files, capsys):
    assert (
        main(["plan", "--gpu-memory", "16", "--host-memory", "16", "--transformer", str(files["gguf-q4_0"]), "--json"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["job"]["weights"]["kind"] == "gguf" and plan["denoise"]["mode"] == "gguf"
    assert plan["job"]["weights"]["nbytes"] < files["gguf-q4_0"].stat().st_size


def test_safetensors_header_offsets_are_checked_against_the_file(tmp_path, files):
    from qwen_batch.weights.checkpoint_files import CheckpointError, read_safetensors

    data = bytearray(files["bf16"].read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(key for key in header if key != "__metadata__")
    header[name]["data_offsets"][1] += 10**6  # points past the end of the file
    encoded = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + length :]))
    with pytest.raises(CheckpointError, match="is truncated"):
        read_safetensors(tmp_path / "bad.safetensors")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_loading_gives_each_blocks_file_pages_back(tmp_path):
    """Read from a bf16 checkpoint into fp32, the model's bytes all pass through the mapped files' pages: the
    loader hands each block's pages back once it is copied, so the file pages the process holds stay about a
    block, not the checkpoint (transformers and diffusers' from_pretrained keep them all until the end)."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_batch.memory.placement import Placement
    from qwen_batch.memory.streamed_load import load_transformer
    from qwen_batch.weights.transformer_file import published_weights

    with torch.device("cpu"):
        model = QwenImageTransformer2DModel(
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=12,
            joint_attention_dim=768,
            axes_dims_rope=(16, 24, 24),
        ).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model" / "transformer", max_shard_size="100MB")
    checkpoint = sum(f.stat().st_size for f in (tmp_path / "model" / "transformer").glob("*.safetensors"))
    del model
    weights = published_weights(tmp_path / "model", dict(model_config(tmp_path / "model")))
    before = rss_file()
    loaded = load_transformer(weights, Placement("bf16"), "cpu", torch.float32)
    held = rss_file() - before
    block = checkpoint / 4
    assert held < 1.5 * block, (held, checkpoint)
    assert loaded.model.transformer_blocks[3].attn.to_q.weight.dtype == torch.float32


def model_config(folder):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.load_config(folder, subfolder="transformer")


def rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0
