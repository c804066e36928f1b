"""Rows that start from an image (image-to-image, inpainting, edit-inpainting): what the denoise loop does
with their cached inputs (`qwen_batch.pipeline.conditions.cached_images`), as diffusers' `QwenImageImg2ImgPipeline`,
`QwenImageInpaintPipeline` and `QwenImageEditInpaintPipeline` do:

- the schedule cut by `strength` (`get_timesteps`);
- the row's generator drawing the posterior sample and then the noise, and the start
  `scale_noise(init, first timestep, noise)`;
- for masks, after each step the area outside the mask put back to the init latents noised to the next
  timestep;
- for `mask_crop_padding`, the result pasted back into the init image (`apply_overlay`).

So a row equals the diffusers pipeline with `generator=torch.Generator("cpu").manual_seed(seed)` (tested
within 2/255 on the tiny model), alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.memory.device import to_device

if TYPE_CHECKING:
    import torch

    from qwen_batch.pipeline.denoise.state import DenoiseComponents, DenoiseState


def skipped_steps(steps: int, strength: float) -> int:
    """The pipelines' `get_timesteps`: how many of a schedule's `steps` a row starting from an image skips."""
    kept = min(steps * strength, steps)
    return int(max(steps - kept, 0))


@dataclass
class RowStart:
    """One row's cached start: the init image's posterior ([z, 1, h/8, w/8]) and its mask ([1, h/8, w/8])."""

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None
    input_sha256: list[str]
    # mask_crop_padding: the init image's kept part (RGBA, its own size) and the box the image was made for.
    overlay: tuple[torch.Tensor, tuple[int, int, int, int]] | None = None


# --- The loop -------------------------------------------------------------------------------------------


class OverlaidImages:
    """A batch's images with `mask_crop_padding` rows pasted back into their init images (diffusers'
    `apply_overlay`), applied as the writer iterates, so the GPU loop never waits for the pixels."""

    def __init__(self, images, overlays: Sequence[tuple[torch.Tensor, tuple[int, int, int, int]] | None], scale: int):
        from diffusers.image_processor import VaeImageProcessor

        self.images, self.overlays = images, list(overlays)
        self.processor = VaeImageProcessor(vae_scale_factor=scale)  # its resize, as the pipeline's

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        from PIL import Image as PILImage

        from qwen_batch.pipeline.denoise.decoded import NotFinite

        for image, overlay in zip(self.images, self.overlays, strict=True):
            if overlay is None or isinstance(image, NotFinite):  # a row not finite has nothing to paste
                yield image
                continue
            rgba, (x, y, x2, y2) = overlay
            kept = PILImage.fromarray(rgba.numpy(), "RGBA")
            base = PILImage.new("RGBA", kept.size)
            base.paste(self.processor.resize(image, height=y2 - y, width=x2 - x, resize_mode="crop"), (x, y))
            result = base.convert("RGB").convert("RGBA")
            result.alpha_composite(kept)
            yield result.convert("RGB")


class ImageStarts:
    """A batch's starts (every row with the same strength, all masked or none: `Request.batch_key`)."""

    def __init__(self, rows: Sequence[RowStart], strength: float):
        self.rows, self.strength = list(rows), strength
        self.masked = rows[0].mask is not None
        self._image_latents = self._noise = self._mask = None

    def first_step(self, steps: int) -> int:
        """How many of the schedule's steps are skipped."""
        return skipped_steps(steps, self.strength)

    def starting_latents(self, state: DenoiseState, components: DenoiseComponents) -> torch.Tensor:
        """Each row's start on the host, packed: its generator samples the posterior, then draws the noise;
        `scale_noise` mixes them at the first kept timestep. Masked rows' tensors for `after_step` go to the
        device."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        width, height, dtype = state.width, state.height, components.dtype
        latents_mean, latents_inverse_std = components.host_latents_mean, components.host_latents_inverse_std
        first_timestep = state.timesteps[:1]
        starts, noises, images = [], [], []
        for row, generator in zip(self.rows, state.generators, strict=True):
            mean, std = row.mean.unsqueeze(0), row.std.unsqueeze(0)
            sample = mean + std * randn_tensor(mean.shape, generator=generator, device="cpu", dtype=mean.dtype)
            image = (sample - latents_mean.to(sample.dtype)) * latents_inverse_std.to(sample.dtype)
            image = image.to(dtype).transpose(1, 2)  # [1, 1, z, h, w], as the noise
            noise = components.noise(generator, width, height, packed=False)
            starts.append(components.pack(state.scheduler.scale_noise(image, first_timestep, noise), width, height))
            noises.append(components.pack(noise, width, height))
            images.append(components.pack(image, width, height))
        if self.masked:
            channels = self.rows[0].mean.shape[0]
            masks = [row.mask.unsqueeze(0).repeat(1, channels, 1, 1).to(dtype) for row in self.rows]
            host = (torch.cat(noises), torch.cat(images), torch.cat([components.pack(m, width, height) for m in masks]))
            self._noise, self._image_latents, self._mask = (to_device(tensor, components.device) for tensor in host)
        return torch.cat(starts)

    @property
    def image_latents(self) -> torch.Tensor:
        """The rows' sampled, normalized, packed init latents (edit-inpainting appends them as tokens)."""
        return self._image_latents

    def after_step(self, state: DenoiseState, step: int) -> torch.Tensor:
        """The batch's latents after the scheduler's step at `step`; inpainting: outside the mask, back to the
        init latents at the next timestep's noise level."""
        if not self.masked:
            return state.latents
        init = self._image_latents
        if step < len(state.timesteps) - 1:
            # `scheduler.scale_noise(init, next timestep, noise)`'s arithmetic, with the next sigma read as a
            # host scalar: scale_noise copies the whole sigma table to the GPU at every call, from pageable
            # memory, which makes the host wait for the GPU at every step.
            sigma = state.scheduler.sigmas[state.scheduler.step_index].to(init.dtype)
            init = sigma * self._noise + (1.0 - sigma) * init
        return (1 - self._mask) * init + self._mask * state.latents
