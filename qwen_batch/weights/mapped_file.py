"""A weights file mapped read-only into memory: tensors as views of it, and its pages given back once used.

Loading a checkpoint by mapping it costs no host RAM of its own: the bytes stay in the kernel's page
cache, which can drop them whenever it needs the memory. What a mapping does cost is resident pages:
every page read to copy a tensor to the GPU stays counted in the process's RSS (and charged to its
cgroup) for as long as the file is mapped, so a 20 GB file read through one mapping ends with a 20 GB
RSS, and a machine with 16 GiB of RAM sees its memory "full" of weights that already sit on the GPU.
safetensors' own `safe_open` keeps its mapping until the file is closed, so its pages pile up the same
way. `MappedFile.release` hands a used range back (`madvise(MADV_DONTNEED)`), and a later read (an
adapter switch re-reading original weights, an offloaded block streamed again) faults the pages back in
from the page cache or the disk.

The mapping is private (copy-on-write): nothing ever reaches the file, and a tensor that is written to
(peft fusing an adapter into an offloaded weight) gets its own copy of the pages it changes. Released
pages come back from the file, so `release` is for ranges nothing has written since they were mapped:
the loader releases each block right after reading it, before anything could.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAGE = mmap.PAGESIZE


class MappedFile:
    """One file, mapped copy-on-write (MAP_PRIVATE): the file itself is never written."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self.size = os.fstat(handle.fileno()).st_size
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None

    def read(self, offset: int, length: int) -> bytes:
        """A copy of `length` bytes at `offset` (headers and other small things)."""
        if self._map is None or offset + length > self.size:
            raise EOFError(f"{self.path}: wanted bytes {offset}..{offset + length}, the file has {self.size}")
        return self._map[offset : offset + length]

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The bytes at `offset` as a tensor that shares them (no copy; the tensor keeps the map alive)."""
        import torch

        if offset + nbytes > self.size:
            raise EOFError(f"{self.path}: a tensor ends at byte {offset + nbytes}, the file has {self.size}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).reshape(shape)

    def release(self, offset: int, nbytes: int) -> None:
        """Give the pages of a range back to the kernel (they stay in the page cache, reclaimable). Only for
        ranges not written to since mapping: their changes would be dropped (see the module's docstring)."""
        if self._map is None or nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset // PAGE * PAGE
        end = min(self.size, -(-(offset + nbytes) // PAGE) * PAGE)
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def release_all(self) -> None:
        self.release(0, self.size)
