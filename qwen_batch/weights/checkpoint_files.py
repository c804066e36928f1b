"""What a weights file holds, read from its header alone: each tensor's name, storage type, shape and place.

Two formats carry Qwen-Image transformers around: safetensors (the published diffusers layout, its shards,
and the single files that ComfyUI and others share: bf16, fp16 or fp8 e4m3fn, plain or with per-tensor
scales) and GGUF (llama.cpp's container, with block-quantized Q8_0 ... Q2_K weights; city96's Qwen-Image
files). Anything else is refused here, before any weight is read: a pickled checkpoint (`.ckpt`, `.pt`,
`.bin`) could run code when loaded, and an unknown format or a truncated file would fail somewhere deep in
a load that may take minutes.

Nothing here copies weights: `StoredTensor.tensor()` is a view of the memory-mapped file
(`qwen_batch.weights.mapped_file`) and `release()` gives its pages back once the tensor has been copied where
it will live.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ModelError
from qwen_batch.weights.mapped_file import MappedFile

if TYPE_CHECKING:
    import torch

SAFETENSORS, GGUF = "safetensors", "gguf"
MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# safetensors dtype names -> torch dtype names. F8_E5M2 and the integer types are left out on purpose:
# no Qwen-Image checkpoint uses them, and a file that does is not one qwen-batch knows how to compute with.
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")


class CheckpointError(ModelError):
    """A weights file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a weights file: where its bytes are, and what they are."""

    name: str  # as stored
    file: MappedFile
    offset: int  # of its first byte in the file
    nbytes: int
    storage: str  # safetensors dtype ("BF16", "F8_E4M3", ...) or GGUF type name ("Q4_K", "F32", ...)
    shape: tuple[int, ...]  # the tensor's own shape (for GGUF: once dequantized)
    gguf_type: int | None = None  # GGMLQuantizationType value, for GGUF tensors

    @property
    def is_quantized(self) -> bool:
        """Block-quantized GGUF bytes (dequantized as they are used), not a plain float array."""
        return self.gguf_type is not None and self.storage not in GGUF_FLOAT_TYPES

    def tensor(self) -> torch.Tensor:
        """The stored values, sharing the file's memory: a float tensor of `shape`, or for a quantized GGUF
        tensor diffusers' `GGUFParameter` over its raw bytes (what diffusers' GGUF loader builds)."""
        import torch

        if self.gguf_type is None:
            return self.file.tensor(
                self.offset, self.nbytes, getattr(torch, SAFETENSORS_DTYPES[self.storage]), self.shape
            )
        if not self.is_quantized:
            return self.file.tensor(self.offset, self.nbytes, getattr(torch, _GGUF_TORCH[self.storage]), self.shape)
        from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, GGUFParameter

        block_size, type_size = GGML_QUANT_SIZES[self.gguf_type]
        rows = self.shape[:-1]
        raw = self.file.tensor(self.offset, self.nbytes, torch.uint8, (*rows, self.shape[-1] // block_size * type_size))
        return GGUFParameter(raw, quant_type=self.gguf_type)

    def release(self) -> None:
        self.file.release(self.offset, self.nbytes)


_GGUF_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def sniff(path: Path) -> str:
    """The file's format from its first bytes; CheckpointError for pickles and anything unknown."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] == b"GGUF":
        return GGUF
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: is a pickled PyTorch checkpoint (.ckpt/.pt/.bin), which can run code when loaded; "
            "qwen-batch reads safetensors or GGUF only: download the .safetensors or .gguf version of the model"
        )
    raise CheckpointError(f"{path}: is neither a safetensors nor a GGUF file (it starts with {head[:8]!r})")


def read_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors or GGUF file, by stored name, from its header; nothing is copied."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    kind = sniff(path)
    return read_safetensors(path) if kind == SAFETENSORS else read_gguf(path)


