"""Stage 2's view of a 2.1 run's cache: a row resolved (its output size and its condition images' grids, from
the cache's notes), loaded (its embeddings, image-slot masks and condition latents), and a batch's rows handed
to the generator as they are: rows of different prompt lengths and condition images share a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qwen_batch.errors import QwenBatchError
from qwen_batch.families.qwen_image21 import OUTPUT_RESOLUTION
from qwen_batch.families.qwen_image21.encode import condition_size, latents_key, note_key, text_key
from qwen_batch.pipeline.conditions.edit import calculate_dimensions

if TYPE_CHECKING:
    import torch

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.embedding_cache import EmbeddingCache

LATENT_PIXELS = 16  # one latent token covers 16x16 pixels (the VAE's 16x; the transformer takes them unpatched)


class ConditionImageError(QwenBatchError):
    """A row's condition image could not be used; the row fails with this reason, the others run."""


@dataclass(frozen=True)
class Row21:
    """A row as stage 2 batches it: its size resolved, its condition images' hashes and latent grids."""

    request: Request  # width and height resolved
    input_sha256: tuple[str, ...]
    image_shapes: tuple[tuple[int, int, int], ...]  # (1, h/16, w/16) of each condition image, in order

    @property
    def batch_key(self):
        # What the loop shares: size, steps, guidance, shift. Prompts and condition images are per row.
        return self.request.batch_key


@dataclass
class LoadedRow21:
    request: Request
    prompt: torch.Tensor  # [tokens, hidden]
    prompt_slots: torch.Tensor  # [tokens] bool: where the condition images' tokens go
    negative: torch.Tensor | None  # with guidance
    negative_slots: torch.Tensor | None
    image_latents: list[torch.Tensor]  # each condition image's packed latents [h*w, channels]
    image_shapes: tuple[tuple[int, int, int], ...]
    input_sha256: list[str] | None
    truncated: bool = False


@dataclass
class Batch21:
    """What `ImageGenerator21.generate` takes besides the text: each row's slot masks and condition images."""

    prompt_slots: list[torch.Tensor]
    negative_slots: list[torch.Tensor] | None
    image_latents: list[list[torch.Tensor]]
    image_shapes: list[tuple[tuple[int, int, int], ...]]


def output_size(request: Request, image_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The row's size; without one, the last condition image's aspect ratio at about 1024x1024 (diffusers'
    rule), floored to multiples of 32 as the pipeline floors it."""
    width, height = request.width, request.height
    if image_sizes and (width is None or height is None):
        ratio_width, ratio_height = image_sizes[-1]
        default_width, default_height = calculate_dimensions(OUTPUT_RESOLUTION**2, ratio_width / ratio_height)
        width, height = width or default_width, height or default_height
    return width // 32 * 32, height // 32 * 32


class CachedRows21:
    def __init__(self, cache: EmbeddingCache):
        self.cache = cache

    def resolve(self, request: Request) -> Row21:
        notes = []
        for url in request.images:
            note = self.cache.get_note(note_key(url))
            if note.get("error"):
                raise ConditionImageError(note["error"])
            notes.append(note)
        sizes = [(int(note["width"]), int(note["height"])) for note in notes]
        width, height = output_size(request, sizes)
        shapes = []
        for input_width, input_height in sizes:
            condition_width, condition_height = condition_size(input_width, input_height)
            shapes.append((1, condition_height // LATENT_PIXELS, condition_width // LATENT_PIXELS))
        return Row21(replace(request, width=width, height=height), tuple(n["sha256"] for n in notes), tuple(shapes))

    def load(self, row: Row21) -> LoadedRow21:
        request, shas = row.request, row.input_sha256
        prompt, _ = self.cache.get_tensors(text_key(request.prompt, shas))
        negative = self.cache.get_tensors(text_key(request.negative_prompt, shas))[0] if request.uses_cfg else None
        latents = [self.cache.get_tensors(latents_key(sha))[0]["latents"] for sha in shas]
        return LoadedRow21(
            request=request,
            prompt=prompt["embedding"],
            prompt_slots=prompt["image_slots"],
            negative=None if negative is None else negative["embedding"],
            negative_slots=None if negative is None else negative["image_slots"],
            image_latents=latents,
            image_shapes=row.image_shapes,
            input_sha256=list(shas) or None,
        )

    def conditions(self, rows: Sequence[LoadedRow21], items: Sequence[Row21]) -> Batch21:
        return Batch21(
            prompt_slots=[row.prompt_slots for row in rows],
            negative_slots=[row.negative_slots for row in rows] if rows[0].request.uses_cfg else None,
            image_latents=[row.image_latents for row in rows],
            image_shapes=[row.image_shapes for row in rows],
        )

    def finished(self, images, rows: Sequence[LoadedRow21]):
        return images
