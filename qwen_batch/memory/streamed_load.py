"""Load the transformer from its checkpoint files straight to where each block will live, one block at a time.

diffusers' `from_pretrained` reads the model into host memory first (memory-mapped) and leaves the rest to
the caller: placing, quantizing or streaming it means holding, at some point, either the whole bf16 model
on the GPU (41 GB: not on a 24 GiB card) or its pages in host RAM (a 16 GiB machine counts them all as
used). Here the model is built empty (`init_empty_weights`, as diffusers does), and each block's tensors are
read from the memory-mapped files (`qwen_batch.weights.checkpoint_files`), copied where they live (the GPU for
resident modes; host memory, pinned while the budget lasts, for offload modes), converted as the mode says
(`memory_modes.convert_block`: quantized to fp8 on the GPU, cast, ...), and their file pages handed back
before the next block is read. At no point does the process hold more than one block's worth of weights
that are not where they belong.

The same loop reads every source: the published diffusers layout (its shards), one safetensors file in
bf16/fp16/fp32 or fp8 (taken as stored: the fp8 bytes become torchao fp8 tensors with the file's scales),
and GGUF files (their quantized bytes become diffusers' `GGUFParameter`s in its `GGUFLinear` layers,
exactly as `from_single_file` builds them). Streamed (offload), an fp8 file's weights stay plain fp8 tensors
in an `Fp8Linear` (`qwen_batch.memory.fp8_linear` says why). On the CPU a bf16 layout loaded this way equals
diffusers' `from_pretrained` bit for bit (tests/test_transformer_files.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.memory.modes import FLOAT_WEIGHTS, FP8_WEIGHTS, GGUF_WEIGHTS
from qwen_batch.memory.placement import (
    BLOCKS,
    FP8,
    Placement,
    QuantizedWeights,
    convert_block,
    finish_placement,
    fp8_compute_available,
    pin_for_streaming,
    stored_fp8_weight,
    streaming_arena,
)
from qwen_batch.memory.planner import MODES_FOR
from qwen_batch.weights.transformer_file import TransformerWeights

if TYPE_CHECKING:
    import torch

    from qwen_batch.weights.checkpoint_files import StoredTensor


@dataclass
class LoadedTransformer:
    model: torch.nn.Module
    done: str  # the placement line for the log
    quantized: QuantizedWeights | None  # fp8 layers' way back to their original weights (adapters)


def load_transformer(
    weights: TransformerWeights, placement: Placement, device: str, dtype: torch.dtype
) -> LoadedTransformer:
    """The transformer of `weights`, placed as `placement` says (see the module's docstring)."""
    import torch

    kind, mode, streams = weights.kind, placement.mode, placement.streams
    if mode not in MODES_FOR[kind]:
        raise ValueError(f"{kind} weights cannot run in {mode} mode (the planner should not have chosen it)")
    home = "cpu" if streams else device  # where the tensors go as they are read
    arena = streaming_arena(placement, device)
    fp8_matmuls = fp8_compute_available(device)
    model = _empty_model(weights, dtype)
    for prefix, names in _groups(model):
        module = model.get_submodule(prefix) if prefix else model
        for name in names:
            stored = weights.tensors[name]
            value = _materialize(name, stored, weights, home, dtype, fp8_matmuls, plain_fp8=streams)
            _assign(model, name, value)
        if streams and kind == FP8_WEIGHTS:  # streamed fp8 weights: plain tensors in an Fp8Linear each
            _swap_in_fp8_linears(model, names, weights)
        if prefix.startswith(f"{BLOCKS}.") and kind == FLOAT_WEIGHTS:
            convert_block(module, prefix, placement, device, dtype)
        if arena is not None:  # the embedders first (the root: its blocks are still empty), then each block
            pin_for_streaming(module, arena)
        for name in names:
            weights.tensors[name].release()
    quantized = None
    if placement.adapters and mode == FP8:
        quantized = QuantizedWeights.after_placement(model, FileOriginals(weights, dtype), device)
        if quantized is not None and kind == FP8_WEIGHTS:

            def stored(layer: str) -> torch.Tensor:
                name = f"{layer}.weight"
                return _materialize(name, weights.tensors[name], weights, device, dtype, fp8_matmuls)

            quantized.stored = stored
    model.requires_grad_(False)
    done = finish_placement(model, placement, device, dtype, arena, stored_fp8=kind == FP8_WEIGHTS)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return LoadedTransformer(model.eval(), done, quantized)


def _empty_model(weights: TransformerWeights, dtype: torch.dtype) -> torch.nn.Module:
    """The model with no weights yet (meta tensors); for GGUF, with diffusers' GGUF linear layers."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(dict(weights.config))
    if weights.kind == GGUF_WEIGHTS:
        from diffusers import GGUFQuantizationConfig
        from diffusers.quantizers import DiffusersAutoQuantizer

        quantizer = DiffusersAutoQuantizer.from_config(GGUFQuantizationConfig(compute_dtype=dtype))
        gguf_views = {name: stored.tensor() for name, stored in weights.tensors.items() if stored.is_quantized}
        quantizer.preprocess_model(model=model, device_map=None, state_dict=gguf_views, keep_in_fp32_modules=[])
        model.hf_quantizer = quantizer
    return model


def _groups(model: torch.nn.Module) -> Iterator[tuple[str, list[str]]]:
    """The parameter names to load, one transformer block at a time; everything outside the blocks first."""
    blocks: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in model.state_dict():
        parts = name.split(".")
        if parts[0] == BLOCKS:
            blocks.setdefault(".".join(parts[:2]), []).append(name)
        else:
            rest.append(name)
    yield "", rest
    yield from sorted(blocks.items(), key=lambda item: int(item[0].split(".")[1]))


def _materialize(
    name: str,
    stored: StoredTensor,
    weights: TransformerWeights,
    home: str,
    dtype: torch.dtype,
    fp8_matmuls: bool,
    plain_fp8: bool = False,
) -> torch.Tensor:
    """One stored tensor as the model will hold it, on `home`. A float tensor in the run's dtype, copied
    (on the CPU a tensor already in that dtype stays a view of the file: nothing copied); a GGUF weight as
    its quantized bytes; an fp8 linear weight of a block as a torchao fp8 tensor (`plain_fp8`: as it is, for
    an `Fp8Linear`); any other fp8 tensor upcast."""
    view = stored.tensor()
    if stored.is_quantized:
        return view.to(home)
    if stored.storage == "F8_E4M3":
        scale = weights.scales.get(name, 1.0)
        if name.startswith(f"{BLOCKS}.") and name.endswith(".weight"):
            if plain_fp8:
                return view.to(home)
            return stored_fp8_weight(view.to(home), scale, dtype, fp8_matmuls and home != "cpu")
        return (view.to(home, dtype=dtype) * scale).to(dtype)
    return view.to(home, dtype=dtype)


def _swap_in_fp8_linears(model: torch.nn.Module, names: list[str], weights: TransformerWeights) -> None:
    """The linear layers among `names` whose weights the file holds in fp8 become `Fp8Linear`s (one scale per
    row: the file's per-tensor scale, repeated)."""
    import torch

    from qwen_batch.memory.fp8_linear import swap_in

    for name in names:
        if weights.tensors[name].storage != "F8_E4M3" or not name.endswith(".weight"):
            continue
        layer = name.removesuffix(".weight")
        weight = model.get_submodule(layer).weight.data
        scale = torch.full((weight.shape[0], 1), weights.scales.get(name, 1.0), dtype=torch.float32)
        swap_in(model, layer, weight, scale, weight.device.type)


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    import torch

    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._buffers:
        module._buffers[attribute] = value
    elif isinstance(value, torch.nn.Parameter):  # diffusers' GGUFParameter: wrapping it again would drop its type
        module._parameters[attribute] = value
    else:
        module._parameters[attribute] = torch.nn.Parameter(value, requires_grad=False)


class FileOriginals(Mapping):
    """The original weights of the blocks' linear layers, read back from the checkpoint files when an adapter
    switch needs them (fp8 cannot take a fuse): a view of the mapped pages where the file holds them in the
    run's dtype (nothing copied, nothing kept), else converted (fp8 dequantized with its scale) on request."""

    def __init__(self, weights: TransformerWeights, dtype: torch.dtype, names: list[str] | None = None):
        self._weights, self._dtype = weights, dtype
        self._names = names or [
            name.removesuffix(".weight")
            for name in weights.tensors
            if name.startswith(f"{BLOCKS}.") and name.endswith(".weight") and not weights.tensors[name].is_quantized
        ]

    def restricted_to(self, names: list[str]) -> FileOriginals:
        return FileOriginals(self._weights, self._dtype, list(names))

    def __getitem__(self, name: str) -> torch.Tensor:
        key = f"{name}.weight"
        view = self._weights.tensors[key].tensor()
        if view.dtype == self._dtype:
            return view
        return (view.float() * self._weights.scales.get(key, 1.0)).to(self._dtype)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
