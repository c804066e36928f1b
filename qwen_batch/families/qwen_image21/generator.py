"""`ImageGenerator21`: a 2.1 model's transformer and VAE loaded and placed once, and each batch denoised from the
cached embeddings: the first step row by row (`forward.prefill`, which also caches each row's prefix), every
later step for the whole batch (`forward.Decoder`), then the VAE's RGBA images.

The arithmetic is `QwenImage21Pipeline.__call__`'s for one prompt: the noise drawn from the row's own generator,
the schedule (the checkpoint's `sample_sigmas`, or `linspace(1, 1/steps)` shifted for the image's size), guidance
as `negative + scale * (prompt - negative)`, and the decode with the VAE's latents statistics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from qwen_batch.adapters.fusion import AdapterFusion
from qwen_batch.families.qwen_image21.forward import FirstBlockSteps, block_regions, pipeline_forward
from qwen_batch.memory.device import release_memory, to_device
from qwen_batch.memory.modes import BF16, FP8, FP8_OFFLOAD
from qwen_batch.memory.placement import (
    Placement,
    QuantizedWeights,
    place_transformer,
    place_vae,
    streaming_arena,
    use_compile_cache,
)
from qwen_batch.pipeline.denoise.decoded import DecodedImages, not_finite_rows
from qwen_batch.pipeline.step_cache import Forward
from qwen_batch.weights.model_source import ModelSource, load_pipeline

if TYPE_CHECKING:
    import torch

    from qwen_batch.families.qwen_image21.rows import Batch21
    from qwen_batch.manifest import Request
    from qwen_batch.weights.transformer_file import TransformerFile

log = logging.getLogger(__name__)

LATENT_PIXELS = 16
# Every step per row through diffusers' forward (what offload modes need) instead of the batched decoder: None
# decides by the placement; tests set it to run that path on the CPU.
PER_ROW_STEPS: bool | None = None
# CUDA-graph replay of the batched steps after the first (`forward.StepGraph`). Measured on an H100 and an H200
# (docs/benchmarks.md): see there whether it pays; the generator's `step_graphs` follows this.
STEP_GRAPHS = False


class ImageGenerator21:
    """The denoising half of a Qwen-Image-2.1 model, loaded once and reused for every batch."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        placement: Placement | None = None,
        transformer_file: TransformerFile | None = None,
        controlnet=None,
    ):
        from qwen_batch.errors import ConfigError

        if transformer_file is not None or controlnet is not None:
            raise ConfigError(
                "--transformer and --controlnet are Qwen-Image's; Qwen-Image-2.1 runs its own transformer"
            )
        self.source, self.device, self.dtype = source, device, dtype
        self.placement = placement or Placement()
        if self.placement.mode in (FP8, FP8_OFFLOAD):  # no block linear of 2.1 stays bf16 (the anchors': all 160)
            self.placement = replace(self.placement, fp8_every_linear=True)
        straight = (
            _transformer_straight_to(source, device, dtype) if _loads_straight(source, self.placement, device) else None
        )
        # The processor stays: the pipeline's __init__ reads it.
        pipe = load_pipeline(source, dtype, text_encoder=None, **({"transformer": straight} if straight else {}))
        transformer = pipe.transformer
        # fp8 with adapters: references to the bf16 weights, to fuse adapters in bf16 (qwen_batch.adapters.fusion).
        keep = QuantizedWeights.capture(transformer) if self.placement.adapters and self.placement.mode == FP8 else {}
        placed = place_transformer(transformer, self.placement, device, dtype, streaming_arena(self.placement, device))
        quantized = QuantizedWeights.after_placement(transformer, keep, device)
        described = [placed]
        compile = self.placement.compile and not self.placement.streams and "layerwise" not in placed
        if compile:
            use_compile_cache(self.placement.compile_cache)
            described.append("blocks compiled around their attention (regional)")
        # The steps after the first run the blocks in two regions around each row's prefix attention.
        self.regions = block_regions(pipe.transformer, compile)
        self.per_row_steps = self.placement.streams if PER_ROW_STEPS is None else PER_ROW_STEPS
        # The steps after the first replayed from a CUDA graph (`forward.StepGraph`); off unless measured to pay.
        self.step_graphs = STEP_GRAPHS and device.startswith("cuda") and not self.per_row_steps
        if self.per_row_steps:
            described.append("every step per row through diffusers' forward (the offload hooks move the weights)")
        self.memory_mode = "; ".join(described)
        place_vae(pipe.vae, device, self.placement.vae_tiling)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.fusion = AdapterFusion(pipe, quantized)  # the batch's adapters, fused into the weights (per-row LoRA)
        self.cached_steps, self.cached_steps_computed = 0, 0
        self._schedulers = {None: pipe.scheduler}
        import torch

        vae = pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, vae.dtype)
        self.latents_std = torch.tensor(vae.config.latents_std).view(shape).to(device, vae.dtype)

    def generate(
        self,
        requests: Sequence[Request],
        prompt_embeds: Sequence[torch.Tensor],
        negative_embeds: Sequence[torch.Tensor] | None,
        conditions: Batch21,
    ) -> DecodedImages:
        """Images for a batch of rows that share size, steps, guidance and shift (`Request.batch_key`);
        `prompt_embeds[i]` (and `negative_embeds[i]` with guidance) are row i's cached embeddings, `conditions`
        its image-slot masks and condition images (`qwen_batch.families.qwen_image21.rows`)."""
        import torch

        keys = {request.batch_key for request in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must share size, steps, guidance and shift; got {len(keys)} kinds")
        first = requests[0]
        self.fusion.use(first.loras)  # the batch's adapter set fused into the weights (qwen_batch.adapters.fusion)
        width, height = first.width, first.height
        target_shape = (1, height // LATENT_PIXELS, width // LATENT_PIXELS)
        forwards = self._forward_rows(prompt_embeds, negative_embeds, conditions)
        batch = len(requests)
        with torch.inference_mode():
            latents = to_device(
                torch.cat([self._noise(request.seed, width, height) for request in requests]), self.device
            )
            scheduler = self._scheduler(first.scheduler_shift)
            timesteps = self._timesteps(scheduler, first.num_inference_steps, latents.shape[1])
            steps = _BatchSteps(
                self.pipe.transformer, forwards, self.regions, batch, target_shape, self.per_row_steps, self.step_graphs
            )
            step_cache = _step_cache(first.step_cache, len(forwards), self.pipe.transformer)
            first_block = step_cache if isinstance(step_cache, FirstBlockSteps) else None
            if first_block is not None and self.per_row_steps:
                raise ValueError(
                    "first-block step caching runs in the batched decoder, which the offload modes do not use on "
                    "Qwen-Image-2.1: use taylorseer for these rows, or a memory mode that keeps the model on the GPU"
                )
            for step, t in enumerate(timesteps):
                timestep = (t.expand(batch).to(latents.dtype) / 1000).to(self.device)
                call = functools.partial(steps.forward, latents, timestep, first_block)
                if step_cache is None or first_block is not None:  # first-block decides inside the forward
                    prediction = call()
                else:  # the step runs, or each forward row's output is extrapolated from its own full steps
                    prediction = step_cache.run(step, [Forward(0, len(forwards), call)])[0]
                    if step == 0:  # as diffusers' TaylorSeer on 2.1, whose first output spans the prefix too
                        step_cache.restart_factors()
                if first.uses_cfg:
                    conditional, negative = prediction[:batch], prediction[batch:]
                    prediction = negative + first.true_cfg_scale * (conditional - negative)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
            images = self._decode(latents, width, height)
        if step_cache is not None:
            counts = step_cache.cache if isinstance(step_cache, FirstBlockSteps) else step_cache
            images.steps_computed = counts.steps_computed(batch)
            self.cached_steps += len(timesteps) * len(forwards)
            self.cached_steps_computed += sum(cond + (uncond or 0) for cond, uncond in images.steps_computed)
        return images

    def _forward_rows(self, prompt_embeds, negative_embeds, conditions: Batch21) -> list:
        """The forward rows of a batch: every row with its prompt, then with guidance every row with its negative
        prompt, each with the row's condition images."""
        import torch

        from qwen_batch.families.qwen_image21.forward import RowForward

        def on_device(tensor):  # from pinned memory, without waiting (qwen_batch.memory.device.to_device)
            return to_device(tensor, self.device)

        images = [
            on_device(torch.cat(latents).to(self.dtype)) if latents else None for latents in conditions.image_latents
        ]
        texts = [(prompt_embeds, conditions.prompt_slots)]
        if negative_embeds is not None:
            texts.append((negative_embeds, conditions.negative_slots))
        return [
            RowForward(on_device(embedding.to(self.dtype)), on_device(slots), images[row], conditions.image_shapes[row])
            for embeddings, slots_list in texts
            for row, (embedding, slots) in enumerate(zip(embeddings, slots_list, strict=True))
        ]

    def _noise(self, seed: int, width: int, height: int):
        """`prepare_latents`' draw for one image from the row's own CPU generator, packed (a plain flatten: 2.1
        takes its latents unpatched)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.pipe.transformer.config.in_channels
        latent_height, latent_width = height // LATENT_PIXELS, width // LATENT_PIXELS
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor((1, 1, channels, latent_height, latent_width), generator=generator, dtype=self.dtype)
        return self.pipe._pack_latents(noise, 1, channels, latent_height, latent_width)

    def _scheduler(self, shift: float | None):
        if shift not in self._schedulers:
            from qwen_batch.pipeline.denoise.generator import fixed_shift_scheduler

            self._schedulers[shift] = fixed_shift_scheduler(self.pipe.scheduler, shift)
        return self._schedulers[shift]

    def _timesteps(self, scheduler, steps: int, tokens: int):
        """The pipeline's schedule, on the host: the checkpoint's sigma grid or `linspace(1, 1/steps)`, shifted
        for the image's token count."""
        import numpy as np
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

        sigmas = self.pipe.config.get("sample_sigmas") or np.linspace(1.0, 1 / steps, steps)
        config = scheduler.config
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def _decode(self, latents, width: int, height: int) -> DecodedImages:
        """The VAE's RGBA images, as the pipeline decodes and post-processes them, uint8 on their way to the host
        (a row whose latents or pixels are not finite marked as such: `DecodedImages`)."""
        import torch

        pipe, vae = self.pipe, self.pipe.vae
        vae_latents = pipe._unpack_latents(latents, height, width, LATENT_PIXELS).to(vae.dtype)
        vae_latents = vae_latents * self.latents_std + self.latents_mean
        pixels = vae.decode(vae_latents, return_dict=False)[0][:, :, 0]
        # Checked per row before the clamp, which would turn a NaN row into a black image; on the device, no wait.
        not_finite = not_finite_rows(latents, pixels)
        pixels = (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        return DecodedImages((pixels * 255).round().to(torch.uint8), not_finite)

    def close(self) -> None:
        del self.pipe, self.fusion, self._schedulers
        release_memory(self.device)


def _loads_straight(source: ModelSource, placement: Placement, device: str) -> bool:
    """Resident on a GPU (bf16, or fp8 quantized there block by block), the transformer's 14 GB go from their
    memory-mapped files straight to the GPU; host RAM holds file pages, never a copy of the model."""
    return source.loader is None and device.startswith("cuda") and placement.mode in (BF16, FP8)


def _transformer_straight_to(source: ModelSource, device: str, dtype: torch.dtype):
    from diffusers import QwenImage21Transformer2DModel

    folder = source.folder_with(("transformer",))
    return QwenImage21Transformer2DModel.from_pretrained(
        folder, subfolder="transformer", dtype=dtype, device_map={"": device}, use_safetensors=True
    )


class _BatchSteps:
    """A batch's transformer forwards, step after step: the first runs each forward row alone (`prefill`, which
    caches its prefix), the later ones the whole batch over its target tokens (`Decoder`)."""

    def __init__(
        self,
        transformer,
        forwards: list,
        regions,
        batch: int,
        target_shape: tuple[int, int, int],
        per_row: bool,
        graphs: bool = False,
    ):
        self.transformer, self.forwards, self.regions = transformer, forwards, regions
        self.batch, self.target_shape = batch, target_shape
        # Offload modes move each block's weights around its forward (hooks): every step then runs diffusers'
        # forward for each row alone, from its cached prefix, as the pipeline does; the batched decoder calls
        # the blocks' layers directly, which those hooks would not see.
        self.per_row, self.graphs = per_row, graphs
        self.decoder, self.prefixes = None, None

    def _rows(self):
        return [slice(index % self.batch, index % self.batch + 1) for index in range(len(self.forwards))]

    def forward(self, latents, timestep, first_block: FirstBlockSteps | None = None):
        """The prediction of every forward row (rows, then with guidance their negative prompts) for `latents`."""
        import contextlib
        import math

        import torch

        from qwen_batch.families.qwen_image21.forward import Decoder, StepGraph, prefill

        copies = len(self.forwards) // self.batch
        if self.prefixes is not None:  # the weights move around each block's forward: diffusers' forward per row
            return torch.cat(
                [
                    pipeline_forward(self.transformer, row, latents[rows], timestep[rows], self.target_shape,
                                     prefix.cache, "cached")
                    for row, rows, prefix in zip(self.forwards, self._rows(), self.prefixes, strict=True)
                ]
            )  # fmt: skip
        if self.decoder is not None:
            return self.decoder.forward(torch.cat([latents] * copies), torch.cat([timestep] * copies), first_block)
        predictions, prefixes = [], []
        for index, row in enumerate(self.forwards):
            rows = slice(index % self.batch, index % self.batch + 1)
            tokens = math.prod(self.target_shape)
            hooks = first_block.capture(self.transformer, tokens) if first_block else contextlib.nullcontext()
            with hooks:
                prediction, prefix = prefill(self.transformer, row, latents[rows], timestep[rows], self.target_shape)
            predictions.append(prediction)
            prefixes.append(prefix)
        if first_block is not None:
            first_block.first_step(len(self.forwards))
        if self.per_row:
            self.prefixes = prefixes
            return torch.cat(predictions)
        # The decoder holds what it needs of the prefixes (stacked per run of rows, or as they are).
        self.decoder = Decoder(self.transformer, prefixes, self.regions)
        if self.graphs:
            self.decoder = StepGraph(self.decoder)
        return torch.cat(predictions)


def _step_cache(spec_text: str | None, rows: int, transformer):
    """The batch's step cache, per forward row, or None: TaylorSeer (`qwen_batch.pipeline.step_cache.taylorseer`),
    whose first step always runs (it caches the rows' prefixes), or first-block (`forward.FirstBlockSteps`)."""
    from qwen_batch.pipeline.step_cache import FirstBlock, parse_step_cache

    spec = parse_step_cache(spec_text)
    if spec is None:
        return None
    if isinstance(spec, FirstBlock):
        from qwen_batch.pipeline.step_cache.first_block import FirstBlockRows

        return FirstBlockSteps(FirstBlockRows(spec, transformer, rows))
    from qwen_batch.pipeline.step_cache.taylorseer import TaylorSeerRows

    return TaylorSeerRows(replace(spec, warmup=max(spec.warmup, 1)), rows)
