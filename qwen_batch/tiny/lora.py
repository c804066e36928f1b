"""Random LoRA adapters for a Qwen-Image or Qwen-Image-2.1 transformer, in the key layouts other tools write.

`qwen-batch tiny-lora MODEL OUT.safetensors [--rank R] [--format F]` writes one for any model folder
(usually a tiny one, `qwen-batch tiny-model DIR`, or `tiny`, `tiny-2.1`), so the adapter features can be
tried and tested with no download; the GPU benchmark writes full-size ones the same way.

Every linear layer of the transformer blocks gets a rank-R pair, as the Lightning LoRAs have: the layers of
the model's own transformer class (`qwen_batch.adapters.loras.transformer_layout`), so a Qwen-Image-2.1
adapter changes each block's attn.to_q / to_k / to_v / to_out.0 and img_mlp.proj / gate_layer / out, a
Qwen-Image one its two streams' attention, modulation and MLP layers. The same seed gives the same change to
the weights in every format, so the formats can be checked against each other: the layouts differ only in
names and in how the scale is stored.

- `diffusers`: `transformer.<layer>.lora_A.weight` / `lora_B.weight` (what `save_lora_weights` writes);
- `kohya`: `lora_unet_<layer with _>.lora_down.weight` / `lora_up.weight` / `.alpha` (alpha = rank / 2,
  so the stored up-projection is doubled to make the same change);
- `comfyui`: `diffusion_model.<layer>.lora_down.weight` / `lora_up.weight` / `.alpha`;
- `diffsynth`: `<layer>.lora_A.default.weight` / `lora_B.default.weight` (peft-wrapped names).

kohya's names flatten every `.` to `_`, and diffusers' converter cannot tell a layer named with `_` from two
nested modules: a 2.1 kohya adapter's `img_mlp_gate_layer` is read as `img_mlp.gate.layer`, which 2.1 has not,
so the run refuses it (`qwen_batch.adapters.loras`). Use the other layouts for 2.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.io.file_modes import apply_umask

if TYPE_CHECKING:
    import torch

FORMATS = ("diffusers", "kohya", "comfyui", "diffsynth")
DEFAULT_STRENGTH = 0.5  # the change's spread relative to the layer's own weights at their initialization


def random_factors(
    layout: Mapping[str, tuple[int, int]],
    rank: int,
    seed: int = 0,
    strength: float = DEFAULT_STRENGTH,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (down `[rank, in]`, up `[out, rank]`) for every linear layer of the transformer blocks.

    down ~ N(0, 1/in) and up ~ N(0, strength^2 / (3 rank)): the change up @ down then spreads like
    `strength` times a freshly initialized layer's weights (uniform, std 1/sqrt(3 in))."""
    import torch

    if rank < 1:
        raise ConfigError(f"--rank {rank}: use 1 or more")
    dtype = dtype or torch.float32
    generator = torch.Generator(device).manual_seed(seed)
    factors = {}
    for name in sorted(layout):
        if not name.startswith("transformer_blocks."):
            continue
        in_features, out_features = layout[name]
        down = torch.randn(rank, in_features, generator=generator, device=device) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator, device=device) * strength / (3 * rank) ** 0.5
        factors[name] = (down.to(dtype), up.to(dtype))
    return factors


def lora_state_dict(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], layout: str) -> dict[str, torch.Tensor]:
    """The factors under the key names of `layout` (one of FORMATS); each makes the same change."""
    import torch

    if layout not in FORMATS:
        raise ConfigError(f"--format {layout!r}: use one of {', '.join(FORMATS)}")
    tensors = {}
    for name, (down, up) in factors.items():
        rank = down.shape[0]
        if layout == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
        elif layout == "diffsynth":
            tensors[f"{name}.lora_A.default.weight"] = down
            tensors[f"{name}.lora_B.default.weight"] = up
        else:
            # alpha / rank scales the change when loaded: store alpha = rank / 2 and twice the up-projection.
            prefix = f"lora_unet_{name.replace('.', '_')}" if layout == "kohya" else f"diffusion_model.{name}"
            tensors[f"{prefix}.lora_down.weight"] = down
            tensors[f"{prefix}.lora_up.weight"] = up * 2
            tensors[f"{prefix}.alpha"] = torch.tensor(rank / 2, dtype=torch.float32)
    return {key: tensor.contiguous() for key, tensor in tensors.items()}


def write_lora(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry: safetensors writes several in a random order, and the same adapter should be
    # the same bytes (its SHA-256 is in every row's fingerprint).
    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    return apply_umask(path)


def write_tiny_lora(
    model: str,
    path: str | Path,
    rank: int = 4,
    layout: str = "diffusers",
    seed: int = 0,
    strength: float = DEFAULT_STRENGTH,
) -> Path:
    """A random adapter for `model` (a diffusers folder, or a tiny model's name: `tiny`, `tiny-2.1`...), in `layout`:
    for the layers of the model's own transformer class, Qwen-Image's or Qwen-Image-2.1's."""
    from qwen_batch.adapters.loras import transformer_layout
    from qwen_batch.weights.model_source import resolve_model

    factors = random_factors(transformer_layout(resolve_model(model)), rank, seed, strength)
    return write_lora(lora_state_dict(factors, layout), path)
