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
    """`x` `[rows, tokens, heads, head_dim]` rotated by `freqs`: complex `[(rows,) tokens, head_dim / 2]`, as
    diffusers' `QwenEmbedRope` gives them, or their `torch.view_as_real` (gather tokens from that, not
    from the complex tensor: indexing is a complex op too). What `apply_rotary_emb_qwen(x, freqs,
    use_real=False)` returns, in real arithmetic."""
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)  # a view: [tokens, head_dim / 2, 2]
    # One rotation per token, shared by every row ([tokens, ...]) or per row ([rows, tokens, ...]: Qwen-Image-2.1's
    # rows each place their image after their own prefix): broadcast over the heads either way.
    cos, sin = freqs.unsqueeze(-3).unbind(-1)  # each [(rows,) tokens, 1, head_dim / 2]
    # (a, b) -> (a cos - b sin, b cos + a sin) as (a, b) cos + (b, a) (-sin, sin): a flip of the pairs,
    # not a stack of their halves, which Inductor would write out as an fp32 buffer of the whole
    # query; only the small sine pair is stacked. The signs come from the frequencies, not from a
    # constant tensor, which outside a compiled graph would be a host-to-device copy (and a host
    # sync) per call.
    signed_sin = torch.stack((-sin, sin), dim=-1)
    pairs = x.float().unflatten(-1, (-1, 2))
    return (pairs * cos[..., None] + pairs.flip(-1) * signed_sin).flatten(-2).type_as(x)