def read_safetensors(path: Path) -> dict[str, StoredTensor]:
    """The header of a safetensors file (its documented layout: an 8-byte little-endian length, then a
    JSON table of dtype, shape and byte range per tensor), checked against the file's real size."""
    mapped = MappedFile(path)
    try:
        (length,) = struct.unpack("<Q", mapped.read(0, 8))
        if length > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"{path}: is not a safetensors file (its header would be {length} bytes)")
        header = json.loads(mapped.read(8, length))
    except (EOFError, struct.error) as error:
        raise CheckpointError(f"{path}: is truncated: its header is incomplete ({error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: is not a safetensors file: its header is not a table of tensors")
    base = 8 + length
    tensors, end = {}, base
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: is not a valid safetensors file: entry {name!r} is malformed") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored as {dtype}, a quantization qwen-batch does not know: "
                f"use a file in {', '.join(sorted(SAFETENSORS_DTYPES))} (fp8 as e4m3fn) or a GGUF file"
            )
        tensors[name] = StoredTensor(name, mapped, base + begin, stop - begin, dtype, shape)
        end = max(end, base + stop)
    if end > mapped.size:
        raise CheckpointError(
            f"{path}: is truncated: its header describes {end:,} bytes, the file has {mapped.size:,} "
            "(an interrupted download? fetch it again)"
        )
    return tensors


def read_gguf(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a GGUF file, through the `gguf` package's reader (which maps the file read-only)."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            f"{path}: is a GGUF file, which needs the gguf package: pip install 'qwen-batch[gguf]'"
        ) from None
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error, OSError) as error:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: is not a readable GGUF file ({type(error).__name__}: {error}; {size:,} bytes): "
            "truncated or corrupt? fetch it again"
        ) from None
    mapped = MappedFile(path)
    supported = {int(kind) for kind in SUPPORTED_GGUF_QUANT_TYPES}
    tensors = {}
    for record in reader.tensors:
        kind = gguf.GGMLQuantizationType(int(record.tensor_type))
        if kind.name not in GGUF_FLOAT_TYPES and int(kind) not in supported:
            raise CheckpointError(
                f"{path}: tensor {record.name!r} is quantized as {kind.name}, which diffusers cannot dequantize "
                f"(it reads {', '.join(sorted(t.name for t in SUPPORTED_GGUF_QUANT_TYPES))}, F16 and F32)"
            )
        offset, nbytes = int(record.data_offset), int(record.n_bytes)
        if offset + nbytes > mapped.size:
            raise CheckpointError(
                f"{path}: is truncated: tensor {record.name!r} ends at byte {offset + nbytes:,}, the file has "
                f"{mapped.size:,} (an interrupted download? fetch it again)"
            )
        shape = tuple(int(n) for n in reversed(record.shape))  # GGUF lists the innermost dimension first
        tensors[record.name] = StoredTensor(record.name, mapped, offset, nbytes, kind.name, shape, int(kind))
    del reader  # its own map of the file is not needed any more
    return tensors


class ReleasedAfterRead:
    """A stored tensor as transformers' loader reads its checkpoint slices (`slice[...]`): a copy, after which
    the file's pages go back to the kernel. transformers keeps every shard of a model mapped until its load
    ends, so the whole model's pages pile up in the process's RSS (16.4 GiB for Qwen-Image's text encoder,
    measured on an H200); handed these instead, it holds one tensor's copy per reading thread at a time."""

    def __init__(self, stored: StoredTensor):
        self.stored = stored

    def __getitem__(self, key) -> torch.Tensor:
        copy = self.stored.tensor()[key].clone()
        self.stored.release()
        return copy

    def get_shape(self) -> list[int]:
        return list(self.stored.shape)

    @property
    def shape(self):
        import torch

        return torch.Size(self.stored.shape)


def safetensors_files(directory: Path) -> list[Path]:
    """The weights files of one component folder: the shards its index lists, or its safetensors files."""
    indexes = sorted(Path(directory).glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [Path(directory) / name for name in sorted(set(weight_map.values()))]
    return sorted(Path(directory).glob("*.safetensors"))


def storage_summary(tensors: Mapping[str, StoredTensor]) -> str:
    """How a file stores its weights, in a few words: `fp8 e4m3fn`, `bf16`, `GGUF Q4_K (+Q6_K, F32)`..."""
    by_bytes: dict[str, int] = {}
    for tensor in tensors.values():
        by_bytes[tensor.storage] = by_bytes.get(tensor.storage, 0) + tensor.nbytes
    order = sorted(by_bytes, key=by_bytes.__getitem__, reverse=True)
    gguf = any(tensor.gguf_type is not None for tensor in tensors.values())
    names = [("fp8 e4m3fn" if kind == "F8_E4M3" else kind.lower()) if not gguf else kind for kind in order]
    main, rest = names[0], names[1:]
    return ("GGUF " if gguf else "") + main + (f" (+{', '.join(rest)})" if rest else "")
