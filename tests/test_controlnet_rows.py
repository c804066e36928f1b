"""ControlNet rows: diffusers' `QwenImageControlNetPipeline` row for row (one control image, and several
through `QwenImageMultiControlNetModel`, with scales and a start/end range), alone and batched with plain
rows, on the tiny model and its tiny Union ControlNet (`qwen_batch.tiny.controlnet`), within 2/255."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from qwen_batch.errors import ConfigError
from qwen_batch.manifest import read_manifest
from qwen_batch.run.engine import RunConfig, plan_run, run
from tests.support import diffusers_reference, pixels, small_row, write_manifest

TOLERANCE = 2  # of 255


def _edges(path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (256, 256), "black")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, 192, 2))
        draw.rectangle((x0, y0, x0 + 60, y0 + 60), outline="white", width=3)
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def controlnet(qwen_batch_home, tiny_model):
    from qwen_batch.tiny.controlnet import ensure_tiny_controlnet

    return ensure_tiny_controlnet("union")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, controlnet):
    folder = tmp_path_factory.mktemp("controls")
    edges, other = _edges(folder / "edges.png", 0), _edges(folder / "other.png", 1)
    rows = [
        small_row("one", "a product shot", control_image=[edges], seed=1),
        small_row(
            "two",
            "a chair",
            control_image=[edges, other],
            control_scale=[0.7, 0.5],
            control_end=0.5,
            seed=2,
            num_inference_steps=4,
        ),
        small_row(
            "late",
            "a lamp",
            control_image=[other],
            control_scale=[1.5],
            control_start=0.5,
            seed=3,
            num_inference_steps=4,
            true_cfg_scale=1.0,
        ),
        small_row("twin", "a product shot", seed=1),  # "one" without its control
        small_row("plain", "a lighthouse", seed=4),
        small_row("scales", "x", control_image=[edges], control_scale=[1.0, 2.0]),
        small_row("with-init", "x", control_image=[edges], init_image=edges),
        small_row("bad-range", "x", control_image=[edges], control_start=0.8, control_end=0.2),
        small_row("masked", "x", control_image=[edges], mask_image=other),  # needs an inpainting ControlNet
    ]
    manifest = write_manifest(folder / "m.parquet", rows)
    outputs = {}
    for batch_size in (1, 4):
        output = folder / f"batch{batch_size}"
        config = RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu", controlnet=str(controlnet))
        summary = run(config)
        assert summary.generated == 5 and summary.invalid == 4, summary
        outputs[batch_size] = output
    return manifest, outputs, folder


def _reference(tiny_model, controlnet, request) -> np.ndarray:
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImageMultiControlNetModel

    net = QwenImageControlNetModel.from_pretrained(str(controlnet), torch_dtype=torch.float32)
    images = [Image.open(control.url).convert("RGB") for control in request.controls]
    several = len(images) > 1
    pipe = QwenImageControlNetPipeline.from_pretrained(
        str(tiny_model), controlnet=QwenImageMultiControlNetModel([net]) if several else net, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    scales = [control.scale for control in request.controls]
    start, end = request.control_range
    image = diffusers_reference(
        pipe,
        request,
        control_image=images if several else images[0],
        controlnet_conditioning_scale=scales if several else scales[0],
        control_guidance_start=[start] * len(images) if several else start,
        control_guidance_end=[end] * len(images) if several else end,
    )
    return pixels(image)


def test_control_rows_match_diffusers(setup, tiny_model, controlnet):
    manifest, outputs, _ = setup
    requests = {request.id: request for request in read_manifest(str(manifest)).requests}
    for row_id in ("one", "two", "late"):
        ours = pixels(outputs[4] / "images" / f"{row_id}.png")
        assert np.abs(ours - _reference(tiny_model, controlnet, requests[row_id])).max() <= TOLERANCE, row_id


def test_rows_are_the_same_alone_and_batched(setup):
    _, outputs, _ = setup
    for row_id in ("one", "two", "late", "twin", "plain"):
        alone, batched = (pixels(outputs[size] / "images" / f"{row_id}.png") for size in (1, 4))
        assert np.abs(alone - batched).max() <= TOLERANCE, row_id


def test_the_control_changes_the_image(setup):
    """Guards the tests above: the ControlNet's residuals reach the image (identical images would pass)."""
    _, outputs, _ = setup
    one, twin = (pixels(outputs[1] / "images" / f"{name}.png") for name in ("one", "twin"))
    assert np.abs(one - twin).max() > 20


def test_results_record_the_controls_and_bad_rows_say_why(setup):
    _, outputs, _ = setup
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    two = results["two"]
    assert [url.rsplit("/", 1)[-1] for url in two["control_image"]] == ["edges.png", "other.png"]
    assert two["control_scale"] == [0.7, 0.5] and (two["control_start"], two["control_end"]) == (0.0, 0.5)
    assert len(two["input_sha256"]) == 2
    expected = {
        "scales": "control_scale has 2 values for 1 control images",
        "with-init": "control_image with init_image is not supported",
        "bad-range": "control_start 0.8 and control_end 0.2",
        "masked": "mask_image with control_image needs an inpainting ControlNet",
    }
    for row_id, reason in expected.items():
        assert results[row_id]["status"] == "invalid" and reason in results[row_id]["error"], results[row_id]


