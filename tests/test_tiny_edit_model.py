"""The tiny image-edit models (Edit and Edit Plus): load offline like the real ones, edit, deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import qwen_batch.tiny.model as tiny_model
from qwen_batch.errors import ConfigError
from qwen_batch.weights.model_source import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"edit": diffusers.QwenImageEditPipeline, "edit-plus": diffusers.QwenImageEditPlusPipeline}

# What model_index.json of Qwen/Qwen-Image-Edit (and -2509, with its own class) says.
REAL_EDIT_MODEL_INDEX = {
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
REPRODUCIBLE_FILES = (
    "text_encoder/model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/tokenizer.json",
    "processor/processor_config.json",
    "processor/tokenizer.json",
)


def square(color, size=(256, 256)) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    width, height = size
    image.paste(color, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


RED_SQUARE = square((220, 30, 30))
GRADIENT = Image.radial_gradient("L").convert("RGB").resize((256, 256))
WIDE = square((30, 30, 220), size=(320, 192))


def load_offline(cls, folder: Path):
    """`cls.from_pretrained(folder)` the way users load the real model, with the network cut off."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to open a network connection: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-edit")
    return {task: tiny_model.write_tiny_model(root / task, task=task) for task in PIPELINES}


@pytest.fixture(scope="module")
def edit_pipe(folders):
    return load_offline(diffusers.QwenImageEditPipeline, folders["edit"])


@pytest.fixture(scope="module")
def plus_pipe(folders):
    return load_offline(diffusers.QwenImageEditPlusPipeline, folders["edit-plus"])


def edit(pipe, image, prompt: str, seed: int = 0, size: int | None = 256) -> np.ndarray:
    """A 2-step edit with true CFG; `size` None lets the pipeline size the output from the input."""
    result = pipe(
        image=image,
        prompt=prompt,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        **({"height": size, "width": size} if size else {}),
    ).images[0]
    assert result.mode == "RGB"
    return np.asarray(result, dtype=np.float64)


@pytest.mark.parametrize("task", PIPELINES)
def test_model_index_names_the_real_classes_and_the_files_are_small(folders, task):
    folder = folders[task]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[task].__name__
    assert {key: index[key] for key in REAL_EDIT_MODEL_INDEX} == REAL_EDIT_MODEL_INDEX
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    size = sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())
    assert size < 5e6, f"{size / 1e6:.1f} MB"


def test_loads_offline_with_the_real_structure(edit_pipe):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    assert type(edit_pipe) is diffusers.QwenImageEditPipeline
    assert type(edit_pipe.processor) is Qwen2VLProcessor
    assert type(edit_pipe.processor.image_processor) is Qwen2VLImageProcessor
    assert type(edit_pipe.text_encoder) is Qwen2_5_VLForConditionalGeneration
    assert edit_pipe.vae_scale_factor == 8

    processor = edit_pipe.processor.image_processor
    vision = edit_pipe.text_encoder.config.vision_config
    # As released: 14-pixel patches, 2x2 merged into one token, pairs of frames, 112-pixel windows.
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision.window_size == 112 and vision.window_size % (vision.patch_size * vision.spatial_merge_size) == 0
    # Both kinds of vision blocks exist: full attention and window attention.
    assert vision.fullatt_block_indexes and set(vision.fullatt_block_indexes) < set(range(vision.depth))
    assert vision.out_hidden_size == edit_pipe.text_encoder.config.text_config.hidden_size
    assert edit_pipe.transformer.config.joint_attention_dim == vision.out_hidden_size


@pytest.mark.parametrize("task", PIPELINES)
def test_vision_token_ids_agree_between_processor_tokenizer_and_text_encoder(folders, task, edit_pipe, plus_pipe):
    pipe = edit_pipe if task == "edit" else plus_pipe
    ids, config = pipe.tokenizer.convert_tokens_to_ids, pipe.text_encoder.config
    assert config.text_config.vocab_size == len(pipe.tokenizer)
    assert pipe.processor.image_token_id == config.image_token_id == ids("<|image_pad|>")
    assert pipe.processor.video_token_id == config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert pipe.processor.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_the_dropped_tokens_are_exactly_the_system_prompt(edit_pipe, plus_pipe):
    """The pipelines drop 64 hidden states: the system prompt and the user header, as with the real vocab."""
    tokenizer = edit_pipe.tokenizer
    assert edit_pipe.prompt_template_encode_start_idx == plus_pipe.prompt_template_encode_start_idx == 64
    assert len(tokenizer(tiny_model.EDIT_PROMPT_TEMPLATE_PREFIX).input_ids) == 64
    assert edit_pipe.prompt_template_encode.startswith(tiny_model.EDIT_PROMPT_TEMPLATE_PREFIX)

    inputs = edit_pipe.processor(text=[edit_pipe.prompt_template_encode.format("make it red")], images=[RED_SQUARE])
    ids = inputs["input_ids"][0]
    config = edit_pipe.text_encoder.config
    assert ids[64] == config.vision_start_token_id, "the first kept token must be the image's start marker"
    image_tokens = int(inputs["image_grid_thw"][0].prod()) // 4
    assert ids.count(config.image_token_id) == image_tokens
    assert tokenizer.decode(ids[64 + image_tokens + 2 :]) == "make it red<|im_end|>\n<|im_start|>assistant\n"

    # Edit Plus numbers the images after the header.
    text = plus_pipe.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red")
    ids = plus_pipe.processor(text=[text], images=[RED_SQUARE])["input_ids"][0]
    assert plus_pipe.tokenizer.decode(ids[64:]).startswith("Picture 1: <|vision_start|><|image_pad|>")


