"""Qwen-Image's denoise loop in five blocks over one `DenoiseState`: text conditions, timesteps, starting
latents, one step (run once per kept timestep), decode.

They are diffusers' `QwenImagePipeline.__call__` (and its image-to-image, inpainting, edit and ControlNet
variants) unrolled for batches of different prompts, with the same arithmetic in the same order, so a row's
image does not depend on what shares its batch. Nothing here waits for the GPU: inputs go up from pinned
memory, the schedule stays on the host, and the images come back through `DecodedImages`.
"""

from __future__ import annotations

import torch

from qwen_batch.memory.device import to_device
from qwen_batch.pipeline.denoise.decoded import DecodedImages, not_finite_rows
from qwen_batch.pipeline.denoise.state import DenoiseBlocks, DenoiseComponents, DenoiseState
from qwen_batch.pipeline.denoise.text import text_forwards
from qwen_batch.pipeline.step_cache import Forward, for_batch


def text_conditions(state: DenoiseState, components: DenoiseComponents) -> None:
    """1. The step's forwards with their text ([cond..., uncond...] padded to one length with a mask or, split,
    each half to its own), the step cache that runs them where the rows have one (they share it:
    `Request.batch_key`), and for edits the input images' tokens, which follow the noise's."""
    texts = state.texts
    state.forwards = text_forwards(
        texts, state.batch, state.use_cfg, components.text_layout, components.device, components.dtype
    )
    state.step_cache = for_batch(state.requests[0].step_cache, components.transformer, len(texts))
    image_latents = state.conditions.image_latents
    if image_latents is not None:
        tokens = to_device(torch.stack(list(image_latents)).to(components.dtype), components.device)
        state.image_tokens = torch.cat([tokens, tokens]) if state.use_cfg else tokens


def timesteps(state: DenoiseState, components: DenoiseComponents) -> None:
    """2. The schedule: flow-matching sigmas with the resolution-dependent shift, on the host (each step then
    reads its sigmas without asking the GPU); rows that start from an image skip its first part (`strength`)."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    scheduler, steps, patches = state.scheduler, state.steps, state.patches
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        patches[1] * patches[2],
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    schedule, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    starts = state.conditions.starts
    begin = starts.first_step(steps) if starts is not None else 0
    state.timesteps = schedule[begin:]
    scheduler.set_begin_index(begin)


def starting_latents(state: DenoiseState, components: DenoiseComponents) -> None:
    """3. Where each row starts, from its own generator, drawn exactly as the pipeline draws one image: pure
    noise, or (image-to-image, inpainting) its init image's latents noised to the first step. The pipeline
    samples control images first. Then the latents and the schedule go up to the device."""
    controls, starts = state.conditions.controls, state.conditions.starts
    if controls is not None:
        controls.sample(state, components)
    if starts is None:
        latents = torch.cat([components.noise(generator, state.width, state.height) for generator in state.generators])
    else:
        latents = starts.starting_latents(state, components)
        if state.conditions.start_tokens:  # edit-inpainting: the start's own latents ride along as the edit's
            tokens = starts.image_latents.to(components.dtype)
            state.image_tokens = torch.cat([tokens, tokens]) if state.use_cfg else tokens
    state.latents = to_device(latents, components.device)
    state.timesteps = to_device(state.timesteps, components.device)


def denoise_step(state: DenoiseState, components: DenoiseComponents, step: int, t: torch.Tensor) -> None:
    """4. One step: the forwards cover the whole batch and both CFG branches (run or reused row by row by a
    step cache, `qwen_batch.pipeline.step_cache`), CFG combines them, the scheduler steps, and the starts'
    after-step acts (inpainting)."""
    latents = state.latents
    model_input = torch.cat([latents, latents]) if state.use_cfg else latents
    if state.image_tokens is not None:
        model_input = torch.cat([model_input, state.image_tokens], dim=1)
    timestep = t.expand(model_input.shape[0]).to(latents.dtype) / 1000
    residuals = _control_residuals(state, components, timestep, step)
    forwards = _forwards(state, components, model_input, timestep, residuals)
    if state.step_cache is None:
        predictions = [forward.call(**forward.control_kwargs) for forward in forwards]
    else:  # the same forwards, run or reused row by row
        predictions = state.step_cache.run(step, forwards)
    prediction = predictions[0] if len(predictions) == 1 else torch.cat(predictions)
    prediction = prediction[:, : latents.shape[1]]  # edits: drop the input images' tokens
    if state.use_cfg:
        prediction = _guided(prediction, state.batch, state.guidance)
    state.latents = state.scheduler.step(prediction, t, latents, return_dict=False)[0]
    if state.conditions.starts is not None:
        state.latents = state.conditions.starts.after_step(state, step)


def decode(state: DenoiseState, components: DenoiseComponents) -> DecodedImages:
    """5. The VAE's images (a row whose latents or pixels are not finite marked as such: `DecodedImages`), and
    with a step cache how often each row computed in full."""
    pipe, vae = components.pipe, components.pipe.vae
    latents = pipe._unpack_latents(state.latents, state.height, state.width, pipe.vae_scale_factor).to(vae.dtype)
    latents = latents / components.latents_inverse_std + components.latents_mean
    pixels = vae.decode(latents, return_dict=False)[0][:, :, 0]
    # Checked per row before the clamp, which would turn a NaN row into a black image; on the device, no wait.
    not_finite = not_finite_rows(state.latents, pixels)
    # `image_processor.postprocess(images, "pil")`'s arithmetic, on the device: denormalize in the
    # VAE's dtype, then float32 * 255, rounded half to even; only uint8 pixels cross to the host.
    pixels = (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    images = DecodedImages((pixels * 255).round().to(torch.uint8), not_finite)
    if state.step_cache is not None:
        images.steps_computed = state.step_cache.steps_computed(state.batch)
    return images


QWEN_IMAGE_BLOCKS = DenoiseBlocks(text_conditions, timesteps, starting_latents, denoise_step, decode)


def transformer_call(transformer, hidden_states, timestep, text, text_kwargs, image_shapes):
    """The transformer over one forward's rows, as the loop calls it; its keyword arguments (the ControlNet's
    samples, where they act) join the call's. A step cache calls it, or runs its blocks row by row inside it."""

    def call(**extra) -> torch.Tensor:
        return transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=text,
            # The mask goes to the attention directly (qwen_batch.families.qwen_image.attention): given to the
            # transformer, it would cost a host sync per step.
            attention_kwargs=text_kwargs,
            img_shapes=image_shapes,
            return_dict=False,
            **extra,
        )[0]

    return call


