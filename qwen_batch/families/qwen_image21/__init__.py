"""Qwen-Image-2.1 and 2.1-Turbo: a 7 B single-stream transformer with block-causal attention and a prefix KV
cache, a Qwen3-VL 8B encoder, and a 64-channel 16x VAE that decodes RGBA.

A row is a prompt and, optionally, condition images (`images`): the encoder sees them inside the prompt, and
their VAE latents take the image slots the encoder reserved, before the noise. Stage 1 (`encode`) caches each
distinct (prompt, its images) embedding with its image-slot mask, and each image's latents by content; stage 2
(`rows` to find them, `generator` and `forward` to denoise) runs batches whose rows may differ in prompt
length and images: each row attends to its own prefix (text and condition images), whose keys and values are
computed once, alone, as diffusers computes them, so a row's image does not depend on what shares its batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from qwen_batch.families import GENERATE, ModelFamily, RowRules

TURBO = "turbo"  # the tiny model's flavour with Turbo's fixed sigma grid
TINY_MODELS = {"tiny-2.1": GENERATE, "tiny-2.1-turbo": TURBO}
# Condition images a row may bring; each adds its tokens (4,096 at 1024x1024) to the row's prefix.
MAX_CONDITION_IMAGES = 4
# diffusers' `output_resolution`: condition images are resized to about this square's area, and a row with
# condition images and no size takes the last one's aspect ratio at this area.
OUTPUT_RESOLUTION = 1024


def _write_tiny_model(folder: Path, seed: int, flavour: str) -> Path:
    from qwen_batch.families.qwen_image21.tiny import write_tiny_model

    return write_tiny_model(folder, seed=seed, flavour=flavour)


def _tiny_model_revision(flavour: str) -> str:
    from qwen_batch.families.qwen_image21.tiny import tiny_model_revision

    return tiny_model_revision(flavour)


def _cost_constants() -> ModuleType:
    from qwen_batch.families.qwen_image21 import costs

    return costs


def _encode(requests: list, context, edit: bool):
    from qwen_batch.families.qwen_image21.encode import encode_rows

    return encode_rows(requests, context)


def _generator_class() -> type:
    from qwen_batch.families.qwen_image21.generator import ImageGenerator21

    return ImageGenerator21


def _open_cache(folder, source, dtype, pipeline_class: str, edit: bool):
    from qwen_batch.families.qwen_image21.encode import open_cache

    return open_cache(folder, source, dtype)


def _cached_rows(cache, edit: bool):
    from qwen_batch.families.qwen_image21.rows import CachedRows21

    return CachedRows21(cache)


def _checkpoint_rules(rules: RowRules, model_index: Mapping[str, Any]) -> RowRules:
    """Turbo's `model_index.json` carries a fixed grid of sigmas: its length is the only step count."""
    sigmas = model_index.get("sample_sigmas")
    if not sigmas:
        return rules
    return replace(rules, default_steps=len(sigmas), fixed_steps=len(sigmas))


def _tiny_model_index(flavour: str) -> dict[str, Any]:
    """What `_checkpoint_rules` reads from a tiny model's model_index.json: Turbo's fixed grid of sigmas."""
    from qwen_batch.families.qwen_image21.tiny import TURBO_SIGMAS

    return {"sample_sigmas": list(TURBO_SIGMAS) if flavour == TURBO else None}


def _unsupported(request) -> str | None:
    """What Qwen-Image's rows may ask for that 2.1 does not do (yet): the row is invalid with the reason."""
    if request.starts_from_image or request.mask_image:
        return (
            "init_image and mask_image (image-to-image, inpainting) are Qwen-Image's; with Qwen-Image-2.1 give the "
            "image in `images`, as a condition image the prompt refers to"
        )
    if request.controls:
        return "control_image needs a Qwen-Image ControlNet; Qwen-Image-2.1 has none: remove the control columns"
    return None


FAMILY = ModelFamily(
    name="qwen-image-2.1",
    pipelines={"QwenImage21Pipeline": GENERATE},
    encoder_components=("text_encoder", "processor", "vae"),
    denoiser_components=("transformer", "vae", "scheduler"),
    rows=RowRules(
        # The VAE's 16x downscale, and the encoder's image slots each stand for 2x2 latent tokens.
        size_multiple=32,
        min_size=256,
        max_size=2048,
        default_size=OUTPUT_RESOLUTION,
        default_steps=40,
        min_steps=2,
        max_steps=200,
        default_true_cfg_scale=1.0,
        max_condition_images=MAX_CONDITION_IMAGES,
        guidance_needs_negative_prompt=True,
    ),
    example_models={GENERATE: "Qwen/Qwen-Image-2.1"},
    tiny_models=TINY_MODELS,
    write_tiny_model=_write_tiny_model,
    tiny_model_revision=_tiny_model_revision,
    cost_constants=_cost_constants,
    encode=_encode,
    generator_class=_generator_class,
    open_cache=_open_cache,
    cached_rows=_cached_rows,
    checkpoint_rules=_checkpoint_rules,
    unsupported=_unsupported,
    tiny_model_index=_tiny_model_index,
    rgba_output=True,
)