def test_the_encoder_sees_the_image(edit_pipe):
    with torch.inference_mode():
        red, _ = edit_pipe.encode_prompt("make it blue", image=[RED_SQUARE])
        gradient, _ = edit_pipe.encode_prompt("make it blue", image=[GRADIENT])
    assert red.shape == gradient.shape
    assert (red - gradient).abs().mean() > 0.1 * red.abs().mean()


def test_edits_depend_on_image_prompt_and_seed(edit_pipe):
    red = edit(edit_pipe, RED_SQUARE, "make the square blue")
    assert red.shape == (256, 256, 3)
    assert red.std() > 10, "image is (nearly) constant"
    assert np.array_equal(red, edit(edit_pipe, RED_SQUARE, "make the square blue")), "must be deterministic"
    assert np.abs(red - edit(edit_pipe, GRADIENT, "make the square blue")).mean() > 2
    assert np.abs(red - edit(edit_pipe, RED_SQUARE, "turn the circle into a yellow star")).mean() > 1
    assert np.abs(red - edit(edit_pipe, RED_SQUARE, "把正方形改成蓝色")).mean() > 1
    assert np.abs(red - edit(edit_pipe, RED_SQUARE, "make the square blue", seed=1)).mean() > 10


@pytest.mark.slow
def test_the_output_takes_the_inputs_aspect_ratio_at_about_one_megapixel(edit_pipe):
    # 320x192 (5:3) -> 1312x800, as diffusers sizes it: the VAE encodes and decodes at about 1 MP.
    assert edit(edit_pipe, WIDE, "make the square red", size=None).shape == (800, 1312, 3)


def test_edit_plus_takes_several_images_in_order(plus_pipe):
    both = edit(plus_pipe, [RED_SQUARE, GRADIENT], "put the square of picture 1 on picture 2")
    assert both.std() > 10
    swapped = edit(plus_pipe, [GRADIENT, RED_SQUARE], "put the square of picture 1 on picture 2")
    assert np.abs(both - swapped).mean() > 2
    assert np.abs(both - edit(plus_pipe, [RED_SQUARE], "put the square of picture 1 on picture 2")).mean() > 2


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in REPRODUCIBLE_FILES}


def test_same_seed_gives_identical_files_and_another_seed_does_not(folders, tmp_path):
    assert digests(tiny_model.write_tiny_model(tmp_path / "again", task="edit")) == digests(folders["edit"])
    other = digests(tiny_model.write_tiny_model(tmp_path / "seed1", seed=1, task="edit"))
    for name in REPRODUCIBLE_FILES[:3]:
        assert other[name] != digests(folders["edit"])[name], name


def test_edit_tokenizer_is_the_same_in_another_process(edit_pipe):
    # Rust hash maps are randomly seeded per process: BPE training must not depend on it.
    code = (
        "import hashlib; from qwen_batch.tiny.model import build_tiny_tokenizer as build; "
        "print(hashlib.sha256(build('edit').backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = tiny_model.build_tiny_tokenizer("edit").backend_tokenizer.to_str().encode()
    assert result.stdout.strip().splitlines()[-1] == hashlib.sha256(here).hexdigest()
    assert edit_pipe.tokenizer.get_vocab() == tiny_model.build_tiny_tokenizer("edit").get_vocab()


def test_an_unknown_task_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="generate, edit, edit-plus"):
        tiny_model.write_tiny_model(tmp_path / "x", task="inpaint")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("name", "task"), [("tiny-edit", "edit"), ("tiny-edit-plus", "edit-plus")])
def test_resolve_model_builds_each_edit_flavour_once(name, task, monkeypatch):
    source = resolve_model(name)
    folder = Path(source.location)
    assert source.is_tiny
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINES[task].__name__
    assert f"-{task}-r{tiny_model.tiny_model_revision(task)}-" in folder.name
    built = (folder / "model_index.json").stat().st_mtime_ns
    assert resolve_model(name).location == str(folder)
    assert (folder / "model_index.json").stat().st_mtime_ns == built, "a built model is reused"
    # A changed builder (a bumped revision) builds a new model instead of reusing a stale one.
    monkeypatch.setattr(tiny_model, "TINY_EDIT_MODEL_REVISION", tiny_model.TINY_EDIT_MODEL_REVISION + 1)
    assert resolve_model(name).location != str(folder)
    # Text to image is its own model.
    assert resolve_model("tiny").location != str(folder)


def test_a_model_built_in_memory_names_its_pipeline_and_an_unknown_one_is_refused():
    """Benchmarks build full-size edit models in memory (bench/full_size.py): such a source says which
    pipeline it is, as model_index.json does for a model on disk; one qwen-batch cannot run is refused."""
    from qwen_batch.errors import ModelError
    from qwen_batch.weights.model_source import ModelSource, pipeline_class_name

    def build(dtype, **components):
        raise AssertionError("not loaded to name its pipeline")

    edit = ModelSource(name="memory-edit", location="memory:edit", loader=build, pipeline_class="QwenImageEditPipeline")
    assert pipeline_class_name(edit) == "QwenImageEditPipeline"
    assert (
        pipeline_class_name(ModelSource(name="memory-t2i", location="memory:t2i", loader=build)) == "QwenImagePipeline"
    )
    video = ModelSource(name="memory-video", location="memory:video", loader=build, pipeline_class="WanPipeline")
    with pytest.raises(ModelError, match=r"memory-video.*WanPipeline"):
        pipeline_class_name(video)
