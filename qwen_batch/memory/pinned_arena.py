"""Page-locked host memory for weights that stream to the GPU, up to a budget, with nothing lost to rounding.

Offload modes copy every transformer block from host RAM to the GPU at every step. From page-locked
("pinned") memory that copy is a DMA at the host link's full speed and runs beside the compute; from
ordinary memory it goes through a bounce buffer, costs host CPU time and waits. So offload pins what it
streams, but only as much as the machine can spare (`Placement.pinned_bytes`, from the planner): on a
host with less RAM than the model, the blocks beyond the budget stay where they are (views of the
memory-mapped checkpoint, in the page cache or on disk) and are pinned on the fly, a block at a time,
when they stream (diffusers' group offload with `low_cpu_mem_usage`).

PyTorch's pinned allocator rounds every allocation up to a power of two (a block's 72 MiB linears take
128 MiB: Qwen-Image pinned tensor by tensor costs 1.55x its size). The arena allocates slabs of exactly a
power of two and packs tensors into them, so pinning N bytes costs N bytes plus at most one partly used slab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SLAB_BYTES = 256 * 2**20
ALIGNMENT = 512  # bytes: keeps every tensor's start aligned for the copy engine


class PinnedArena:
    """Pinned host memory, `budget` bytes at most (None: no limit), handed out as tensors copied into it."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.used = 0  # bytes of tensors placed
        self.reserved = 0  # bytes of slabs allocated
        self._slab: torch.Tensor | None = None
        self._offset = 0

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget

    def take(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A pinned copy of `tensor` (same dtype and shape), or None when it would exceed the budget."""
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if not self.fits(nbytes):
            return None
        aligned = -(-nbytes // ALIGNMENT) * ALIGNMENT
        if self._slab is None or self._offset + aligned > self._slab.numel():
            size = max(SLAB_BYTES, 1 << (aligned - 1).bit_length())
            if self.budget is not None:  # the last slab need not be whole: round the remainder up instead
                size = min(size, 1 << (max(aligned, self.budget - self.reserved) - 1).bit_length())
            self._slab = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._offset = 0
            self.reserved += size
        place = self._slab[self._offset : self._offset + nbytes].view(tensor.dtype).view(tensor.shape)
        place.copy_(tensor)
        self._offset += aligned
        self.used += nbytes
        return place
