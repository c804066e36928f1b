"""What the denoise loop's blocks share: the loaded model (`DenoiseComponents`, one per generator), one batch
on its way through the loop (`DenoiseState`, one per `generate`), and the blocks themselves (`DenoiseBlocks`).

Each block reads what it needs from the state and the components and writes what it makes into the state, as
diffusers' Modular pipelines do with their `components` and `state`; the batch's conditions
(`qwen_batch.pipeline.conditions`) read the same two objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen_batch.pipeline.denoise.text import TextForward, TextLayout, pad_embeddings

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImagePipeline

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.conditions import BatchConditions
    from qwen_batch.pipeline.denoise.decoded import DecodedImages
    from qwen_batch.pipeline.step_cache import BatchStepCache


@dataclass
class DenoiseComponents:
    """The loaded model as the blocks use it: the pipeline without its text encoder, the ControlNet, where
    they run, how their forwards take text, and the latents' normalization."""

    pipe: QwenImagePipeline
    controlnet: torch.nn.Module | None
    device: str
    dtype: torch.dtype
    text_layout: TextLayout
    # The latents' normalization, as the pipelines apply it before decoding: on the device in the VAE's dtype,
    # and on the host (float32, as the pipelines make them) for encoding starts and controls on the host without
    # reading the device's copies back (that would wait for the GPU at every batch).
    latents_mean: torch.Tensor
    latents_inverse_std: torch.Tensor
    host_latents_mean: torch.Tensor
    host_latents_inverse_std: torch.Tensor

    @classmethod
    def build(
        cls,
        pipe: QwenImagePipeline,
        controlnet: torch.nn.Module | None,
        device: str,
        dtype: torch.dtype,
        text_layout: TextLayout,
    ) -> DenoiseComponents:
        """The components of a placed pipeline; the normalization made once, not per batch."""
        import torch

        vae = pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        host_mean = torch.tensor(vae.config.latents_mean).view(shape)
        host_inverse_std = (1.0 / torch.tensor(vae.config.latents_std)).view(shape)
        mean, inverse_std = host_mean.to(device, vae.dtype), host_inverse_std.to(device, vae.dtype)
        return cls(pipe, controlnet, device, dtype, text_layout, mean, inverse_std, host_mean, host_inverse_std)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    def noise(self, generator: torch.Generator, width: int, height: int, packed: bool = True) -> torch.Tensor:
        """`randn_tensor((1, 1, C, H/8, W/8))` from the row's own CPU generator, packed: the pipelines' draw
        (they draw on the host too, with a CPU generator, and then copy)."""
        from diffusers.utils.torch_utils import randn_tensor

        channels, latent_height, latent_width = self.latent_grid(width, height)
        shape = (1, 1, channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device="cpu", dtype=self.dtype)
        return self.pack(noise, width, height) if packed else noise  # on the host; moved per batch

    def latent_grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height, width) of an image's unpacked latents."""
        scale = self.pipe.vae_scale_factor * 2
        return self.pipe.transformer.config.in_channels // 4, 2 * (height // scale), 2 * (width // scale)

    def pack(self, latents: torch.Tensor, width: int, height: int, channels: int | None = None) -> torch.Tensor:
        """[1, 1, channels, h, w] latents packed into 2x2 patches, as the pipelines pack them."""
        default, latent_height, latent_width = self.latent_grid(width, height)
        return self.pipe._pack_latents(latents, 1, channels or default, latent_height, latent_width)

    def padded_text(self, embeddings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings padded to one length with a mask (never packed), on the device: the ControlNet's text."""
        return pad_embeddings(embeddings, self.device, self.dtype, self.text_layout.multiple)


@dataclass
class DenoiseState:
    """One batch on its way through the loop: what it was given, then what each block leaves for the next."""

    # Given: rows that share size, steps, guidance, adapters and shift (`Request.batch_key`).
    requests: Sequence[Request]
    prompt_embeds: Sequence[torch.Tensor]  # each row's unpadded [tokens, hidden] embeddings
    negative_embeds: Sequence[torch.Tensor] | None  # with true CFG
    conditions: BatchConditions
    scheduler: Any  # the batch's, with its sampling shift
    width: int
    height: int
    steps: int
    guidance: float
    use_cfg: bool
    batch: int  # rows (images); with true CFG a step runs twice as many
    patches: tuple[int, int, int]  # the noise's token grid (1, h/16, w/16)
    image_shapes: tuple[tuple[int, int, int], ...]  # the grids of the tokens after the noise's (edits' inputs)
    generators: list[torch.Generator]  # each row's own, seeded with its seed: every draw of the row comes from it
    # The text-conditions block: the step's forwards, the step cache that may run them, and (edits) the tokens
    # every forward appends to the noise's.
    forwards: list[TextForward] = field(default_factory=list)
    step_cache: BatchStepCache | None = None
    image_tokens: torch.Tensor | None = None
    # The timesteps block: the schedule's kept steps, on the host until the starting-latents block moves them.
    timesteps: torch.Tensor | None = None
    # The starting-latents block, then each step: the batch's latents, packed, on the device.
    latents: torch.Tensor | None = None

    @classmethod
    def for_batch(
        cls,
        requests: Sequence[Request],
        prompt_embeds: Sequence[torch.Tensor],
        negative_embeds: Sequence[torch.Tensor] | None,
        conditions: BatchConditions,
        scheduler,
        vae_scale_factor: int,
    ) -> DenoiseState:
        import torch

        first = requests[0]
        width, height = first.width, first.height
        return cls(
            requests=requests,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative_embeds,
            conditions=conditions,
            scheduler=scheduler,
            width=width,
            height=height,
            steps=first.num_inference_steps,
            guidance=first.true_cfg_scale,
            use_cfg=first.uses_cfg,
            batch=len(requests),
            patches=(1, height // vae_scale_factor // 2, width // vae_scale_factor // 2),
            image_shapes=tuple(conditions.image_shapes),
            generators=[torch.Generator("cpu").manual_seed(request.seed) for request in requests],
        )

    @property
    def texts(self) -> list[torch.Tensor]:
        """The step's rows' text: the prompts, then with true CFG the negative prompts."""
        return list(self.prompt_embeds) + (list(self.negative_embeds) if self.use_cfg else [])


@dataclass(frozen=True)
class DenoiseBlocks:
    """A model family's denoise loop, block by block; `ImageGenerator.generate` runs them in this order, the
    step once per kept timestep. Each reads and writes the batch's `DenoiseState`."""

    text_conditions: Callable[[DenoiseState, DenoiseComponents], None]
    timesteps: Callable[[DenoiseState, DenoiseComponents], None]
    starting_latents: Callable[[DenoiseState, DenoiseComponents], None]
    step: Callable[[DenoiseState, DenoiseComponents, int, torch.Tensor], None]  # (state, components, step, t)
    decode: Callable[[DenoiseState, DenoiseComponents], DecodedImages]