def test_without_a_controlnet_control_rows_are_invalid_and_the_others_run(setup, tmp_path):
    manifest, _, _ = setup
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu"))
    assert summary.generated == 2  # twin and plain
    results = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    assert "run with --controlnet" in results["one"]["error"]


def test_a_controlnet_for_another_transformer_is_refused_before_anything_loads(setup, controlnet, tmp_path):
    manifest, _, _ = setup
    wrong = tmp_path / "wrong-controlnet"
    shutil.copytree(controlnet, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["joint_attention_dim"] += 8
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="joint_attention_dim"):
        plan_run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu", controlnet=str(wrong)))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_conditions_example_runs_from_the_cli_with_the_tiny_controlnet(tmp_path, tiny_model):
    """prompts/conditions_example.parquet: image-to-image, inpainting, a canny control image made with OpenCV
    and one made from the photo in stage 1, and a plain row, as a user runs it."""
    from pathlib import Path

    from qwen_batch.cli import main

    example = Path(__file__).parents[1] / "prompts" / "conditions_example.parquet"
    code = main(["run", str(example), "--output", str(tmp_path / "out"), "--controlnet", "tiny", "--device", "cpu"])
    results = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert code == 0 and [row["status"] for row in results] == ["ok"] * 5, results
    kinds = {row["id"]: row["category"] for row in results}
    assert set(kinds.values()) == {"image-to-image", "inpainting", "controlnet", "text-to-image"}


def test_tiny_model_command_writes_a_controlnet_the_run_accepts(tmp_path, tiny_model):
    from qwen_batch.cli import main

    assert main(["tiny-model", str(tmp_path / "cn"), "--task", "controlnet"]) == 0
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "x")])
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu", controlnet=str(tmp_path / "cn")))
    assert plan.controlnet is not None and plan.controlnet.local_folder == tmp_path / "cn"


