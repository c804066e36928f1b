"""A decoded batch's pixels on their way to host memory, behind the next batch's work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image


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
