"""The tiny Qwen-Image pipeline: loads offline like the real one, generates, and is deterministic."""

from __future__ import annotations

import hashlib
import inspect
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

import qwen_batch.tiny.model as tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

# What model_index.json of Qwen/Qwen-Image says.
REAL_MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
FOX = "A fox running through the snow under the moon"
CHINESE_FOX = "一只在月光下奔跑的狐狸"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model.write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen-image-tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    """The written model, loaded the way users load the real one, with the network cut off."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to open a network connection: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        pipeline = diffusers.QwenImagePipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    image = pipe(
        prompt,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=256,
        width=256,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert image.size == (256, 256)
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.float64)


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (other hash seed, nothing imported yet); return its stdout."""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in WEIGHT_FILES}


def test_import_is_light():
    heavy = ["torch", "diffusers", "transformers", "tokenizers"]
    code = f"import sys, qwen_batch.tiny.model; print(sorted(set({heavy}) & set(sys.modules)))"
    assert run_python(code) == "[]"


def test_model_index_names_the_real_classes(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert {key: index[key] for key in REAL_MODEL_INDEX} == REAL_MODEL_INDEX
    for name in WEIGHT_FILES:
        assert (model_dir / name).is_file()
    assert not list(model_dir.rglob("*.bin")), "weights must be safetensors only"


def test_loads_offline_with_the_real_structure(pipe):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    assert type(pipe) is diffusers.QwenImagePipeline
    assert type(pipe.tokenizer) is Qwen2Tokenizer
    assert type(pipe.text_encoder) is Qwen2_5_VLForConditionalGeneration
    assert type(pipe.vae) is diffusers.AutoencoderKLQwenImage
    assert type(pipe.transformer) is diffusers.QwenImageTransformer2DModel
    assert type(pipe.scheduler) is diffusers.FlowMatchEulerDiscreteScheduler
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.dtype == torch.float32
    assert pipe.transformer.device.type == "cpu"

    text = pipe.text_encoder.config.text_config
    assert pipe.transformer.config.joint_attention_dim == text.hidden_size
    assert sum(pipe.transformer.config.axes_dims_rope) == pipe.transformer.config.attention_head_dim
    assert 2 * sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads
    released = inspect.signature(diffusers.AutoencoderKLQwenImage.__init__).parameters
    assert pipe.vae.config.latents_mean == released["latents_mean"].default
    assert pipe.vae.config.latents_std == released["latents_std"].default

    scheduler = dict(pipe.scheduler.config)
    expected = {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9}
    expected |= {"base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02}
    expected |= {"time_shift_type": "exponential", "num_train_timesteps": 1000}
    assert {key: scheduler[key] for key in expected} == expected


def test_special_token_ids_agree_between_tokenizer_and_text_encoder(pipe):
    tokenizer, config = pipe.tokenizer, pipe.text_encoder.config
    ids = tokenizer.convert_tokens_to_ids
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id == ids("<|im_end|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id == ids("<|endoftext|>")
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length >= pipe.tokenizer_max_length + pipe.prompt_template_encode_start_idx


def test_template_prefix_is_exactly_the_dropped_tokens(pipe):
    tokenizer = pipe.tokenizer
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    assert prefix == tiny_model.PROMPT_TEMPLATE_PREFIX
    prefix_ids = tokenizer(prefix).input_ids
    assert len(prefix_ids) == pipe.prompt_template_encode_start_idx == 34
    for prompt in (FOX, CHINESE_FOX, " ", "relationships"):
        ids = tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
        assert ids[:34] == prefix_ids
        assert tokenizer.decode(ids[34:]) == prompt + suffix
        # The pipeline keeps exactly the prompt (+ the template's tail) after dropping 34 hidden states.
        embeds, _ = pipe.encode_prompt(prompt)
        assert embeds.shape[1] == len(ids) - 34 == len(tokenizer(prompt + suffix).input_ids)


@pytest.mark.parametrize("text", [CHINESE_FOX, "书法：春风得意 🦊 and a café, 3 cats!"])
def test_text_round_trips(pipe, text):
    ids = pipe.tokenizer(text).input_ids
    assert pipe.tokenizer.decode(ids) == text


def test_generates_images_that_depend_on_prompt_and_seed(pipe):
    fox = generate(pipe, FOX)
    assert fox.std() > 10, "image is (nearly) constant"
    assert np.array_equal(fox, generate(pipe, FOX)), "same prompt and seed must give the same image"
    assert np.abs(fox - generate(pipe, "A red car in a neon city at night")).mean() > 2
    assert np.abs(fox - generate(pipe, CHINESE_FOX)).mean() > 2
    assert np.abs(fox - generate(pipe, FOX, seed=1)).mean() > 10


def test_same_seed_gives_identical_files_and_another_seed_does_not(model_dir, tmp_path):
    same = digests(tiny_model.write_tiny_model(tmp_path / "again"))
    assert same == digests(model_dir)
    other = digests(tiny_model.write_tiny_model(tmp_path / "seed1", seed=1))
    for name in WEIGHT_FILES:
        assert other[name] != same[name], name
    # The tokenizer is trained without randomness: it does not depend on the seed.
    tokenizer_json = "tokenizer/tokenizer.json"
    assert (tmp_path / "seed1" / tokenizer_json).read_bytes() == (model_dir / tokenizer_json).read_bytes()


def test_building_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    tiny_model.build_tiny_pipeline()
    assert torch.equal(state, torch.get_rng_state())


def test_tokenizer_is_the_same_in_another_process(pipe):
    # Rust hash maps are randomly seeded per process: BPE training (vocab and merges) must not depend on it.
    code = (
        "import hashlib; from qwen_batch.tiny.model import build_tiny_tokenizer as build; "
        "print(hashlib.sha256(build().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    here = hashlib.sha256(tiny_model.build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    assert run_python(code) == here
    # ... and the tokenizer loaded from disk is the one that was built.
    assert pipe.tokenizer.get_vocab() == tiny_model.build_tiny_tokenizer().get_vocab()
