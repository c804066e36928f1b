"""Write a transformer as one file, in the layouts people share Qwen-Image transformers in.

`qwen-batch tiny-model --format ...` uses it to give the tests (and anyone trying `--transformer`) files
of the tiny model in each layout, and the GPU benchmark to write full-size files:

- `bf16`: every tensor in bf16, diffusers' names (what `QwenImageTransformer2DModel.from_single_file` reads).
- `fp8`: as Comfy-Org's `qwen_image_fp8_e4m3fn.safetensors`: the blocks' linear weights cast to fp8 e4m3fn
  (a plain cast, no scale), everything else in bf16, keys under ComfyUI's `model.diffusion_model.` prefix.
- `gguf-q8_0`, `gguf-q4_0`: GGUF, as city96's files: the blocks' linear weights block-quantized by the
  `gguf` package's own quantizer, the rest in F32, diffusers' names, architecture `qwen_image`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.io.file_modes import apply_umask

if TYPE_CHECKING:
    import torch

FORMATS = ("bf16", "fp8", "gguf-q8_0", "gguf-q4_0")
COMFY_PREFIX = "model.diffusion_model."
GGUF_ARCHITECTURE = "qwen_image"


def is_block_linear_weight(name: str, linears: set[str]) -> bool:
    return name.startswith("transformer_blocks.") and name.endswith(".weight") and name[: -len(".weight")] in linears


def write_transformer_file(state_dict: Mapping[str, torch.Tensor], linears: set[str], path: Path, layout: str) -> Path:
    """Write `state_dict` (a transformer's, diffusers names) to `path` in `layout` (one of FORMATS);
    `linears` names the model's linear layers."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "bf16":
        from safetensors.torch import save_file

        save_file({name: tensor.to(torch.bfloat16).contiguous() for name, tensor in state_dict.items()}, path)
    elif layout == "fp8":
        from safetensors.torch import save_file

        tensors = {
            COMFY_PREFIX + name: tensor.to(
                torch.float8_e4m3fn if is_block_linear_weight(name, linears) else torch.bfloat16
            ).contiguous()
            for name, tensor in state_dict.items()
        }
        save_file(tensors, path, metadata={"format": "pt"})
    elif layout.startswith("gguf-"):
        _write_gguf(state_dict, linears, path, layout.removeprefix("gguf-").upper())
    else:
        raise ConfigError(f"--format {layout!r}: use one of {', '.join(FORMATS)}")
    return apply_umask(path)


def _write_gguf(state_dict: Mapping[str, torch.Tensor], linears: set[str], path: Path, quant: str) -> None:
    try:
        import gguf
        from gguf import quants
    except ImportError:
        raise ConfigError("writing GGUF files needs the gguf package: pip install 'qwen-batch[gguf]'") from None
    import numpy as np

    kind = gguf.GGMLQuantizationType[quant]
    block_size, _ = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), arch=GGUF_ARCHITECTURE)
    for name, tensor in state_dict.items():
        array = tensor.detach().float().cpu().numpy()
        if is_block_linear_weight(name, linears) and array.shape[-1] % block_size == 0:
            writer.add_tensor(name, quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_transformer_file(model_folder: Path, path: Path, layout: str) -> Path:
    """The transformer of a diffusers model folder, written to one file in `layout`."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(
        model_folder, subfolder="transformer", use_safetensors=True
    )
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    return write_transformer_file(transformer.state_dict(), linears, path, layout)
