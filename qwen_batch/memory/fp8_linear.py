"""A linear layer whose weight streams to the GPU in fp8: plain tensors (fp8 values, one float32 scale per
row), dequantized as the layer runs.

fp8-offload and an fp8 file streamed in offload mode copy every block's weights to the GPU at every step.
Resident, fp8 weights are torchao tensors (`Float8Tensor`, fp8 matmuls). Streamed, they cannot be: diffusers'
group offload moves a weight with `.to(device)`, and torchao 0.17's `.to` of a `Float8Tensor` to another
device fails under torch 2.11 (it asks torch to alias a CUDA result to the CPU input's storage: "Attempted to
set the storage of a tensor on device cuda:0 to a storage on different device cpu", seen on an H200). Plain
tensors stream as any other weight does (pinned arena, side stream). The values are torchao's: `quantize_rows`
is `Float8Tensor.from_hp` with per-row scales, and the layer computes what torchao's weight-only fp8 computes,
`(fp8 -> float32) * scale`, rounded once to the activations' dtype.
"""

from __future__ import annotations

import torch


class Fp8Linear(torch.nn.Module):
    """`y = x @ (weight * scale).T + bias`, the weight held in fp8 e4m3fn with one scale per output row."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.reshape(-1, 1).float(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() * self.weight_scale).to(hidden_states.dtype)
        return torch.nn.functional.linear(hidden_states, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 weight, per-row scales"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3fn values and per-row float32 scales of a weight, as torchao's per-row quantization makes them."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    quantized = Float8Tensor.from_hp(weight.to(torch.bfloat16), granularity=PerRow())
    return quantized.qdata, quantized.scale


def swap_in(module: torch.nn.Module, name: str, weight: torch.Tensor, scale: torch.Tensor, home: str) -> None:
    """Replace the linear layer `name` of `module` with an `Fp8Linear` holding `weight` and `scale`, on `home`."""
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    linear = getattr(parent, child)
    bias = None if linear.bias is None else linear.bias.detach().to(home)
    setattr(parent, child, Fp8Linear(weight.to(home), scale.to(home), bias))
