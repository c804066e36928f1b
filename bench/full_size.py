"""Full-size Qwen-Image components with random weights, built straight on the GPU: no download.

Random weights cost the same FLOPs and bytes as the released ones, so speed and memory measured on
them hold for the real model (image quality does not). Building the 20 B transformer on the GPU in
bf16 takes seconds; on the CPU in fp32 it would need 82 GB.

`full_size_source()` is a `ModelSource` whose loader builds these modules, so a benchmark runs them
through qwen-batch's own engine, exactly as the CLI does for a model on disk. The tokenizer and the
scheduler's configuration come from the tiny model (its scheduler config is the released one; its
tokenizer's ids fit the real 152,064-token vocabulary), so nothing needs the network.

The edit models (`task` "edit": `QwenImageEditPipeline`, as Qwen/Qwen-Image-Edit; "edit-plus":
`QwenImageEditPlusPipeline`, as Qwen/Qwen-Image-Edit-2509) have the same transformer, VL encoder and
VAE; their `Qwen2VLProcessor` comes from the tiny edit model, whose image-processing configuration is
the released one (14-pixel patches merged 2x2, temporal patch 2, 3,136 to 12,845,056 pixels).

Kept free of Prefect and S3: the GPU machine has neither.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from qwen_batch.weights.model_source import ModelSource, ensure_tiny_model, register_model

FULL_SIZE_MODEL = "full-size-random"
# The model name `full_size_source(task=...)` registers, per task of `qwen_batch.tiny.model.TINY_MODEL_TASKS`.
FULL_SIZE_MODELS = {
    "generate": FULL_SIZE_MODEL,
    "edit": "full-size-random-edit",
    "edit-plus": "full-size-random-edit-plus",
}

# QwenImageTransformer2DModel as released (Qwen/Qwen-Image transformer/config.json).
TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# Qwen2.5-VL-7B as released (Qwen/Qwen-Image text_encoder/config.json).
TEXT_CONFIG = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
}
VISION_CONFIG = {
    "depth": 32,
    "hidden_size": 1280,
    "hidden_act": "silu",
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


@contextlib.contextmanager
def _building(device: str, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Construct modules directly on `device` in `dtype`, from a fixed seed (same weights every run)."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any):
    from diffusers import QwenImageTransformer2DModel

    with _building(device, dtype, seed):
        return QwenImageTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides}).eval()


# InstantX/Qwen-Image-ControlNet-Union as released: 5 blocks of the transformer's kind, no extra channels
# (the inpainting ControlNet: 6 blocks, `extra_condition_channels` 4).
CONTROLNET_CONFIG = {key: TRANSFORMER_CONFIG[key] for key in (
    "patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
    "axes_dims_rope")} | {"num_layers": 5, "extra_condition_channels": 0}  # fmt: skip


def build_controlnet(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 3, **overrides: Any):
    """A full-size ControlNet with random weights; its input embedder and output projections, which training
    starts at zero, random too, so its residuals reach the image."""
    from diffusers import QwenImageControlNetModel

    with _building(device, dtype, seed):
        controlnet = QwenImageControlNetModel(**{**CONTROLNET_CONFIG, **overrides}).eval()
        with torch.no_grad():
            for layer in (controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    return controlnet


def build_text_encoder(tokenizer, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 1):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT_CONFIG,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config=VISION_CONFIG,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with _building(device, dtype, seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_vae(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 2):
    from diffusers import AutoencoderKLQwenImage

    with _building(device, dtype, seed):
        return AutoencoderKLQwenImage().eval()  # the library defaults are the released configuration


def _tiny_transformer_config(task: str = "generate") -> dict[str, Any]:
    from diffusers import QwenImageTransformer2DModel

    return dict(QwenImageTransformer2DModel.load_config(ensure_tiny_model(task), subfolder="transformer"))


def pipeline_class(task: str = "generate"):
    """The diffusers pipeline class of `task` ("generate", "edit" or "edit-plus")."""
    import diffusers

    from qwen_batch.tiny.model import TINY_MODEL_TASKS

    return getattr(diffusers, TINY_MODEL_TASKS[task])


def tiny_tokenizer_and_scheduler(task: str = "generate"):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    folder = ensure_tiny_model(task)  # an edit model's vocabulary also covers the edit template
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return tokenizer, scheduler


def tiny_processor(task: str = "edit"):
    """The tiny edit model's `Qwen2VLProcessor`: no weights, the released image-processing configuration."""
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(ensure_tiny_model(task) / "processor")


