"""Joint attention for batches of prompts of different lengths, without a host sync per step.

Batched CFG puts prompts of different lengths into one forward (the negative " " is shorter than any
prompt), so the text is zero-padded and masked. Handing that mask to diffusers' transformer costs a
host-device synchronization in every forward (`compute_text_seq_len_from_mask` builds a tensor from a
Python int on the GPU), which stalls the step loop once per step. `BatchAttention` takes the mask
through `attention_kwargs` instead, straight to the attention of each block: the transformer never
sees it, and RoPE is the same (it depends on the padded length only).

Two kernels for a padded batch:
- `sdpa`: diffusers' own joint mask through `scaled_dot_product_attention` (cuDNN or memory-efficient
  kernels take masks; FlashAttention does not). Runs everywhere.
- `fa4`: each row laid out `[image tokens, its text, padding]` instead of `[text, padding, image]`, so
  its real tokens are a prefix of the row; FlashAttention-4 (`pip install qwen-batch[fast]`) attends
  within each row's prefix (`seqused`), skipping padding tiles entirely instead of computing and then
  masking them (on an H200 2.58 ms a layer against 4.21 ms for 8 rows: docs/benchmarks.md). Chosen
  automatically on Hopper or newer when `flash_attn.cute` imports; elsewhere `prefix_attention` runs a
  masked SDPA with the same contract, so the layout is tested on any machine. Under `fa4` the text
  can also come packed (`text_index`, qwen_batch.families.qwen_image.packed_text): real tokens only, one sequence for
  the batch; it is scattered into the joint layout for attention and gathered back after.
Both give the masked arithmetic up to the order of the terms in each softmax sum. A batch with no
padding takes diffusers' unmasked path either way (cuDNN's flash kernel, which FlashAttention-4 does
not beat on unmasked batches). `QWEN_BATCH_ATTENTION=sdpa` forces the portable kernel.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from qwen_batch.families.qwen_image.packed_text import pack, packed_positions, unpack
from qwen_batch.families.qwen_image.rotary import apply_rotary

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

SDPA, FA4 = "sdpa", "fa4"  # the kernels padded batches attend through
KERNELS = (SDPA, FA4)
ATTENTION_ENV = "QWEN_BATCH_ATTENTION"
# "auto": fa4 where FlashAttention-4 runs, else sdpa. Benchmarks set a kernel here to compare them.
ATTENTION_KERNEL = "auto"
# RoPE in real arithmetic (qwen_batch/families/qwen_image/rotary.py: Inductor fuses it; diffusers' complex multiply runs as
# eager kernels inside a compiled block). False: diffusers' own, for benchmarks to compare.
REAL_ROTARY = True


class BatchAttention(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's double-stream attention, with the batch's text mask given as `text_mask` (bool,
    `[rows, text tokens]`, each row's real tokens first) through the transformer's `attention_kwargs`,
    and under `fa4` optionally `text_index` (the text stream comes packed, `[1, real tokens, dim]`).

    The projections, QK norms, RoPE and joint attention are diffusers' processor's, in its order and
    arithmetic (RoPE written in real numbers, which a compiler fuses: qwen_batch/families/qwen_image/rotary.py); under `fa4`
    only the layout of the joint sequence and the attention call differ.
    """

    def __init__(self, kernel: str = SDPA):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        self.kernel = kernel

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_mask: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if text_index is not None and (text_mask is None or self.kernel != FA4):
            raise ValueError("packed text (text_index) needs the fa4 kernel and the padded layout's text_mask")
        if attention_mask is not None:  # as diffusers' processor: the mask comes as the text's
            raise ValueError("BatchAttention takes the text's mask (text_mask), not a joint attention_mask")
        mask = text_mask if text_mask is not None else encoder_hidden_states_mask
        image, text = self._rotated_projections(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_index, mask
        )
        if mask is not None and self.kernel == FA4:
            return self._prefix_attention(attn, image, text, mask, text_index)
        # Nothing padded (SDPA takes cuDNN's flash kernel), or diffusers' masked path with our mask.
        return self._joint_attention(attn, image, text, mask)

    @staticmethod
    def _rotated_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_index, mask):
        """Query, key and value of the image and of the text, `[rows, tokens, heads, head_dim]` each
        (packed text: `[1, real tokens, ...]`, its rotary positions those of the padded layout `mask`),
        QK-normed and rotated as in diffusers' processor."""
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (
            projection(hidden_states).unflatten(-1, (-1, head_dim)) for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_query, txt_key, txt_value = (
            projection(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if REAL_ROTARY:
                img_freqs, txt_freqs = torch.view_as_real(img_freqs), torch.view_as_real(txt_freqs)
                rotate = apply_rotary
            else:
                rotate = functools.partial(apply_rotary_emb_qwen, use_real=False)
            if text_index is not None:  # each packed token at its position within its own row
                txt_freqs = txt_freqs[packed_positions(text_index, mask.shape[1])]
            img_query, img_key = rotate(img_query, img_freqs), rotate(img_key, img_freqs)
            txt_query, txt_key = rotate(txt_query, txt_freqs), rotate(txt_key, txt_freqs)
        return (img_query, img_key, img_value), (txt_query, txt_key, txt_value)

    def _joint_attention(self, attn, image, text, mask):
        """diffusers' joint attention: `[text, image]` per row, the text's padding masked out (`mask`
        `[rows, text tokens]`, or None when nothing is padded)."""
        text_tokens = text[0].shape[1]
        if mask is not None:
            image_mask = torch.ones(mask.shape[0], image[0].shape[1], dtype=torch.bool, device=mask.device)
            mask = torch.cat([mask, image_mask], dim=1)[:, None, None, :]
        query, key, value = (torch.cat(pair, dim=1) for pair in zip(text, image, strict=True))
        joint = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(query.dtype)
        img_attn_output = attn.to_out[0](joint[:, text_tokens:].contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        return img_attn_output, attn.to_add_out(joint[:, :text_tokens].contiguous())

    @staticmethod
    def _prefix_attention(attn, image, text, mask, text_index):
        """`[image, text, padding]` per row: `[rows, tokens, heads, head_dim]`, FlashAttention's own
        layout (no transposes), each row's real tokens a prefix of `lengths[row]`. Packed text is
        scattered into that layout here and gathered back after."""
        rows, text_tokens = mask.shape
        if text_index is not None:
            text = tuple(unpack(tensor, text_index, rows, text_tokens) for tensor in text)
        image_tokens = image[0].shape[1]
        query, key, value = (torch.cat(pair, dim=1) for pair in zip(image, text, strict=True))
        lengths = (mask.sum(dim=1) + image_tokens).to(torch.int32)
        joint = prefix_attention(query, key, value, lengths, image_tokens).flatten(2, 3)

        img_attn_output = attn.to_out[0](joint[:, :image_tokens])
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        txt_joint = joint[:, image_tokens:]
        txt_attn_output = attn.to_add_out(txt_joint if text_index is None else pack(txt_joint, text_index))
        return img_attn_output, txt_attn_output


@torch.library.custom_op("qwen_batch::prefix_attention", mutates_args=())
def prefix_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, shortest: int = 0
) -> torch.Tensor:
    """Softmax attention within each row's prefix: `[rows, tokens, heads, head_dim]` in and out, row r's
    first `lengths[r]` (int32) tokens attending to each other only; the outputs past a prefix are zero.
    `shortest`: a length no prefix is shorter than (the image tokens), so only the tokens after it need
    zeroing beforehand.

    FlashAttention-4 where it runs (its kernel skips the tiles past a prefix), otherwise SDPA with the
    equivalent mask. A custom op, so a compiled block keeps one graph around a kernel dynamo cannot
    trace. Zero past the prefix rather than left unwritten: padding tokens feed the next layer's
    values, and a tile of keys reads them (weighted by zero, but 0 x NaN is NaN).
    """
    forward = _flash_attention_4() if query.is_cuda else None
    if forward is not None:
        out = torch.empty_like(query)
        out[:, shortest:].zero_()  # FlashAttention-4 writes each prefix only
        forward(query, key, value, seqused_q=lengths, seqused_k=lengths, out=out)
        return out
    return _masked_prefix_attention(query, key, value, lengths)


@prefix_attention.register_fake
def _(query, key, value, lengths, shortest=0):
    return torch.empty_like(query)


def _masked_prefix_attention(query, key, value, lengths):
    positions = torch.arange(query.shape[1], device=query.device)
    inside = positions[None, :] < lengths[:, None].to(positions.dtype)  # [rows, tokens]
    out = torch.nn.functional.scaled_dot_product_attention(
        *(tensor.transpose(1, 2) for tensor in (query, key, value)), attn_mask=inside[:, None, None, :]
    ).transpose(1, 2)
    return out * inside[:, :, None, None].to(out.dtype)


@functools.cache
def _flash_attention_4() -> Callable | None:
    """FlashAttention-4's forward (`flash-attn-4`, CuTe DSL kernels compiled at first use), or None."""
    try:
        from flash_attn.cute.interface import _flash_attn_fwd
    except ImportError:
        return None
    except Exception as error:  # installed but broken (its CUDA libraries, say): run, on SDPA, and say why
        log.warning(
            "flash-attn-4 is installed but does not load (%s: %s): padded batches attend through SDPA",
            type(error).__name__,
            error,
        )
        return None
    return _flash_attn_fwd


def fa4_available(device: str, dtype: torch.dtype) -> bool:
    """FlashAttention-4's conditions for this model: CUDA, compute capability 9.0+ (its Hopper and
    Blackwell kernels), half precision, and `flash-attn-4` installed."""
    if not device.startswith("cuda") or not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(torch.device(device)) < (9, 0):
        return False
    return _flash_attention_4() is not None


def choose_kernel(device: str, dtype: torch.dtype) -> str:
    """The kernel for padded batches: `$QWEN_BATCH_ATTENTION` or `ATTENTION_KERNEL` (`auto`, `sdpa`,
    `fa4`); `auto` takes fa4 where it runs. Asking for fa4 where it cannot run is an error, not a
    silent fallback."""
    wanted = os.environ.get(ATTENTION_ENV) or ATTENTION_KERNEL
    if wanted not in (*KERNELS, "auto"):
        raise ValueError(f"{ATTENTION_ENV}={wanted!r}: use auto, {', '.join(KERNELS)}")
    if wanted == "auto":
        return FA4 if fa4_available(device, dtype) else SDPA
    if wanted == FA4 and not fa4_available(device, dtype):
        raise ValueError(
            "attention kernel fa4 needs a CUDA GPU of compute capability 9.0+ (Hopper, Blackwell), bf16 or "
            "fp16, and FlashAttention-4 (pip install 'qwen-batch[fast]'); use sdpa here"
        )
    return wanted


def use_batch_attention(
    transformer: torch.nn.Module, device: str, dtype: torch.dtype, kernel: str | None = None
) -> str:
    """Install `BatchAttention` in every block of a Qwen-Image transformer; returns the kernel it uses
    for padded batches. Callers then pass the text mask as `attention_kwargs={"text_mask": mask}`."""
    kernel = kernel or choose_kernel(device, dtype)
    transformer.set_attn_processor(BatchAttention(kernel))
    return kernel
