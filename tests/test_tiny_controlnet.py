"""The tiny ControlNets: load like the released ones, fit the tiny transformer, change the image, deterministic."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import qwen_batch.tiny.controlnet as tiny_controlnet
from qwen_batch.errors import ConfigError
from qwen_batch.tiny.controlnet import ensure_tiny_controlnet, write_tiny_controlnet

SIZE = 64  # the tiny model takes multiples of 16 pixels (VAE factor 8, 2x2 patches); 64 is 4x4 tokens
KINDS = ("union", "inpaint")


def square(size: int = SIZE) -> np.ndarray:
    """A white square on black, the middle half of the picture: a canny-like control and a mask."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return pixels


@pytest.fixture(scope="module")
def folders(tiny_model) -> dict[str, Path]:
    return {kind: ensure_tiny_controlnet(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def base(tiny_model) -> diffusers.QwenImagePipeline:
    return diffusers.QwenImagePipeline.from_pretrained(tiny_model)


def controlled(base, folder: Path, pipeline_class):
    """diffusers' own ControlNet pipeline: the tiny model's components and the ControlNet loaded back."""
    controlnet = diffusers.QwenImageControlNetModel.from_pretrained(folder)
    pipe = pipeline_class(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, **inputs) -> np.ndarray:
    # The inpainting pipeline samples the masked image's latents from torch's global RNG (no generator):
    # seed it too, without disturbing other tests.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = pipe(
            "a red box on a table",
            negative_prompt="blurry",
            true_cfg_scale=4.0,  # both passes take the ControlNet's residuals
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            **inputs,
        ).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("kind", KINDS)
def test_loads_back_with_the_released_layout_and_fits_the_tiny_transformer(kind, folders, base):
    folder = folders[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    # Only the ControlNet's own arguments, as the released config.json: no transformer-only keys, no local path.
    accepted = set(inspect.signature(diffusers.QwenImageControlNetModel.__init__).parameters) - {"self"}
    assert {key for key in config if not key.startswith("_")} == accepted
    assert "_name_or_path" not in config

    controlnet = diffusers.QwenImageControlNetModel.from_pretrained(folder)
    transformer = base.transformer.config
    for key in ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim"):
        assert controlnet.config[key] == transformer[key], key
    assert list(controlnet.config.axes_dims_rope) == list(transformer.axes_dims_rope)
    layers, extra_channels = tiny_controlnet.TINY_CONTROLNET_KINDS[kind]
    assert (controlnet.config.num_layers, controlnet.config.extra_condition_channels) == (layers, extra_channels)
    assert controlnet.config.num_layers <= transformer.num_layers
    assert controlnet.controlnet_x_embedder.in_features == transformer.in_channels + extra_channels

    # The blocks are the transformer's first ones; the layers diffusers zero-initialises are not zero.
    copied = base.transformer.transformer_blocks[0].state_dict()
    for name, tensor in controlnet.transformer_blocks[0].state_dict().items():
        assert torch.equal(tensor, copied[name]), name
    for name, tensor in controlnet.state_dict().items():
        if name.startswith("controlnet_"):
            assert torch.count_nonzero(tensor) == tensor.numel(), f"{name} is (partly) zero"


def test_the_union_controlnet_changes_the_image_and_is_deterministic(folders, base):
    pipe = controlled(base, folders["union"], diffusers.QwenImageControlNetPipeline)
    control = Image.fromarray(square()).convert("RGB")
    on = render(pipe, control_image=control, controlnet_conditioning_scale=1.0)
    off = render(pipe, control_image=control, controlnet_conditioning_scale=0.0)
    assert on.shape == (SIZE, SIZE, 3)
    assert on.std() > 10, "image is (nearly) constant"
    assert np.abs(on - off).mean() > 5, "the ControlNet must visibly change the image"
    assert np.array_equal(on, render(pipe, control_image=control, controlnet_conditioning_scale=1.0))
    # Applied for no step at all is the same as scale 0.
    unused = render(pipe, control_image=control, control_guidance_start=1.0, control_guidance_end=1.0)
    assert np.array_equal(unused, off)


def test_the_inpaint_controlnet_changes_the_image_follows_the_mask_and_is_deterministic(folders, base):
    pipe = controlled(base, folders["inpaint"], diffusers.QwenImageControlNetInpaintPipeline)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(square())
    on = render(pipe, control_image=photo, control_mask=mask, controlnet_conditioning_scale=1.0)
    off = render(pipe, control_image=photo, control_mask=mask, controlnet_conditioning_scale=0.0)
    inverted = render(pipe, control_image=photo, control_mask=Image.fromarray(255 - square()))
    assert on.std() > 10, "image is (nearly) constant"
    assert np.abs(on - off).mean() > 5, "the ControlNet must visibly change the image"
    assert np.abs(on - inverted).mean() > 6, "another mask must give another image"
    assert np.array_equal(on, render(pipe, control_image=photo, control_mask=mask))


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_files_and_another_seed_does_not(kind, folders, tiny_model, tmp_path):
    again = write_tiny_controlnet(tmp_path / "again", kind, model_folder=tiny_model)
    assert digest(again) == digest(folders[kind])
    assert (again / "config.json").read_bytes() == (folders[kind] / "config.json").read_bytes()
    assert digest(write_tiny_controlnet(tmp_path / "seed1", kind, seed=1, model_folder=tiny_model)) != digest(again)


def test_ensure_builds_each_kind_once_per_revision(folders, monkeypatch):
    union = folders["union"]
    assert f"-union-r{tiny_controlnet.tiny_controlnet_revision()}-" in union.name
    assert union.parent.name == "models" and folders["inpaint"] != union
    built = (union / "config.json").stat().st_mtime_ns
    assert ensure_tiny_controlnet("union") == union
    assert (union / "config.json").stat().st_mtime_ns == built, "a built ControlNet is reused"
    assert not [p for p in union.parent.iterdir() if p.name.startswith(".building-")], "no staging left behind"
    # A changed builder (a bumped revision) builds a new one instead of reusing a stale one.
    monkeypatch.setattr(tiny_controlnet, "TINY_CONTROLNET_REVISION", tiny_controlnet.TINY_CONTROLNET_REVISION + 1)
    assert ensure_tiny_controlnet("union") != union


def test_an_unknown_kind_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="union, inpaint"):
        write_tiny_controlnet(tmp_path / "x", "depth")
    with pytest.raises(ConfigError, match="union, inpaint"):
        ensure_tiny_controlnet("canny")
    assert not (tmp_path / "x").exists()
