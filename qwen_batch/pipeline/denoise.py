"""Stage 2: run the Qwen-Image transformer and VAE over cached embeddings, a batch at a time.

This is diffusers' `QwenImagePipeline.__call__` unrolled for batches of different prompts, with the
same arithmetic, so a row's image does not depend on what shares its batch:
- each row's starting noise is drawn from its own `torch.Generator("cpu").manual_seed(seed)`, with
  the shape and dtype the pipeline draws for a single image;
- the prompts of a batch are zero-padded to a common length and masked, so a row attends only to
  its own tokens;
- with true CFG the conditional and unconditional passes of the whole batch run as one forward (2B
  rows) or, where that is faster (`CFG_LAYOUT`), as two of B rows each, instead of two calls per image;
  their combination is rescaled per token to the conditional norm, as diffusers does.
Only the transformer, VAE and scheduler are loaded (`text_encoder=None, tokenizer=None`).

What a batch is keyed on besides shapes (`Request.batch_key`) is applied before it runs, in one place
(`ImageGenerator._prepare`): its LoRA adapters are fused into the weights (`qwen_batch.adapters.fusion`), and
a row with a `scheduler_shift` samples with the model's scheduler config set to that fixed shift
(`base_shift = max_shift = ln(shift)`, `shift_terminal = None`: the Lightning recipe with 3).

Edit models (Qwen-Image-Edit, Edit-Plus) run the same loop with the input images' cached latents
appended to each row's noise tokens (`image_latents`), as `QwenImageEditPipeline` does; only the
noise tokens' prediction is kept.

Rows with a step cache (`Request.step_cache`, shared by a batch) hand each step's forwards to it
(`qwen_batch.pipeline.step_cache`), which runs or reuses the transformer's work row by row and counts each row's
full steps (`DecodedImages.steps_computed`); a batch without one calls the transformer as it always did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from qwen_batch.adapters.fusion import AdapterFusion
from qwen_batch.memory.device import release_memory, to_device
from qwen_batch.memory.placement import (
    FP8,
    Placement,
    QuantizedWeights,
    compile_blocks,
    fp8_compute_available,
    place_transformer,
    place_vae,
    streaming_arena,
    weights_stay_put,
)
from qwen_batch.memory.streamed_load import load_transformer
from qwen_batch.pipeline.conditions import BatchConditions
from qwen_batch.pipeline.conditions.controlnet import ControlNetSource, compile_once_for_every_text_length
from qwen_batch.pipeline.step_cache import Forward, for_batch
from qwen_batch.weights.model_source import ModelSource, load_pipeline
from qwen_batch.weights.transformer_file import TransformerFile, denoiser_weights

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImagePipeline
    from PIL import Image

    from qwen_batch.manifest import Request


TEXT_BUCKET = 64  # padded text lengths are multiples of this (see _pad_embeddings)
# Under fp8 matmuls the text stream is padded (and masked) to a multiple of this many tokens even when every
# row has the same length. On an H200 (torch 2.11, torchao 0.17, cuBLASLt) the fp8 GEMM of the text MLP's
# down-projection (12,288 inputs) with 6 rows failed with CUBLAS_STATUS_NOT_SUPPORTED, which stopped eager and
# compiled fp8 alike when a batch's text was short and unpadded (SDPA, CFG halves apart: the negative prompt " "
# is a few tokens); 3,072-input layers ran at every row count tried, and packed text of hundreds of tokens ran
# in earlier sessions. At 12,288 inputs every row count from 1 to 32 failed and 64 ran (bench/fp8_matmul_probe.py,
# session 8): a whole bucket, which padded batches already use (no new compiled shapes).
FP8_TEXT_MULTIPLE = TEXT_BUCKET
# Packed text (below) under fp8 matmuls is made at least this long, with filler in the padded layout's masked
# slots (qwen_batch.families.qwen_image.packed_text.packed_places): a step cache's sub-batch of one or two rows packed 6-30 tokens
# and stopped an fp8 run (session 11). Longer packed text keeps its length, as every fp8 benchmark ran it.
FP8_PACKED_TEXT_MINIMUM = 64
# With true CFG: "joint" runs the conditional and unconditional rows in one forward, the negatives
# padded to the prompts' length; "split" runs them as two forwards, each padded to its own length (the
# negatives, all " ", then need no mask at all). "auto" picks by the attention kernel, as measured on
# an H200 (docs/benchmarks.md): under SDPA the mask is what costs, and split is 3.2% faster per image;
# under FlashAttention-4 padding costs almost nothing, and joint's larger forward is 1.5% faster. Only
# where the weights stay put: offload streams them and fp8 storage casts them once per forward, which
# split would do twice.
CFG_LAYOUT = "auto"
# Under FlashAttention-4, a padded batch's text stream runs packed: its layers see the rows' real tokens
# only (qwen_batch.families.qwen_image.packed_text). Measured on an H200: 0.1207 -> 0.1189 s per row-forward, 12.27 -> 12.12
# s per image (docs/benchmarks.md); its images are the padded path's (tests/test_contract.py, test_edit.py).
PACK_TEXT = True


class ImageGenerator:
    """The denoising half of a Qwen-Image model, loaded once and reused for every batch."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        placement: Placement | None = None,
        transformer_file: TransformerFile | None = None,
        controlnet: ControlNetSource | None = None,
    ):
        import torch

        from qwen_batch.families.qwen_image.attention import use_batch_attention
        from qwen_batch.families.qwen_image.packed_text import (
            compile_once_for_every_packed_length,
            share_timestep_modulation,
        )

        self.source, self.device, self.dtype = source, device, dtype
        self.placement = placement or Placement()
        self.pipe, self.memory_mode, quantized = _load_denoiser(source, transformer_file, self.placement, device, dtype)
        # In the run's memory mode beside the transformer (InstantX's Union: 3.5 GB in bf16, 5 blocks).
        self.controlnet = None
        if controlnet is not None:
            self.controlnet, placed = controlnet.load(device, dtype, self.placement)
            self.memory_mode += f"; ControlNet {controlnet.location}: {placed}"
        transformer = self.pipe.transformer
        kernel = use_batch_attention(transformer, device, dtype)  # before compiling: it is traced
        if self.controlnet is not None:
            use_batch_attention(self.controlnet, device, dtype, kernel)
        self.pack_text = PACK_TEXT and kernel == "fa4"
        if self.pack_text:
            share_timestep_modulation(transformer)
            compile_once_for_every_packed_length(transformer)
        if self.placement.compile:
            self.memory_mode = compile_blocks(transformer, self.placement, self.memory_mode)
            if self.controlnet is not None:
                compile_once_for_every_text_length(self.controlnet)
                self.memory_mode = compile_blocks(self.controlnet, self.placement, self.memory_mode, "ControlNet")
        fp8_matmuls = self.placement.mode == FP8 and fp8_compute_available(device)
        self.text_multiple = FP8_TEXT_MULTIPLE if fp8_matmuls else 1
        self.packed_text_minimum = FP8_PACKED_TEXT_MINIMUM if fp8_matmuls else 0
        split = kernel == "sdpa" and weights_stay_put(self.placement.mode, device)
        self.cfg_layout = CFG_LAYOUT if CFG_LAYOUT != "auto" else "split" if split else "joint"
        self.memory_mode += f"; padded batches attend through {kernel}; CFG halves {self.cfg_layout}"
        if self.pack_text:
            self.memory_mode += "; text stream packed"
        self.fusion = AdapterFusion(self.pipe, quantized)
        # Rows with a step cache, over every batch: steps run (each CFG pass counted) and those computed in full.
        self.cached_steps, self.cached_steps_computed = 0, 0
        self._schedulers = {None: self.pipe.scheduler}
        place_vae(self.pipe.vae, device, self.placement.vae_tiling)
        self.pipe.set_progress_bar_config(disable=True)
        # The latents' normalization, as the pipelines apply it before decoding: made once, not per batch.
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        # On the host too (float32, as the pipelines make them), for encoding starts and controls on the host
        # without reading the device's copies back (that would wait for the GPU at every batch).
        self._host_latents_mean = torch.tensor(vae.config.latents_mean).view(shape)
        self._host_latents_inverse_std = (1.0 / torch.tensor(vae.config.latents_std)).view(shape)
        self._latents_mean = self._host_latents_mean.to(device, vae.dtype)
        self._latents_inverse_std = self._host_latents_inverse_std.to(device, vae.dtype)

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
        their text (edit inputs, an image to start from, a mask), through the hooks of `qwen_batch.pipeline.conditions`.

        Never waits for the GPU: inputs go up from pinned memory, the schedule stays on the host, and
        the images come back through `DecodedImages`, whose copy runs behind the next batch's work.
        """
        import numpy as np
        import torch
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        keys = {request.batch_key for request in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must share size, steps, guidance, adapters and shift; got {len(keys)} kinds")
        first = requests[0]
        width, height, steps, guidance = first.width, first.height, first.num_inference_steps, first.true_cfg_scale
        use_cfg = first.uses_cfg
        scheduler = self._prepare(first)
        pipe, transformer = self.pipe, self.pipe.transformer
        batch = len(requests)
        conditions = conditions or BatchConditions()
        image_shapes, starts, controls = tuple(conditions.image_shapes), conditions.starts, conditions.controls
        if controls is not None and self.controlnet is None:
            raise ValueError("rows with control images need the run's ControlNet (--controlnet)")

        with torch.inference_mode():
            # 1. Text conditions: [cond..., uncond...] padded to one length, with a mask (or, split,
            # each half padded to its own length), as (first row, rows, text, attention kwargs) per forward.
            texts = list(prompt_embeds) + (list(negative_embeds) if use_cfg else [])
            groups = [texts[:batch], texts[batch:]] if use_cfg and self.cfg_layout == "split" else [texts]
            forwards, first_row = [], 0
            for group in groups:
                forwards.append((first_row, len(group), *self._text_condition(group)))
                first_row += len(group)
            # Rows with a step cache (they share it: `Request.batch_key`): their forwards go through it.
            step_cache = for_batch(first.step_cache, transformer, len(texts))
            # A packed forward's rows' text lengths, for a step cache to pack a sub-batch's own (the same every step).
            text_lengths = [_packed_lengths(texts[first : first + rows], kw) for first, rows, _, kw in forwards]

            patches = (1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)
            condition = None
            if conditions.image_latents is not None:  # edits: the input images' tokens follow the noise's
                condition = to_device(torch.stack(list(conditions.image_latents)).to(self.dtype), self.device)
                condition = torch.cat([condition, condition]) if use_cfg else condition

            # 2. The schedule: flow-matching sigmas with the resolution-dependent shift; rows that start from
            # an image skip its first part (`strength`).
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(
                patches[1] * patches[2],
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15),
            )
            # On the host: each step then reads its sigmas without asking the GPU, and the timesteps go up once.
            timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
            begin = starts.first_step(steps) if starts is not None else 0
            timesteps = timesteps[begin:]
            scheduler.set_begin_index(begin)

            # 3. Where each row starts, from its own generator, drawn exactly as the pipeline draws one image:
            # pure noise, or (image-to-image, inpainting) its init image's latents noised to the first step.
            generators = [torch.Generator("cpu").manual_seed(request.seed) for request in requests]
            if controls is not None:  # the pipeline samples the control images' latents first
                controls.sample(
                    generators,
                    lambda tensor, channels: self._pack(tensor, width, height, channels),
                    self._host_latents_mean,
                    self._host_latents_inverse_std,
                    self.dtype,
                    self.device,
                    to_device,
                    len(timesteps),
                )
                control_text, control_mask = _pad_embeddings(prompt_embeds, self.device, self.dtype, self.text_multiple)
            if starts is None:
                latents = torch.cat([self._noise(generator, width, height) for generator in generators])
            else:
                latents = starts.starting_latents(
                    generators,
                    lambda generator: self._noise(generator, width, height, packed=False),
                    scheduler,
                    timesteps[:1],
                    lambda tensor: self._pack(tensor, width, height),
                    self._host_latents_mean,
                    self._host_latents_inverse_std,
                    self.dtype,
                )
                starts.to(self.device, to_device)
                if conditions.start_tokens:  # edit-inpainting: the start's own latents ride along as the edit's
                    condition = starts.image_latents.to(self.dtype)
                    condition = torch.cat([condition, condition]) if use_cfg else condition
            latents = to_device(latents, self.device)
            timesteps = to_device(timesteps, self.device)

            # 4. Denoise: one forward per step covers the whole batch and both CFG branches.
            for step, t in enumerate(timesteps):
                model_input = torch.cat([latents, latents]) if use_cfg else latents
                if condition is not None:
                    model_input = torch.cat([model_input, condition], dim=1)
                timestep = t.expand(model_input.shape[0]).to(latents.dtype) / 1000
                residuals = None
                if controls is not None and (step_cache is None or step_cache.wants_controls(step)):
                    residuals = controls.block_samples(
                        self.controlnet, latents, control_text, control_mask, timestep[:batch],
                        [[patches]] * batch, step,
                    )  # fmt: skip
                calls = []
                for (first, rows, embeds, text_kwargs), lengths in zip(forwards, text_lengths, strict=True):
                    these = slice(first, first + rows)
                    call = _transformer_call(
                        transformer, model_input[these], timestep[these], embeds, text_kwargs,
                        [[patches, *image_shapes]] * rows,
                    )  # fmt: skip
                    calls.append(
                        Forward(
                            first, rows, call, _for_rows(residuals, rows // batch), lengths, self.packed_text_minimum
                        )
                    )
                if step_cache is None:
                    predictions = [forward.call(**forward.control_kwargs) for forward in calls]
                else:  # the same forwards, run or reused row by row (qwen_batch.pipeline.step_cache)
                    predictions = step_cache.run(step, calls)
                prediction = predictions[0] if len(predictions) == 1 else torch.cat(predictions)
                prediction = prediction[:, : latents.shape[1]]  # edits: drop the input images' tokens
                if use_cfg:
                    conditional, unconditional = prediction[:batch], prediction[batch:]
                    combined = unconditional + guidance * (conditional - unconditional)
                    conditional_norm = torch.norm(conditional, dim=-1, keepdim=True)
                    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
                    prediction = combined * (conditional_norm / combined_norm)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
                if starts is not None:
                    latents = starts.after_step(latents, scheduler, timesteps, step)

            # 5. Decode.
            images = self._decode(latents, width, height)
            if step_cache is not None:
                images.steps_computed = step_cache.steps_computed(batch)
                self.cached_steps += len(timesteps) * len(texts)
                self.cached_steps_computed += sum(cond + (uncond or 0) for cond, uncond in images.steps_computed)
            return images

    def _text_condition(self, embeddings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """One forward's text on the device, and the attention kwargs that go with it: padded with a
        mask (`text_mask`, None when no row is padded), or packed with its place in that padded layout
        (`text_index`, qwen_batch.families.qwen_image.packed_text) where the text stream runs packed."""
        from qwen_batch.families.qwen_image.packed_text import pack_text

        length = _padded_length(embeddings, self.text_multiple)
        if length is None or not self.pack_text:
            embeds, mask = _pad_embeddings(embeddings, self.device, self.dtype, self.text_multiple)
            return embeds, {"text_mask": mask}
        packed, mask, index = pack_text(embeddings, length, self.dtype, self.packed_text_minimum)
        text_kwargs = {"text_mask": to_device(mask, self.device), "text_index": to_device(index, self.device)}
        return to_device(packed, self.device), text_kwargs

    def _prepare(self, request: Request):
        """Apply what the batch is keyed on besides shapes: fuse its adapters; return its scheduler."""
        self.fusion.use(request.loras)
        shift = request.scheduler_shift
        if shift not in self._schedulers:
            self._schedulers[shift] = fixed_shift_scheduler(self.pipe.scheduler, shift)
        return self._schedulers[shift]

    def _noise(self, generator: torch.Generator, width: int, height: int, packed: bool = True) -> torch.Tensor:
        """`randn_tensor((1, 1, C, H/8, W/8))` from the row's own CPU generator, packed: the pipelines' draw
        (they draw on the host too, with a CPU generator, and then copy)."""
        from diffusers.utils.torch_utils import randn_tensor

        channels, latent_height, latent_width = self._latent_grid(width, height)
        shape = (1, 1, channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device="cpu", dtype=self.dtype)
        return self._pack(noise, width, height) if packed else noise  # on the host; moved per batch

    def _latent_grid(self, width: int, height: int) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor * 2
        return self.pipe.transformer.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def _pack(self, latents: torch.Tensor, width: int, height: int, channels: int | None = None) -> torch.Tensor:
        default, latent_height, latent_width = self._latent_grid(width, height)
        return self.pipe._pack_latents(latents, 1, channels or default, latent_height, latent_width)

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> DecodedImages:
        import torch

        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        latents = latents / self._latents_inverse_std + self._latents_mean
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        # `image_processor.postprocess(images, "pil")`'s arithmetic, on the device: denormalize in the
        # VAE's dtype, then float32 * 255, rounded half to even; only uint8 pixels cross to the host.
        images = (images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        return DecodedImages((images * 255).round().to(torch.uint8))

    def close(self) -> None:
        del self.pipe, self.fusion, self._schedulers, self.controlnet  # the fusion holds the pipeline and weight copies
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


def _transformer_call(transformer, hidden_states, timestep, text, text_kwargs, image_shapes):
    """The transformer over one forward's rows, as the loop calls it; its keyword arguments (the ControlNet's
    samples, where they act) join the call's. A step cache calls it, or runs its blocks row by row inside it."""

    def call(**extra) -> torch.Tensor:
        return transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=text,
            # The mask goes to the attention directly (qwen_batch.families.qwen_image.attention): given to the transformer, it would
            # cost a host sync per step.
            attention_kwargs=text_kwargs,
            img_shapes=image_shapes,
            return_dict=False,
            **extra,
        )[0]

    return call