def _control_residuals(
    state: DenoiseState, components: DenoiseComponents, timestep: torch.Tensor, step: int
) -> list[torch.Tensor] | None:
    """The ControlNet's residuals for this step's forwards, where the batch has controls (and a step cache,
    if any, will compute some row at this step)."""
    controls = state.conditions.controls
    if controls is None or (state.step_cache is not None and not state.step_cache.wants_controls(step)):
        return None
    return controls.block_samples(state, components, timestep[: state.batch], step)


def _forwards(
    state: DenoiseState,
    components: DenoiseComponents,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    residuals: list[torch.Tensor] | None,
) -> list[Forward]:
    """This step's transformer forwards, each over its rows of the model input with its text."""
    transformer, text_minimum = components.transformer, components.text_layout.packed_minimum
    forwards = []
    for forward in state.forwards:
        rows = slice(forward.first, forward.first + forward.rows)
        call = transformer_call(
            transformer, model_input[rows], timestep[rows], forward.text, forward.text_kwargs,
            [[state.patches, *state.image_shapes]] * forward.rows,
        )  # fmt: skip
        controls = _for_rows(residuals, forward.rows // state.batch)
        forwards.append(Forward(forward.first, forward.rows, call, controls, forward.lengths, text_minimum))
    return forwards


def _for_rows(residuals: list[torch.Tensor] | None, copies: int) -> list[torch.Tensor] | None:
    """The ControlNet's residuals for a forward of the batch's rows (`copies` 1) or of both CFG halves at
    once (2): the conditional pass's residuals serve the unconditional one, as in diffusers' pipeline."""
    if residuals is None:
        return None
    return [torch.cat([sample] * copies) if copies > 1 else sample for sample in residuals]


def _guided(prediction: torch.Tensor, batch: int, guidance: float) -> torch.Tensor:
    """True CFG's combination, rescaled per token to the conditional prediction's norm, as diffusers does."""
    conditional, unconditional = prediction[:batch], prediction[batch:]
    combined = unconditional + guidance * (conditional - unconditional)
    conditional_norm = torch.norm(conditional, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (conditional_norm / combined_norm)
