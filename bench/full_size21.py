"""Full-size Qwen-Image-2.1 components with random weights, built straight on the GPU: no download.

The transformer (`QwenImage21Transformer2DModel`, 32 single-stream blocks 4096 wide, 7.0 B parameters) and the
VAE (`AutoencoderKLQwenImage21`) with diffusers' class defaults, which are the published configuration. The
processor and the scheduler's configuration come from the tiny 2.1 model (its processor only tokenizes the
system turn here: the benchmarks hand the pipeline prompt embeddings, so the 8 B Qwen3-VL encoder is not built).

`full_size_source()` is a `ModelSource` whose loader returns that pipeline, so the engine runs it exactly as the
CLI runs a model on disk, and diffusers' `QwenImage21Pipeline` runs the very same modules.
"""

from __future__ import annotations

import torch

from bench.full_size import _building
from qwen_batch.weights.model_source import ModelSource, register_model, resolve_model

FULL_SIZE_MODEL21 = "full-size-random-2.1"
HIDDEN = 4096  # the encoder's hidden size, the transformer's `context_in_dim`


def build_transformer(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from diffusers import QwenImage21Transformer2DModel

    with _building(device, dtype, seed):
        return QwenImage21Transformer2DModel().eval()  # the class defaults are the released config


def build_vae(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 2):
    from diffusers import AutoencoderKLQwenImage21

    with _building(device, dtype, seed):
        return AutoencoderKLQwenImage21().eval()


def build_pipeline(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, tiny: bool = False):
    """diffusers' pipeline over the full-size transformer and VAE (no text encoder), or the tiny model's."""
    from diffusers import QwenImage21Pipeline

    folder = resolve_model("tiny-2.1").location
    if tiny:
        pipe = QwenImage21Pipeline.from_pretrained(folder, dtype=torch.float32, text_encoder=None)
    else:
        tiny_pipe = QwenImage21Pipeline.from_pretrained(folder, text_encoder=None, transformer=None, vae=None)
        pipe = QwenImage21Pipeline(
            scheduler=tiny_pipe.scheduler,
            vae=build_vae(device, dtype),
            text_encoder=None,
            processor=tiny_pipe.processor,
            transformer=build_transformer(device, dtype),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_size_source(pipe) -> ModelSource:
    """A model source whose loader hands the engine `pipe` (built once, shared with the diffusers baseline)."""
    source = ModelSource(
        name=FULL_SIZE_MODEL21,
        location=f"memory:{FULL_SIZE_MODEL21}",
        loader=lambda dtype, **components: pipe,
        config=dict(pipe.transformer.config),
        pipeline_class="QwenImage21Pipeline",
    )
    register_model(source)
    return source


def prompt_embeddings(count: int, device: str, dtype: torch.dtype, seed: int = 5, hidden: int = HIDDEN):
    """Stand-ins for the encoder's output: `count` embeddings of 12 to 240 tokens (a prompt's length after the
    template's system turn is dropped), with the scale of the last decoder layer's pre-norm states."""
    generator = torch.Generator("cpu").manual_seed(seed)
    lengths = torch.randint(12, 240, (count,), generator=generator).tolist()
    return [(torch.randn(length, hidden, generator=generator) * 4).to(device, dtype) for length in lengths]
