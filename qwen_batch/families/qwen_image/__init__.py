"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (and Qwen-Image-2512, a Qwen-Image checkpoint): a 60-block
MMDiT with a Qwen2.5-VL text encoder, a 16-channel VAE at 8x, and 2x2 latent patches.

The family object (`FAMILY`) and this subpackage's transformer patches: joint attention over packed text
(`attention`, `packed_text`), a fusable rotary embedding (`rotary`), the feed-forward's GELU in its GEMM
(`gelu_epilogue`). Its stages are `qwen_batch.pipeline.encode` and `qwen_batch.pipeline.denoise`; its
planner constants are `costs`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from qwen_batch.families import EDIT, EDIT_PLUS, GENERATE, ModelFamily, RowRules

TINY_MODELS = {"tiny": GENERATE, "tiny-edit": EDIT, "tiny-edit-plus": EDIT_PLUS}


def _write_tiny_model(folder: Path, seed: int, task: str) -> Path:
    from qwen_batch.tiny.model import write_tiny_model

    return write_tiny_model(folder, seed=seed, task=task)


def _tiny_model_revision(task: str) -> str:
    from qwen_batch.tiny.model import tiny_model_revision

    return tiny_model_revision(task)


def _cost_constants() -> ModuleType:
    from qwen_batch.families.qwen_image import costs

    return costs


def _encode(requests: list, context, edit: bool):
    if edit:  # the Qwen2.5-VL encoder sees each row's input images with its instruction
        from qwen_batch.pipeline.conditions.edit import encode_edit_inputs

        return encode_edit_inputs(requests, context)
    from qwen_batch.pipeline.encode import encode_texts

    return encode_texts([text for request in requests for text in request.texts], context)


def _open_cache(folder, source, dtype, pipeline_class: str, edit: bool):
    if edit:  # an instruction's embedding depends on its images and the edit template
        from qwen_batch.pipeline.conditions.edit import open_edit_cache

        return open_edit_cache(folder, source, pipeline_class, dtype)
    from qwen_batch.pipeline.encode import open_cache

    return open_cache(folder, source, dtype)


def _cached_rows(cache, edit: bool):
    from qwen_batch.pipeline.conditions.edit import EditConditions
    from qwen_batch.pipeline.conditions.rows import CachedRows

    return CachedRows(cache, EditConditions(cache) if edit else None)


def _generator_class() -> type:
    from qwen_batch.pipeline.denoise import ImageGenerator

    return ImageGenerator


FAMILY = ModelFamily(
    name="qwen-image",
    pipelines={"QwenImagePipeline": GENERATE, "QwenImageEditPipeline": EDIT, "QwenImageEditPlusPipeline": EDIT_PLUS},
    encoder_components=("text_encoder", "tokenizer"),
    denoiser_components=("transformer", "vae", "scheduler"),
    rows=RowRules(
        # The VAE's 8x downscale times the transformer's 2x2 patches.
        size_multiple=16,
        min_size=256,
        max_size=2048,
        default_size=1024,
        default_steps=50,
        # Not 1: with a single step the scheduler's terminal shift (shift_terminal 0.02) divides 0 by 0 and
        # the image is NaN, in diffusers' own pipeline too.
        min_steps=2,
        max_steps=200,
        default_true_cfg_scale=4.0,
    ),
    example_models={GENERATE: "Qwen/Qwen-Image", EDIT: "Qwen/Qwen-Image-Edit", EDIT_PLUS: "Qwen/Qwen-Image-Edit-2509"},
    tiny_models=TINY_MODELS,
    write_tiny_model=_write_tiny_model,
    tiny_model_revision=_tiny_model_revision,
    cost_constants=_cost_constants,
    encode=_encode,
    generator_class=_generator_class,
    open_cache=_open_cache,
    cached_rows=_cached_rows,
)
