"""ControlNet rows: one ControlNet per run (`--controlnet`), one or more control images per row.

diffusers' `QwenImageControlNetPipeline` (and `QwenImageMultiControlNetModel` for several control images),
split across the stages:

- **The run** (`ControlNetSource`): a hub id or a folder, checked against the transformer's architecture
  before anything loads (a usage error naming the mismatch), its files' identity in the fingerprint of the
  rows that use it.
- **Stage 1** (`qwen_batch.pipeline.conditions.cached_images.prepare_image_inputs`): each control image read once,
  preprocessed if the row says so (`control_preprocess`, e.g. canny), and its VAE posterior cached by
  (content, preprocessing, row size). As for init images, the pipeline *samples* that posterior with the
  row's generator, one draw per control image in order, before the starting noise.
- **The loop** (`ControlBatch`): once per step the ControlNet runs on the batch's latents with the positive
  prompt, for each control image, its residuals scaled per row (`control_scale` times whether the step lies
  in `control_start`-`control_end`) and summed over the control images; the same residuals serve the
  conditional and the unconditional pass, as in the pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ConfigError, ModelError
from qwen_batch.memory.device import to_device

if TYPE_CHECKING:
    import torch

    from qwen_batch.manifest import Request
    from qwen_batch.memory.placement import Placement
    from qwen_batch.pipeline.denoise.state import DenoiseComponents, DenoiseState

# What must agree for the ControlNet's residuals to fit the transformer's blocks.
MATCHING_CONFIG = ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim")
INPAINT_CONDITION_CHANNELS = 4  # the mask, packed 2x2, beside the masked image's 64 channels


def control_acts(step: int, steps: int, control_range: tuple[float, float]) -> bool:
    """Whether a row's control images act at `step` of `steps`: the pipeline's `controlnet_keep[i]`, 1 where the
    step lies in the row's `control_range` (control_guidance_start, control_guidance_end)."""
    start, end = control_range
    return not (step / steps < start or (step + 1) / steps > end)


