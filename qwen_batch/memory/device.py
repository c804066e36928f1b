"""Which device and dtype a run uses, and GPU memory bookkeeping between stages."""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp32")


def resolve_device(name: str) -> str:
    import torch

    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """bf16 on GPU (fp16 overflows in this model: activations reach ~2e7), fp32 on CPU."""
    import torch

    if name not in DTYPES:
        hint = " (fp16 overflows in Qwen-Image and gives black images)" if name in ("fp16", "float16") else ""
        raise ConfigError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}{hint}")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def gpu_memory_gib(device: str) -> tuple[float, float] | None:
    """(allocated, peak) GiB on a CUDA device, or None on CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: str) -> None:
    """Return freed tensors to the system, so the next stage's model finds the GPU empty."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        # Pinned host memory (offload modes) stays cached by PyTorch after its tensors are freed; give
        # it back too, or the encoder's pinned copy would still hold host RAM while the transformer loads.
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def to_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a host tensor to `device` without the host waiting for the GPU: a plain `.to("cuda")`
    from pageable memory synchronizes the stream, which would drain the GPU's queue at every batch."""
    if not device.startswith("cuda") or tensor.is_cuda:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