def build_pipeline(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, task: str = "generate", **components: None
):
    """A full-size pipeline of `task` on `device`; components passed as None are not built."""
    tokenizer, scheduler = tiny_tokenizer_and_scheduler(task)
    names = ("text_encoder", "tokenizer", "transformer", "vae") + (("processor",) if task != "generate" else ())
    wanted = {name for name in names if name not in components}
    extra = {"processor": tiny_processor(task) if "processor" in wanted else None} if task != "generate" else {}
    return pipeline_class(task)(
        scheduler=scheduler,
        tokenizer=tokenizer if "tokenizer" in wanted else None,
        text_encoder=build_text_encoder(tokenizer, device, dtype) if "text_encoder" in wanted else None,
        transformer=build_transformer(device, dtype) if "transformer" in wanted else None,
        vae=build_vae(device, dtype) if "vae" in wanted else None,
        **extra,
    )


def resident_pipeline(tiny: bool = False, task: str = "generate"):
    """The common recipe's pipeline of `task`, every component resident: full size on the GPU in bf16, or
    the tiny model on the CPU in fp32 (a benchmark's dry run)."""
    if tiny:
        pipe = pipeline_class(task).from_pretrained(ensure_tiny_model(task), dtype=torch.float32)
    else:
        pipe = build_pipeline("cuda", torch.bfloat16, task)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EmulatedGpu:
    """Cap this process's GPU memory to emulate a smaller card (`set_per_process_memory_fraction`).

    The cap binds PyTorch's allocator only (a real card also loses ~0.5 GiB to the CUDA context,
    which the planner sets aside). It is lifted while the random weights are built, as reading a
    model from disk into host RAM needs no GPU memory.
    """

    def __init__(self, gib: float | None):
        self.gib = gib

    def apply(self) -> None:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = 1.0 if self.gib is None else min(1.0, self.gib * 2**30 / total)
            torch.cuda.set_per_process_memory_fraction(fraction)

    def lift(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)


def full_size_source(
    gpu: EmulatedGpu | None = None,
    on_host: Callable[[str], bool] = lambda stage: False,
    device: str = "cuda",
    timings: dict[str, float] | None = None,
    name: str | None = None,
    tiny: bool = False,
    task: str = "generate",
) -> ModelSource:
    """Register and return a model source that builds the full-size random model of `task` ("generate",
    "edit" or "edit-plus"; named `FULL_SIZE_MODELS[task]` unless `name` is given).

    `on_host(stage)` ("encode" or "denoise") says, at load time, whether to hand the modules over in host RAM (as `from_pretrained`
    does), for memory modes that place weights themselves (fp8 quantizes layer by layer; offload pins
    and streams); otherwise they stay where they were built. The load's GPU peak is reset afterwards,
    so a stage's peak counts what its memory mode holds, not the building. `tiny=True` loads the tiny
    model instead (a dry run of a benchmark on the CPU).
    """
    gpu = gpu or EmulatedGpu(None)

    def loader(dtype: torch.dtype, **components: None):
        started = time.perf_counter()
        gpu.lift()
        if tiny:
            cls = pipeline_class(task)
            accepted = inspect.signature(cls.__init__).parameters  # `processor` only for the edit models
            wanted = {key: value for key, value in components.items() if key in accepted}
            pipe = cls.from_pretrained(ensure_tiny_model(task), dtype=dtype, **wanted)
        else:
            pipe = build_pipeline(device, dtype, task, **components)
        if on_host("encode" if "transformer" in components else "denoise"):
            for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
                if module is not None:
                    module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        gpu.apply()
        if timings is not None:
            timings["build_seconds"] = timings.get("build_seconds", 0.0) + time.perf_counter() - started
        return pipe

    name = name or FULL_SIZE_MODELS[task]
    config = dict(_tiny_transformer_config(task) if tiny else TRANSFORMER_CONFIG)  # adapters are checked against it
    kind = pipeline_class(task).__name__
    source = ModelSource(name=name, location=f"memory:{name}", loader=loader, config=config, pipeline_class=kind)
    register_model(source)
    return source
