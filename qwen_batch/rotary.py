"""Qwen-Image's rotary position embedding, written so that a compiler can fuse it.

diffusers applies it (`apply_rotary_emb_qwen(..., use_real=False)`) as a complex multiply in fp32.
Inductor cannot generate code for complex operators ("Torchinductor does not support code generation
for complex operators"), so inside a compiled block that multiply runs as eager kernels of its own: the
query or key read, widened to fp32 and written, multiplied and written again, then narrowed back, four
passes over `[rows, 4096 image tokens, 3072]` for each query and key of each of the 60 blocks. On an
H200 these were the "uncompiled elementwise ops" of a forward's profile, about 3% of it
(docs/benchmarks.md). Written as real products of the same fp32 numbers, Inductor fuses the rotation
into the QK norm's kernel before it: one pass in, one out.

The arithmetic is the complex product's: each pair `(a, b)` of a head's channels, times the position's
`(cos, sin)`, becomes `(a cos - b sin, b cos + a sin)` in fp32, rounded once to the input's dtype. On
the CPU the result equals diffusers' bit for bit, eager and compiled (tests/test_rotary.py).
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`x` `[rows, tokens, heads, head_dim]` rotated by `freqs`: complex `[tokens, head_dim / 2]`, as
    diffusers' `QwenEmbedRope` gives them, or their `torch.view_as_real` (gather tokens from that, not
    from the complex tensor: indexing is a complex op too). What `apply_rotary_emb_qwen(x, freqs,
    use_real=False)` returns, in real arithmetic."""
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)  # a view: [tokens, head_dim / 2, 2]
    cos_sin = freqs.unsqueeze(1)  # [tokens, 1, head_dim / 2, 2]
    cos, sin = cos_sin[..., :1], cos_sin[..., 1:]
    pairs = x.float().unflatten(-1, (-1, 2))  # (a, b) per pair
    # (-b, a) by a flip and a sign, not by stacking the halves: a stack is a buffer of its own to
    # Inductor, and this way the rotation stays one pass that writes only its output.
    swapped = pairs.flip(-1) * torch.tensor((-1.0, 1.0), device=x.device)
    return (pairs * cos + swapped * sin).flatten(-2).type_as(x)
