"""The feed-forward's GELU inside its GEMM: cuBLASLt's GELU epilogue instead of a kernel of its own.

Each of Qwen-Image's 120 feed-forwards (`img_mlp`, `txt_mlp` in 60 blocks) is `Linear(3072 -> 12288)`,
tanh-GELU, `Linear(12288 -> 3072)`. Compiled, Inductor leaves the first GEMM to cuBLAS and runs bias +
GELU as a separate elementwise kernel, which reads and writes the 12288-wide activation once more: in
a profile on an H200, 4.5 ms of a 126.5 ms row-forward (docs/benchmarks.md). `torch._addmm_activation`
asks cuBLASLt for the GEMM with a bias + tanh-GELU epilogue, so the activation is written once, already
activated; Inductor keeps the op as it is (a fallback kernel, not decomposed).

The arithmetic: GELU applied to the fp32 accumulator before the single rounding to bf16, where the
unfused path rounds first, so within bf16 rounding of diffusers' output. On the CPU
`_addmm_activation` uses the erf GELU, not tanh, so anywhere but CUDA the module runs diffusers' own
forward; likewise when a layer is not a plain `nn.Linear` with a plain weight (peft wrapping it while
adapters load, torchao's fp8 weights).
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU


class GeluEpilogue(GELU):
    """diffusers' `GELU(approximate="tanh")` module, its projection and GELU as one cuBLASLt GEMM."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        if not (hidden_states.is_cuda and type(proj) is torch.nn.Linear and _plain(proj)):
            return super().forward(hidden_states)
        flat = hidden_states.flatten(0, -2)
        out = torch._addmm_activation(proj.bias, flat, proj.weight.t(), use_gelu=True)
        return out.unflatten(0, hidden_states.shape[:-1])


def _plain(linear: torch.nn.Linear) -> bool:
    return linear.bias is not None and all(type(tensor.data) is torch.Tensor for tensor in (linear.weight, linear.bias))


def fuse_gelu_epilogues(model: torch.nn.Module) -> int:
    """Make every tanh-GELU projection module of `model` a `GeluEpilogue`, in place (the same module,
    projection and parameter names, so adapters and state dicts are unaffected); returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is GELU and module.approximate == "tanh":
            module.__class__ = GeluEpilogue
            swapped += 1
    return swapped
