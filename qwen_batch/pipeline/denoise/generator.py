"""`ImageGenerator`: the transformer, VAE and ControlNet loaded and placed once, and each batch run through the
loop's blocks (`qwen_batch.pipeline.denoise.blocks`) over a `DenoiseState`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qwen_batch.adapters.fusion import AdapterFusion
from qwen_batch.memory.device import release_memory
from qwen_batch.memory.placement import (
    FP8,
    Placement,
    QuantizedWeights,
    compile_blocks,
    place_transformer,
    place_vae,
    streaming_arena,
)
from qwen_batch.memory.streamed_load import load_transformer
from qwen_batch.pipeline.conditions import BatchConditions
from qwen_batch.pipeline.conditions.controlnet import ControlNetSource
from qwen_batch.pipeline.denoise.blocks import QWEN_IMAGE_BLOCKS
from qwen_batch.pipeline.denoise.state import DenoiseBlocks, DenoiseComponents, DenoiseState
from qwen_batch.pipeline.denoise.text import TextLayout
from qwen_batch.weights.model_source import ModelSource, load_pipeline
from qwen_batch.weights.transformer_file import TransformerFile, denoiser_weights

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImagePipeline

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.denoise.decoded import DecodedImages


class ImageGenerator:
    """The denoising half of a Qwen-Image model, loaded once and reused for every batch."""

    # The loop, block by block: a model family of another architecture brings its own.
    blocks: DenoiseBlocks = QWEN_IMAGE_BLOCKS

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        placement: Placement | None = None,
        transformer_file: TransformerFile | None = None,
        controlnet: ControlNetSource | None = None,
    ):
        self.source, self.device, self.dtype = source, device, dtype
        self.placement = placement or Placement()
        pipe, placed, quantized = _load_denoiser(source, transformer_file, self.placement, device, dtype)
        described = [placed]  # the placement in words, a part per decision, for the log and the benchmarks
        # In the run's memory mode beside the transformer (InstantX's Union: 3.5 GB in bf16, 5 blocks).
        controlnet_model = None
        if controlnet is not None:
            controlnet_model, controlnet_placed = controlnet.load(device, dtype, self.placement)
            described.append(f"ControlNet {controlnet.location}: {controlnet_placed}")
        kernel, text_layout = self._attend(pipe.transformer, controlnet_model)
        if self.placement.compile:
            self._compile(pipe.transformer, controlnet_model, described)
        described += [f"padded batches attend through {kernel}", f"CFG halves {text_layout.cfg_layout}"]
        if text_layout.pack:
            described.append("text stream packed")
        self.memory_mode = "; ".join(described)
        self.fusion = AdapterFusion(pipe, quantized)
        # Rows with a step cache, over every batch: steps run (each CFG pass counted) and those computed in full.
        self.cached_steps, self.cached_steps_computed = 0, 0
        self._schedulers = {None: pipe.scheduler}
        place_vae(pipe.vae, device, self.placement.vae_tiling)
        pipe.set_progress_bar_config(disable=True)
        self.components = DenoiseComponents.build(pipe, controlnet_model, device, dtype, text_layout)

    def _attend(self, transformer: torch.nn.Module, controlnet: torch.nn.Module | None) -> tuple[str, TextLayout]:
        """Install the batch attention (before compiling: it is traced) and choose how forwards take their text;
        returns the attention kernel of padded batches and the text layout."""
        from qwen_batch.families.qwen_image.attention import use_batch_attention
        from qwen_batch.families.qwen_image.packed_text import share_timestep_modulation

        kernel = use_batch_attention(transformer, self.device, self.dtype)
        if controlnet is not None:
            use_batch_attention(controlnet, self.device, self.dtype, kernel)
        text_layout = TextLayout.choose(kernel, self.placement, self.device)
        if text_layout.pack:
            share_timestep_modulation(transformer)
        return kernel, text_layout

    def _compile(self, transformer: torch.nn.Module, controlnet: torch.nn.Module | None, described: list[str]) -> None:
        """Regional compile of the transformer's blocks and the ControlNet's; what was done joins `described`
        (which also tells `compile_blocks` whether layerwise casting's hooks are in the way)."""
        from qwen_batch.families.qwen_image.text_length import compile_once_for_every_text_length

        compile_once_for_every_text_length(transformer)
        compiled = compile_blocks(transformer, self.placement, "; ".join(described))
        described += [compiled] if compiled else []
        if controlnet is not None:
            compile_once_for_every_text_length(controlnet)
            compiled = compile_blocks(controlnet, self.placement, "; ".join(described), "ControlNet")
            described += [compiled] if compiled else []

    @property
    def pipe(self) -> QwenImagePipeline:
        return self.components.pipe

    @property
    def controlnet(self) -> torch.nn.Module | None:
        return self.components.controlnet

    def generate(
        self,
        requests: Sequence[Request],
        prompt_embeds: Sequence[torch.Tensor],
        negative_embeds: Sequence[torch.Tensor] | None,
        conditions: BatchConditions | None = None,
    ) -> DecodedImages:
        """Images for a batch of requests that share size, steps and guidance (`Request.batch_key`).

        `prompt_embeds[i]` (and `negative_embeds[i]` when guidance is on) are row i's unpadded
        `[tokens, hidden]` embeddings, as the cache stores them. `conditions`: what the rows bring besides
        their text (edit inputs, an image to start from, a mask, control images), `qwen_batch.pipeline.conditions`.

        Never waits for the GPU: inputs go up from pinned memory, the schedule stays on the host, and
        the images come back through `DecodedImages`, whose copy runs behind the next batch's work.
        """
        import torch

        keys = {request.batch_key for request in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must share size, steps, guidance, adapters and shift; got {len(keys)} kinds")
        scheduler = self._prepare(requests[0])
        conditions = conditions or BatchConditions()
        if conditions.controls is not None and self.controlnet is None:
            raise ValueError("rows with control images need the run's ControlNet (--controlnet)")
        blocks, components = self.blocks, self.components
        state = DenoiseState.for_batch(
            requests, prompt_embeds, negative_embeds, conditions, scheduler, self.pipe.vae_scale_factor
        )
        with torch.inference_mode():
            blocks.text_conditions(state, components)
            blocks.timesteps(state, components)
            blocks.starting_latents(state, components)
            for step, t in enumerate(state.timesteps):
                blocks.step(state, components, step, t)
            images = blocks.decode(state, components)
        if state.step_cache is not None:
            self._count_cached_steps(state, images)
        return images

    def _count_cached_steps(self, state: DenoiseState, images: DecodedImages) -> None:
        """Rows with a step cache: the steps they ran (each CFG pass counted) and those computed in full."""
        self.cached_steps += len(state.timesteps) * len(state.texts)
        self.cached_steps_computed += sum(cond + (uncond or 0) for cond, uncond in images.steps_computed)

    def _prepare(self, request: Request):
        """Apply what the batch is keyed on besides shapes: fuse its adapters; return its scheduler.

        A row with a `scheduler_shift` samples with the model's scheduler config set to that fixed shift
        (`fixed_shift_scheduler`: the Lightning recipe with 3); its LoRA adapters are fused into the weights
        (`qwen_batch.adapters.fusion`)."""
        self.fusion.use(request.loras)
        shift = request.scheduler_shift
        if shift not in self._schedulers:
            self._schedulers[shift] = fixed_shift_scheduler(self.pipe.scheduler, shift)
        return self._schedulers[shift]

    def close(self) -> None:
        # The fusion holds the pipeline and weight copies; the components hold the models and their device tensors.
        del self.components, self.fusion, self._schedulers
        release_memory(self.device)


def _load_denoiser(
    source: ModelSource, transformer_file: TransformerFile | None, placement: Placement, device: str, dtype: torch.dtype
) -> tuple[QwenImagePipeline, str, QuantizedWeights | None]:
    """The pipeline without its text encoder, the transformer placed as `placement` says (not compiled yet):
    streamed from its checkpoint files block by block (`qwen_batch.memory.streamed_load`), or, for a model built in
    memory (the benchmarks' full-size random weights), placed from where it was built. Returns the pipeline,
    the placement line and, for fp8 with adapters, the way back to the original weights."""
    import time

    started = time.perf_counter()
    if source.loader is not None:
        pipe = load_pipeline(source, dtype, text_encoder=None, tokenizer=None, processor=None)
        transformer = pipe.transformer
        # fp8 with adapters: references to the host weights, to fuse adapters in bf16 (qwen_batch.adapters.fusion).
        keep = QuantizedWeights.capture(transformer) if placement.adapters and placement.mode == FP8 else {}
        done = place_transformer(transformer, placement, device, dtype, streaming_arena(placement, device))
        return pipe, done, QuantizedWeights.after_placement(transformer, keep, device)
    weights = denoiser_weights(source, transformer_file)
    loaded = load_transformer(weights, placement, device, dtype)
    pipe = load_pipeline(source, dtype, text_encoder=None, tokenizer=None, processor=None, transformer=loaded.model)
    done = f"{loaded.done}; loaded from {weights.label} in {time.perf_counter() - started:.1f} s"
    return pipe, done, loaded.quantized


def fixed_shift_scheduler(scheduler, shift: float):
    """The model's scheduler with a fixed sampling shift at every size: its config with
    `base_shift = max_shift = ln(shift)` and no terminal stretch (Qwen-Image-Lightning's published config)."""
    import math

    return type(scheduler).from_config(
        scheduler.config, base_shift=math.log(shift), max_shift=math.log(shift), shift_terminal=None
    )
