"""A decoded batch's pixels on their way to host memory, behind the next batch's work, and which of its rows
were not finite: NaN or infinite latents (fp16 overflow, a NaN in an adapter or a checkpoint) decode to black
or noise, and such a row must fail rather than be written."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Per-row codes of `not_finite_rows`, in the order the checks apply: a row with bad latents has bad pixels too.
FINITE, LATENTS, PIXELS = 0, 1, 2
_STAGES = {LATENTS: "latents", PIXELS: "pixels"}
_MESSAGES = {
    "latents": "the latents were not finite (NaN or infinity) after denoising: no image written",
    "pixels": "the decoded pixels were not finite (NaN or infinity) after the VAE decode: no image written",
}


@dataclass(frozen=True)
class NotFinite:
    """What a row that was not finite yields in place of its image; `stage` is "latents" or "pixels"."""

    stage: str

    @property
    def message(self) -> str:
        return _MESSAGES[self.stage]


def not_finite_rows(latents: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Per row, on the device and without waiting for it: FINITE, LATENTS (the final latents hold a NaN or an
    infinity) or PIXELS (the VAE's output does, before any clamp hides it), as uint8."""
    import torch

    bad_latents = ~torch.isfinite(latents).flatten(1).all(1)
    bad_pixels = ~torch.isfinite(pixels).flatten(1).all(1)
    codes = torch.where(bad_pixels, PIXELS, FINITE).to(torch.uint8)
    return torch.where(bad_latents, LATENTS, codes).to(torch.uint8)


class DecodedImages:
    """A decoded batch, `[rows, height, width, channels]` uint8, on its way to host memory.

    On a GPU the copy is queued behind the decode and only iterating waits for it, so the writer's
    threads wait, not the GPU loop: the next batch's forwards are queued while this one is still
    copying and being encoded to PNG. Iterating yields PIL images, in row order, and `NotFinite` for a row
    whose latents or pixels were not finite (`not_finite`: `not_finite_rows`' codes, copied with the pixels).
    """

    def __init__(self, pixels: torch.Tensor, not_finite: torch.Tensor | None = None):
        import torch

        # Rows with a step cache: per row, the steps its conditional and unconditional passes computed in full.
        self.steps_computed: list[tuple[int, int | None]] | None = None
        self._ready = None
        if pixels.is_cuda:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            if not_finite is not None:  # behind the same event: no wait of its own
                codes = torch.empty(not_finite.shape, dtype=torch.uint8, pin_memory=True)
                not_finite = codes.copy_(not_finite, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            pixels = host
        self._pixels = pixels
        self._not_finite = not_finite

    def __len__(self) -> int:
        return self._pixels.shape[0]

    def __iter__(self) -> Iterator[Image.Image | NotFinite]:
        from PIL import Image

        if self._ready is not None:
            self._ready.synchronize()
        codes = [FINITE] * len(self) if self._not_finite is None else self._not_finite.tolist()
        return iter(
            [
                Image.fromarray(array) if code == FINITE else NotFinite(_STAGES[code])
                for array, code in zip(self._pixels.numpy(), codes, strict=True)
            ]
        )
