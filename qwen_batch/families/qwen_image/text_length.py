"""A batch's text length as the compiled blocks see it: symbolic from the first batch on, so they compile once.

Every batch brings its own text length. Packed (FlashAttention-4, `packed_text`), it is the sum of the rows'
real tokens, a new number nearly every batch; padded (SDPA, and the ControlNet, which runs on the positive
prompts alone), it is the longest prompt's, rounded up to a multiple of `denoise.text.TEXT_BUCKET`, so a run
meets a few. Either way dynamo would compile the blocks for the first length, recompile them when another
comes (automatic dynamic shapes make the length symbolic then) and only keep one graph after that, while the
GPU waits. Measured: on an H200, packed, 20 s in bf16 and 55 s in fp8 at the second batch, and 33 s more over a
200-prompt run (GPU busy 76.5%); on an H100 under SDPA, 18 s when the prompts first padded to 128 tokens instead
of 64 (GPU busy 85.9% over the same run). Marked symbolic from the first batch, the blocks compile once per
kind of forward (a masked one, and an unmasked one where no row is padded: CFG's negatives run apart under SDPA).

The blocks' inputs that carry the length are made outside the compiled region, in the model's own forward, so
hooks mark them there: the text after `txt_in`, its rotary frequencies (`pos_embed`'s second output), the mask
the attention takes (`text_mask`, its second dimension the padded layout's length) and, packed, `text_index`.
"""

from __future__ import annotations

import torch


def compile_once_for_every_text_length(model: torch.nn.Module) -> None:
    """Hook a Qwen-Image transformer or ControlNet so that its compiled blocks take the text length as symbolic
    from the first batch on. Before compiling; eager forwards are unchanged (a mark is only a hint to dynamo)."""
    from torch._dynamo import maybe_mark_dynamic

    def mark_attention_inputs(module, args, kwargs):
        # The transformer takes them as `attention_kwargs`, the ControlNet as `joint_attention_kwargs`.
        text_kwargs = kwargs.get("attention_kwargs") or kwargs.get("joint_attention_kwargs") or {}
        if text_kwargs.get("text_mask") is not None:
            maybe_mark_dynamic(text_kwargs["text_mask"], 1)
        if text_kwargs.get("text_index") is not None:
            maybe_mark_dynamic(text_kwargs["text_index"], 0)

    def mark_text(module, args, output):
        maybe_mark_dynamic(output, 1)

    def mark_text_frequencies(module, args, output):
        maybe_mark_dynamic(output[1], 0)

    model.register_forward_pre_hook(mark_attention_inputs, with_kwargs=True)
    model.txt_in.register_forward_hook(mark_text)
    model.pos_embed.register_forward_hook(mark_text_frequencies)