def _packed_lengths(embeddings: Sequence[torch.Tensor], text_kwargs: dict) -> list[int] | None:
    """A packed forward's rows' real text lengths (a step cache packs a sub-batch's own text from them)."""
    return [embedding.shape[0] for embedding in embeddings] if text_kwargs.get("text_index") is not None else None


def _for_rows(residuals: list[torch.Tensor] | None, copies: int) -> list[torch.Tensor] | None:
    """The ControlNet's residuals for a forward of the batch's rows (`copies` 1) or of both CFG halves at
    once (2): the conditional pass's residuals serve the unconditional one, as in diffusers' pipeline."""
    if residuals is None:
        return None
    import torch

    return [torch.cat([sample] * copies) if copies > 1 else sample for sample in residuals]


def fixed_shift_scheduler(scheduler, shift: float):
    """The model's scheduler with a fixed sampling shift at every size: its config with
    `base_shift = max_shift = ln(shift)` and no terminal stretch (Qwen-Image-Lightning's published config)."""
    import math

    return type(scheduler).from_config(
        scheduler.config, base_shift=math.log(shift), max_shift=math.log(shift), shift_terminal=None
    )


def _pad_embeddings(
    embeddings: Sequence[torch.Tensor], device: str, dtype: torch.dtype, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack `[tokens, hidden]` embeddings into `[rows, max_tokens, hidden]` plus a mask.

    The mask is None when no row is padded: the pipeline passes None in that case too, and it lets
    the attention take its fastest path. When rows are padded anyway, the padding goes up to a multiple
    of TEXT_BUCKET tokens: masked keys get zero attention weight, so the images are the same, and a
    compiled transformer meets a few text lengths instead of one per batch (no recompiles). `multiple`:
    rows of one length are padded too, to a multiple of it (FP8_TEXT_MULTIPLE).
    """
    import torch

    longest = _padded_length(embeddings, multiple) or embeddings[0].shape[0]
    hidden = embeddings[0].shape[1]
    stacked = torch.zeros(len(embeddings), longest, hidden, dtype=dtype)  # built on the host, sent once
    mask = torch.zeros(len(embeddings), longest, dtype=torch.bool)
    for row, embedding in enumerate(embeddings):
        stacked[row, : embedding.shape[0]] = embedding.to(device="cpu", dtype=dtype)
        mask[row, : embedding.shape[0]] = True
    if all(embedding.shape[0] == longest for embedding in embeddings):
        return to_device(stacked, device), None
    return to_device(stacked, device), to_device(mask, device)


def _padded_length(embeddings: Sequence[torch.Tensor], multiple: int = 1) -> int | None:
    """The batch's padded text length (the longest, rounded up to TEXT_BUCKET), or None when every row
    has the same length, a multiple of `multiple`, and nothing is padded."""
    lengths = {embedding.shape[0] for embedding in embeddings}
    if len(lengths) == 1:
        (length,) = lengths
        return None if length % multiple == 0 else -(-length // multiple) * multiple
    return -(-max(lengths) // TEXT_BUCKET) * TEXT_BUCKET


class DecodedImages:
    """A decoded batch, `[rows, height, width, 3]` uint8, on its way to host memory.

    On a GPU the copy is queued behind the decode and only iterating waits for it, so the writer's
    threads wait, not the GPU loop: the next batch's forwards are queued while this one is still
    copying and being encoded to PNG. Iterating yields PIL images, in row order.
    """

    def __init__(self, pixels: torch.Tensor):
        import torch

        # Rows with a step cache: per row, the steps its conditional and unconditional passes computed in full.
        self.steps_computed: list[tuple[int, int | None]] | None = None
        self._ready = None
        if pixels.is_cuda:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            pixels = host
        self._pixels = pixels

    def __len__(self) -> int:
        return self._pixels.shape[0]

    def __iter__(self) -> Iterator[Image.Image]:
        from PIL import Image

        if self._ready is not None:
            self._ready.synchronize()
        return iter([Image.fromarray(array) for array in self._pixels.numpy()])