@dataclass(frozen=True)
class ControlNetSource:
    """`--controlnet`: where the ControlNet comes from, and what identifies its weights."""

    location: str

    @property
    def local_folder(self) -> Path | None:
        from qwen_batch.weights.model_source import _cached_hub_snapshot

        folder = Path(self.location).expanduser()
        return folder if folder.is_dir() else _cached_hub_snapshot(self.location)

    @cached_property
    def _config(self) -> dict[str, Any]:  # read once: every control row's check asks for it
        from diffusers import QwenImageControlNetModel

        try:
            return dict(QwenImageControlNetModel.load_config(str(self.local_folder or self.location)))
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--controlnet {self.location}: cannot read its config.json ({error}). Give a folder saved with "
                "save_pretrained or a hub id such as InstantX/Qwen-Image-ControlNet-Union."
            ) from error

    def config(self) -> dict[str, Any]:
        return self._config

    def check_fits(self, transformer_config: dict[str, Any]) -> dict[str, Any]:
        """The ControlNet's config, or a usage error when its blocks cannot feed this transformer's."""
        config = self.config()
        wrong = [
            f"{name} {config.get(name)} (the transformer's: {transformer_config.get(name)})"
            for name in MATCHING_CONFIG
            if config.get(name) != transformer_config.get(name)
        ]
        if config.get("num_layers", 0) > transformer_config.get("num_layers", 0):
            wrong.append(
                f"num_layers {config['num_layers']} (more than the transformer's {transformer_config['num_layers']})"
            )
        if wrong:
            raise ConfigError(
                f"--controlnet {self.location} was not made for this model's transformer: {'; '.join(wrong)}. "
                "Use a ControlNet trained for the model given with --model."
            )
        if config.get("extra_condition_channels", 0) not in (0, INPAINT_CONDITION_CHANNELS):
            raise ConfigError(
                f"--controlnet {self.location}: extra_condition_channels {config['extra_condition_channels']} is "
                f"neither a Union ControlNet's (0) nor an inpainting one's ({INPAINT_CONDITION_CHANNELS})"
            )
        return config

    @property
    def inpaints(self) -> bool:
        """An inpainting ControlNet (InstantX/Qwen-Image-ControlNet-Inpainting): its condition is the masked
        image's latents and the mask."""
        return self.config().get("extra_condition_channels", 0) == INPAINT_CONDITION_CHANNELS

    def check_row(self, request: Request) -> str | None:
        """Why a control row cannot run under this ControlNet, or None."""
        if self.inpaints and request.mask_image is None:
            return (
                f"--controlnet {self.location} is an inpainting ControlNet: give the row a mask_image (white "
                "repaints) with its control_image, or run it with a Union ControlNet"
            )
        if not self.inpaints and request.mask_image is not None:
            return (
                "mask_image with control_image needs an inpainting ControlNet (InstantX/Qwen-Image-ControlNet-"
                f"Inpainting); --controlnet {self.location} is not one"
            )
        return None

    def identity(self) -> str:
        """A short hash of its files (sizes and sampled content, as the model's identity), or of its hub id."""
        from qwen_batch.weights.model_source import _file_signature

        digest = hashlib.sha256(b"controlnet\0")
        folder = self.local_folder
        if folder is None:
            digest.update(f"hub:{self.location}".encode())
        else:
            for file in sorted(folder.rglob("*")):
                if file.is_file() and not file.name.startswith("."):
                    digest.update(_file_signature(folder, file))
        return digest.hexdigest()[:24]

    def load(self, device: str, dtype: torch.dtype, placement: Placement) -> tuple[torch.nn.Module, str]:
        """The ControlNet where it will live, in the run's memory mode, and what was done in words.

        Its blocks are the transformer's own kind, so they go through the same placement: quantized to fp8 on
        the GPU under fp8, streamed a block ahead under the offload modes (from pinned RAM only where the plan
        left RAM unbudgeted, else from the memory-mapped files), resident in the run's dtype otherwise (GGUF
        covers the transformer file alone: a ControlNet folder is bf16)."""
        from diffusers import QwenImageControlNetModel

        from qwen_batch.memory.modes import BF16, GGUF
        from qwen_batch.memory.pinned_arena import PinnedArena
        from qwen_batch.memory.placement import place_transformer

        try:
            model = QwenImageControlNetModel.from_pretrained(
                str(self.local_folder or self.location), torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as error:
            raise ModelError(f"--controlnet {self.location}: cannot load it ({error})") from error
        if placement.mode == GGUF:
            placement = replace(placement, mode=BF16)
        # The pinned budget belongs to the transformer's blocks: the ControlNet pins only when nothing is budgeted.
        arena = None if placement.pinned_bytes is None or not placement.streams else PinnedArena(0)
        done = place_transformer(model.eval(), placement, device, dtype, arena)
        return model, done


@dataclass
class RowControls:
    """One row's cached control images: each one's VAE posterior ([z, 1, h/8, w/8]), in the row's order."""

    posteriors: list[tuple[torch.Tensor, torch.Tensor]]  # (mean, std)
    input_sha256: list[str]
    # An inpainting ControlNet's: the kept area (1 - mask) at latent size, [1, 1, h/8, w/8]; its one posterior
    # is then the masked image's.
    kept: torch.Tensor | None = None


class ControlBatch:
    """A batch's controls (every row has the same number of control images: `Request.batch_key`)."""

    def __init__(self, requests: Sequence[Request], rows: Sequence[RowControls]):
        self.requests, self.rows = list(requests), list(rows)
        self._latents: list[torch.Tensor] = []  # per control image: [rows, tokens, 64], on the device
        self._weights: torch.Tensor | None = None  # [steps, control images, rows, 1, 1], on the device
        self._acting: list[bool] = []  # per step: whether any row's control acts (on the host)
        self._text = self._text_mask = None  # the positive prompts, padded, on the device

    def sample(self, state: DenoiseState, components: DenoiseComponents) -> None:
        """Each row's generator samples its control images' posteriors, in order, before the noise is drawn:
        the pipeline's `retrieve_latents(vae.encode(control), generator)` per control image.

        An inpainting ControlNet's masked image is sampled instead from a generator of its own seeded with the
        row's seed, and the row's generator is left for the noise: diffusers' `QwenImageControlNetInpaintPipeline`
        samples it from torch's global random state (`latent_dist.sample()`), which would make a row's image
        depend on whatever ran before it; after `torch.manual_seed(seed)` the two agree.

        Then the ControlNet's text goes up: the positive prompts, padded (it does not run packed)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        dtype, device, width, height = components.dtype, components.device, state.width, state.height
        latents_mean, latents_inverse_std = components.host_latents_mean, components.host_latents_inverse_std
        per_image: list[list[torch.Tensor]] = [[] for _ in self.rows[0].posteriors]
        for row, request, generator in zip(self.rows, self.requests, state.generators, strict=True):
            if row.kept is not None:
                generator = torch.Generator("cpu").manual_seed(request.seed)
            for index, (mean, std) in enumerate(row.posteriors):
                mean, std = mean.unsqueeze(0), std.unsqueeze(0)
                sample = mean + std * randn_tensor(mean.shape, generator=generator, device="cpu", dtype=mean.dtype)
                latents = (sample - latents_mean.to(sample.dtype)) * latents_inverse_std.to(sample.dtype)
                if row.kept is not None:  # the masked image's 16 channels and the kept area's 1
                    latents = torch.cat([latents.to(dtype), row.kept.unsqueeze(0).to(dtype)], dim=1)
                latents = latents.permute(0, 2, 1, 3, 4)
                per_image[index].append(components.pack(latents, width, height, latents.shape[2]).to(dtype))
        self._latents = [to_device(torch.cat(rows), device) for rows in per_image]

        # Each row's weight per step and control image: its `control_scale` times whether the step lies in its
        # range (the pipeline's `controlnet_conditioning_scale * controlnet_keep[i]`). Made once per batch and
        # sent up once: the loop only indexes it.
        steps = len(state.timesteps)
        weights = torch.zeros(steps, len(per_image), len(self.requests), 1, 1)
        for row, request in enumerate(self.requests):
            for step in range(steps):
                keep = float(control_acts(step, steps, request.control_range))
                for index, control in enumerate(request.controls):
                    weights[step, index, row] = control.scale * keep
        self._acting = [bool(weights[step].any()) for step in range(steps)]
        self._weights = to_device(weights.to(dtype), device)
        self._text, self._text_mask = components.padded_text(state.prompt_embeds)

    def block_samples(
        self, state: DenoiseState, components: DenoiseComponents, timestep: torch.Tensor, step: int
    ) -> list[torch.Tensor] | None:
        """The residuals for this step's transformer forwards (one batch's rows, at `timestep`), or None when no
        row's control acts at this step."""
        if not self._acting[step]:
            return None
        summed, image_shapes = None, [[state.patches]] * state.batch
        for index, control in enumerate(self._latents):
            samples = components.controlnet(
                hidden_states=state.latents,
                controlnet_cond=control,
                conditioning_scale=1.0,
                timestep=timestep,
                encoder_hidden_states=self._text,
                # The mask straight to the attention (qwen_batch.families.qwen_image.attention, installed on the
                # ControlNet too): as `encoder_hidden_states_mask` it would cost a host sync per step.
                joint_attention_kwargs={"text_mask": self._text_mask},
                img_shapes=image_shapes,
                return_dict=False,
            )
            weights = self._weights[step, index]  # each row's own conditioning scale at this step
            samples = [sample * weights for sample in samples]
            summed = samples if summed is None else [a + b for a, b in zip(summed, samples, strict=True)]
        return summed
