"""The tiny Qwen-Image-2.1 pipeline: loads offline like the real one, generates RGBA, and is deterministic."""

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

import qwen_batch.families.qwen_image21.tiny as tiny21
from qwen_batch.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

# What model_index.json of Qwen/Qwen-Image-2.1 names.
REAL_MODEL_INDEX = {
    "_class_name": "QwenImage21Pipeline",
    "processor": ["transformers", "Qwen3VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage21"],
}
WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
FOX = "A fox running through the snow under the moon"


def _load(folder: Path) -> diffusers.QwenImage21Pipeline:
    """`folder` loaded the way users load the real model, with the network cut off."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to open a network connection: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        pipeline = diffusers.QwenImage21Pipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny21.write_tiny_model(tmp_path_factory.mktemp("tiny21") / "qwen-image-2.1-tiny")


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory) -> Path:
    return tiny21.write_tiny_model(tmp_path_factory.mktemp("tiny21") / "qwen-image-2.1-turbo-tiny", flavour="turbo")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return _load(model_dir)


@pytest.fixture(scope="module")
def turbo(turbo_dir):
    return _load(turbo_dir)


def generate(pipe, prompt: str = FOX, seed: int = 0, height: int = 64, width: int = 64, **kwargs) -> Image.Image:
    return pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images[0]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def condition_images() -> list[Image.Image]:
    """A 64x48 RGB photo-like picture and a 32x32 half-transparent RGBA one."""
    gradient = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None].repeat(48, 0).repeat(3, 2)
    gradient[..., 0] = 220
    rgba = Image.new("RGBA", (32, 32), (0, 100, 200, 128))
    return [Image.fromarray(gradient, "RGB"), rgba]


def digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_import_is_light():
    heavy = ["torch", "diffusers", "transformers", "tokenizers"]
    code = f"import sys, qwen_batch.families.qwen_image21.tiny; print(sorted(set({heavy}) & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_model_index_names_the_real_classes(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert {key: index[key] for key in REAL_MODEL_INDEX} == REAL_MODEL_INDEX
    assert index.get("sample_sigmas") is None
    for name in WEIGHT_FILES:
        assert (model_dir / name).is_file()
    assert not list(model_dir.rglob("*.bin")), "weights must be safetensors only"
    size = sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())
    assert size < 4 * 2**20, f"the tiny model takes {size} bytes"


def test_loads_offline_with_the_real_structure(pipe):
    from transformers import Qwen2Tokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    assert type(pipe) is diffusers.QwenImage21Pipeline
    assert type(pipe.processor) is Qwen3VLProcessor
    assert type(pipe.processor.tokenizer) is Qwen2Tokenizer
    assert type(pipe.text_encoder) is Qwen3VLForConditionalGeneration
    assert type(pipe.vae) is diffusers.AutoencoderKLQwenImage21
    assert type(pipe.transformer) is diffusers.QwenImage21Transformer2DModel
    assert type(pipe.scheduler) is diffusers.FlowMatchEulerDiscreteScheduler
    assert pipe.text_encoder.dtype == pipe.transformer.dtype == pipe.vae.dtype == torch.float32
    assert pipe.transformer.device.type == "cpu"

    transformer, vae = pipe.transformer.config, pipe.vae.config
    text = pipe.text_encoder.config.text_config
    vision = pipe.text_encoder.config.vision_config
    assert transformer.in_channels == transformer.out_channels == vae.z_dim != 4
    assert transformer.context_in_dim == text.hidden_size
    assert transformer.causal_condition
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert 2 * sum(text.rope_parameters["mrope_section"]) == text.head_dim
    assert vae.in_channels == vae.out_channels == 4  # RGBA
    assert 2 ** (len(vae.dim_mult) - 1) == pipe.vae_scale_factor == 16
    assert len(vae.latents_mean) == len(vae.latents_std) == vae.z_dim
    # One merged vision token covers the 2x2 latents (32x32 pixels) a vision slot stands for.
    assert vision.patch_size * vision.spatial_merge_size == 2 * pipe.vae_scale_factor
    assert pipe.processor.image_processor.patch_size == vision.patch_size
    assert pipe.processor.image_processor.merge_size == vision.spatial_merge_size
    assert vision.out_hidden_size == text.hidden_size

    ids = pipe.processor.tokenizer.convert_tokens_to_ids
    config = pipe.text_encoder.config
    assert text.vocab_size == len(pipe.processor.tokenizer)
    assert config.image_token_id == ids("<|image_pad|>") == pipe._img_token_id
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")

    scheduler = dict(pipe.scheduler.config)
    expected = {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9}
    expected |= {"base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02}
    expected |= {"time_shift_type": "exponential", "num_train_timesteps": 1000}
    assert {key: scheduler[key] for key in expected} == expected


def test_drop_idx_is_the_system_turn(pipe):
    tokenizer = pipe.processor.tokenizer
    system_turn = f"<|im_start|>system\n{pipe.sys_prompt}<|im_end|>\n"
    assert pipe.prompt_template_t2i.startswith(system_turn)
    assert pipe.prompt_template_ti2i.startswith(system_turn)
    system_ids = tokenizer(system_turn, add_special_tokens=False).input_ids
    assert pipe._drop_idx == len(system_ids)
    for template in (pipe.prompt_template_t2i, pipe.prompt_template_ti2i):
        ids = tokenizer(template.format(FOX), add_special_tokens=False).input_ids
        assert ids[: pipe._drop_idx] == system_ids
        # What the pipeline keeps starts at the user turn.
        assert tokenizer.decode(ids[pipe._drop_idx :]) == template[len(system_turn) :].format(FOX)
    # The embeddings are exactly the tokens after the system turn.
    embeds, _, image_pad_mask = pipe.encode_prompt(FOX)
    user_ids = tokenizer(pipe.prompt_template_t2i.format(FOX), add_special_tokens=False).input_ids[pipe._drop_idx :]
    assert embeds.shape[1] == image_pad_mask.shape[1] == len(user_ids)
    assert not image_pad_mask.any()


def test_generates_rgba_images_of_the_requested_size(pipe):
    fox = generate(pipe)
    assert (fox.mode, fox.size) == ("RGBA", (64, 64))
    assert pixels(fox).std() > 10, "image is (nearly) constant"
    assert np.array_equal(pixels(fox), pixels(generate(pipe))), "same prompt and seed must give the same image"
    assert np.abs(pixels(fox) - pixels(generate(pipe, seed=1))).mean() > 10
    assert np.abs(pixels(fox) - pixels(generate(pipe, "A red car in a neon city at night"))).mean() > 2
    wide = generate(pipe, width=96, height=64)
    assert (wide.mode, wide.size) == ("RGBA", (96, 64))


def test_generates_with_condition_images(pipe):
    first, second = condition_images()
    text_only = pixels(generate(pipe))
    one = generate(pipe, image=first, output_resolution=64)
    assert (one.mode, one.size) == ("RGBA", (64, 64))
    two = generate(pipe, image=[first, second], output_resolution=64)
    assert (two.mode, two.size) == ("RGBA", (64, 64))
    # The condition images shape the image.
    assert np.abs(pixels(one) - text_only).mean() > 2
    assert np.abs(pixels(two) - pixels(one)).mean() > 1
    # Without a size, the last condition image's aspect ratio at output_resolution squared.
    sized = pipe(FOX, image=[second, first], output_resolution=64, num_inference_steps=2).images[0]
    assert (sized.mode, sized.size) == ("RGBA", (64, 64))


def test_true_cfg_with_a_negative_prompt(pipe):
    guided = generate(pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    assert (guided.mode, guided.size) == ("RGBA", (64, 64))
    assert np.abs(pixels(guided) - pixels(generate(pipe))).mean() > 1


def test_same_seed_gives_identical_files_and_another_seed_does_not(model_dir, tmp_path):
    state = torch.get_rng_state()
    again = digests(tiny21.write_tiny_model(tmp_path / "again"))
    assert torch.equal(state, torch.get_rng_state()), "building must leave the global RNG alone"
    assert again == digests(model_dir)
    other = digests(tiny21.write_tiny_model(tmp_path / "seed1", seed=1))
    for name in WEIGHT_FILES:
        assert other[name] != again[name], name
    # Only the weights depend on the seed (the tokenizer is trained without randomness).
    assert {name: other[name] for name in other if name not in WEIGHT_FILES} == {
        name: again[name] for name in again if name not in WEIGHT_FILES
    }


def test_turbo_carries_its_sigmas_and_samples_them(turbo_dir, turbo, model_dir):
    index = json.loads((turbo_dir / "model_index.json").read_text())
    assert index["sample_sigmas"] == tiny21.TURBO_SIGMAS
    assert len(tiny21.TURBO_SIGMAS) == 8
    assert turbo.config.sample_sigmas == tiny21.TURBO_SIGMAS
    # The same weights as the base model.
    weights = digests(model_dir)
    assert {name: digests(turbo_dir)[name] for name in WEIGHT_FILES} == {name: weights[name] for name in WEIGHT_FILES}

    steps = []

    def count(pipe, step, timestep, callback_kwargs):
        steps.append(float(timestep))
        return callback_kwargs

    image = turbo(FOX, height=64, width=64, generator=torch.Generator().manual_seed(0), callback_on_step_end=count)
    assert (image.images[0].mode, image.images[0].size) == ("RGBA", (64, 64))
    assert len(steps) == len(tiny21.TURBO_SIGMAS)
    # Sampled as published, at any resolution: no shifting, no terminal stretch.
    np.testing.assert_allclose(steps, np.array(tiny21.TURBO_SIGMAS) * 1000, rtol=1e-5)
    np.testing.assert_allclose(turbo.scheduler.sigmas.numpy(), [*tiny21.TURBO_SIGMAS, 0.0], rtol=1e-5)


def test_flavours_and_revision():
    assert tiny21.FLAVOURS == ("generate", "turbo")
    for flavour in tiny21.FLAVOURS:
        revision = tiny21.tiny_model_revision(flavour)
        assert isinstance(revision, str)
        assert revision.startswith(f"{tiny21.TINY_MODEL21_REVISION}.")
    with pytest.raises(ConfigError, match="flavour"):
        tiny21.tiny_model_revision("edit")
    with pytest.raises(ConfigError, match="flavour"):
        tiny21.build_tiny_pipeline(flavour="edit")
