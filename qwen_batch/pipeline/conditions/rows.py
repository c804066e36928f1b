"""Stage 2's one way to get a row's cached conditions and to stack a batch of them for the loop.

`CachedRows.load` returns everything a row brings (its text embeddings and, by kind, its edit latents, its
start, its control images) or raises the reason it cannot run; `stack` turns a batch of loaded rows into
the `BatchConditions` the denoise loop takes. The engine calls these two and knows no kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.pipeline.conditions import BatchConditions
from qwen_batch.pipeline.conditions.cached_images import CachedImageInputs
from qwen_batch.pipeline.conditions.controlnet import ControlBatch, RowControls
from qwen_batch.pipeline.conditions.edit import EditConditions, EditRow
from qwen_batch.pipeline.conditions.image_start import ImageStarts, OverlaidImages, RowStart

if TYPE_CHECKING:
    import torch

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.embedding_cache import EmbeddingCache


PATCH_PIXELS = 16  # the pixels of one latent token's side: the VAE's 8x times the transformer's 2x2 patches


@dataclass
class LoadedRow:
    request: Request
    prompt: torch.Tensor
    negative: torch.Tensor | None
    truncated: bool
    edit_latents: torch.Tensor | None = None
    start: RowStart | None = None
    controls: RowControls | None = None
    input_sha256: list[str] | None = None


class CachedRows:
    """The cache as stage 2 reads it, for rows of every kind (edit rows come resolved, as `EditRow`)."""

    def __init__(self, cache: EmbeddingCache, edits: EditConditions | None = None):
        self.cache, self.edits = cache, edits
        self.images = CachedImageInputs(cache)

    def resolve(self, request: Request) -> Request | EditRow:
        """What a batch is made of: an edit row with its output size and input grids (from the cache's notes);
        raises the reason a row's input could not be used."""
        return self.edits.resolve(request) if self.edits is not None else request

    def conditions(self, rows: Sequence[LoadedRow], items: Sequence[Request | EditRow]) -> BatchConditions:
        return stack(rows, items[0].image_shapes if isinstance(items[0], EditRow) else ())

    def finished(self, images, rows: Sequence[LoadedRow]):
        return finished_images(images, rows, PATCH_PIXELS)

    def load(self, item: Request | EditRow) -> LoadedRow:
        if isinstance(item, EditRow):
            edit = self.edits.load(item)
            row = LoadedRow(item.request, edit.prompt, edit.negative, edit.truncated, edit.image_latents,
                            input_sha256=list(item.input_sha256))  # fmt: skip
            if item.request.starts_from_image:  # edit-inpainting: its image's sampled latents, start and tokens
                row.start = self.images.load(item.request)
                row.input_sha256 = row.start.input_sha256
            return row
        request = item
        prompt, metadata = self.cache.get_with_metadata(request.prompt)
        negative = self.cache.get(request.negative_prompt) if request.uses_cfg else None
        row = LoadedRow(request, prompt, negative, metadata.get("truncated") == "true")
        if request.starts_from_image:
            row.start = self.images.load(request)
        if request.controls:
            row.controls = self.images.load_controls(request)
        shas = (row.start.input_sha256 if row.start else []) + (row.controls.input_sha256 if row.controls else [])
        row.input_sha256 = shas or None
        return row


def stack(rows: Sequence[LoadedRow], image_shapes: Sequence[tuple[int, int, int]] = ()) -> BatchConditions:
    """A batch's conditions (its rows share their kinds: `Request.batch_key`)."""
    first = rows[0]
    # Edit-inpainting appends its start's sampled latents, not the edit's cached posterior mode (the pipeline's).
    edit_tokens = first.edit_latents is not None and first.start is None
    return BatchConditions(
        image_latents=[row.edit_latents for row in rows] if edit_tokens else None,
        start_tokens=first.edit_latents is not None and first.start is not None,
        image_shapes=tuple(image_shapes),
        starts=ImageStarts([row.start for row in rows], first.request.strength) if first.start else None,
        controls=ControlBatch([row.request for row in rows], [row.controls for row in rows])
        if first.controls
        else None,
    )


def finished_images(images, rows: Sequence[LoadedRow], scale: int):
    """The batch's images as written: `mask_crop_padding` rows pasted back into their init images."""
    overlays = [row.start.overlay if row.start else None for row in rows]
    return OverlaidImages(images, overlays, scale) if any(overlays) else images