def _control_residuals(model, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(seed)
    config = model.config
    hidden = torch.randn(2, 16, config.in_channels, generator=generator)
    with torch.inference_mode():
        return model(
            hidden_states=hidden,
            controlnet_cond=torch.randn(hidden.shape, generator=generator),
            conditioning_scale=1.0,
            timestep=torch.full((2,), 0.5),
            encoder_hidden_states=torch.randn(2, 5, config.joint_attention_dim, generator=generator),
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )


def test_the_controlnet_takes_the_runs_memory_mode(controlnet):
    """Under fp8 the ControlNet's block linears are stored in fp8 like the transformer's (here on the CPU: fp8
    storage, upcast per layer), the sensitive layers and everything outside the blocks kept; its residuals stay
    close to the bf16 ones. GGUF (a transformer file's format) leaves a ControlNet folder resident."""
    from qwen_batch.memory.placement import Placement
    from qwen_batch.pipeline.conditions.controlnet import ControlNetSource

    source = ControlNetSource(str(controlnet))
    reference, done = source.load("cpu", torch.float32, Placement("bf16"))
    assert done.startswith("resident")
    quantized, done = source.load("cpu", torch.float32, Placement("fp8"))
    assert "fp8 storage" in done, done
    block = quantized.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert block.img_mlp.net[2].weight.dtype == torch.float32
    assert quantized.controlnet_blocks[0].weight.dtype == torch.float32
    for ours, theirs in zip(_control_residuals(quantized), _control_residuals(reference), strict=True):
        relative = (ours - theirs).norm() / theirs.norm()
        assert 0 < relative < 0.1, relative
    _, done = source.load("cpu", torch.float32, Placement("gguf"))
    assert done.startswith("resident")


@pytest.mark.parametrize("marked", [True, False])
def test_compiled_controlnet_blocks_compile_once_for_every_text_length(controlnet, tmp_path, marked):
    """Control rows whose prompts have different lengths reach the ControlNet's compiled blocks with their text
    length symbolic from the first batch, so they compile once; unmarked (the control case, so this test can
    fail), dynamo compiles them again at the second length. Dynamo traces only (the eager backend)."""
    import torch._dynamo

    from qwen_batch.families.qwen_image.text_length import compile_once_for_every_text_length
    from qwen_batch.run.engine import denoise_stage, encode_stage, generator_for, release_generator

    edges = _edges(tmp_path / "edges.png", 0)
    prompts = [
        "a cat",
        "a lighthouse on a rocky coast at dawn with gulls",
        "一只猫在窗台上晒太阳，旁边有一盆绿植和一本书",
    ]
    rows = [small_row(f"r{i}", prompt, control_image=[edges], seed=i) for i, prompt in enumerate(prompts)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    plan = plan_run(
        RunConfig(str(manifest), str(tmp_path / "out"), batch_size=1, device="cpu", controlnet=str(controlnet))
    )
    encode_stage(plan)
    generator = generator_for(plan)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    if marked:
        compile_once_for_every_text_length(generator.controlnet)
    for block in generator.controlnet.transformer_blocks:
        block.compile(fullgraph=True, backend=backend)
    try:
        assert denoise_stage(plan).generated == len(rows)
    finally:
        release_generator()
        torch._dynamo.reset()
    assert len(graphs) == (1 if marked else 2), len(graphs)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16 --compile on", "fp8 --compile on", "offload", "fp8-offload"])
def test_control_rows_run_in_every_memory_mode_on_the_gpu(setup, controlnet, tmp_path, mode, caplog):
    """The ControlNet placed as the transformer is (compiled with it where it compiles), control rows batched
    with plain ones: every image real (a NaN anywhere decodes to a flat image), close to the eager bf16 run's."""
    from qwen_batch.cli import main

    manifest, _, _ = setup
    output = tmp_path / "out"
    flags = ["--memory-mode", *mode.split(), "--batch-size", "4", "-q"]
    with caplog.at_level("INFO", logger="qwen_batch.run.engine"):
        code = main(
            ["run", str(manifest), "-o", str(output), "--device", "cuda", "--controlnet", str(controlnet), *flags]
        )
    assert code == 1  # the invalid rows
    placed = " ".join(record.getMessage() for record in caplog.records if "denoise: transformer" in record.getMessage())
    assert f"ControlNet {controlnet}" in placed, placed
    if "compile" in mode:
        assert "ControlNet compiled" in placed, placed
    results = {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}
    for row_id in ("one", "two", "late", "twin", "plain"):
        assert results[row_id]["status"] == "ok", results[row_id]
        assert pixels(output / "images" / f"{row_id}.png").std() > 5, f"{mode}: flat image for {row_id}"


@pytest.fixture(scope="module")
def inpaint_setup(tmp_path_factory, tiny_model):
    """The inpainting ControlNet (`--controlnet tiny-inpaint`): control_image with mask_image."""
    folder = tmp_path_factory.mktemp("control-inpaint")
    photo = _edges(folder / "photo.png", 5)
    mask = Image.new("RGB", (256, 256), "black")
    ImageDraw.Draw(mask).rectangle((64, 64, 191, 191), fill="white")
    mask.save(folder / "mask.png")
    rows = [
        small_row("fill", "a vase of flowers", control_image=[photo], mask_image=str(folder / "mask.png"), seed=3),
        small_row(
            "fill-late",
            "a teapot",
            control_image=[photo],
            mask_image=str(folder / "mask.png"),
            control_scale=[0.8],
            control_start=0.5,
            seed=4,
            num_inference_steps=4,
            true_cfg_scale=1.0,
        ),
        small_row("plain", "a lighthouse", seed=5),
        small_row("no-mask", "x", control_image=[photo]),
    ]
    manifest = write_manifest(folder / "m.parquet", rows)
    outputs = {}
    for batch_size in (1, 4):
        output = folder / f"batch{batch_size}"
        summary = run(
            RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu", controlnet="tiny-inpaint")
        )
        assert summary.generated == 3 and summary.invalid == 1, summary
        outputs[batch_size] = output
    return manifest, outputs


def test_controlnet_inpainting_rows_match_diffusers(inpaint_setup, tiny_model):
    """Against `QwenImageControlNetInpaintPipeline` after `torch.manual_seed(seed)`: diffusers samples the
    masked image's latents from torch's global random state; qwen-batch from a generator seeded with the row's
    seed, so a row's image never depends on what ran before it."""
    from diffusers import QwenImageControlNetInpaintPipeline, QwenImageControlNetModel

    from qwen_batch.tiny.controlnet import ensure_tiny_controlnet

    manifest, outputs = inpaint_setup
    net = QwenImageControlNetModel.from_pretrained(str(ensure_tiny_controlnet("inpaint")), torch_dtype=torch.float32)
    pipe = QwenImageControlNetInpaintPipeline.from_pretrained(str(tiny_model), controlnet=net, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        if not request.controls or request.mask_image is None:
            continue
        start, end = request.control_range
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed)
            image = diffusers_reference(
                pipe,
                request,
                control_image=Image.open(request.controls[0].url).convert("RGB"),
                control_mask=Image.open(request.mask_image).convert("RGB"),
                controlnet_conditioning_scale=request.controls[0].scale,
                control_guidance_start=start,
                control_guidance_end=end,
            )
        for size in (1, 4):
            ours = pixels(outputs[size] / "images" / f"{request.id}.png")
            assert np.abs(ours - pixels(image)).max() <= TOLERANCE, (request.id, size)


def test_the_inpainting_controlnet_refuses_rows_without_a_mask(inpaint_setup):
    _, outputs = inpaint_setup
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    assert "is an inpainting ControlNet: give the row a mask_image" in results["no-mask"]["error"]
    assert results["fill"]["status"] == "ok" and len(results["fill"]["input_sha256"]) == 2
