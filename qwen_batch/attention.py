"""Joint attention for batches of prompts of different lengths, without a host sync per step.

Batched CFG puts prompts of different lengths into one forward (the negative " " is shorter than any
prompt), so the text is zero-padded and masked. Handing that mask to diffusers' transformer costs a
host-device synchronization in every forward (`compute_text_seq_len_from_mask` builds a tensor from a
Python int on the GPU), which stalls the step loop once per step. `BatchAttention` takes the mask
through `attention_kwargs` instead, straight to the attention of each block, where it is applied
exactly as diffusers applies it: the transformer never sees it, and RoPE is the same (it depends on
the padded length only).

Two kernels for a padded batch:
- `sdpa`: diffusers' own joint mask through `scaled_dot_product_attention` (cuDNN or memory-efficient
  kernels take masks; FlashAttention does not).
- `varlen`: each row laid out `[image tokens, its text, padding]` instead of `[text, padding, image]`,
  so its real tokens are one contiguous run, attended with `torch.nn.attention.varlen.varlen_attn`
  (FlashAttention over packed sequences, no mask). A row's padding forms a run of its own: its
  outputs are garbage, as they are under the mask, and never reach a real token.
Both give the masked arithmetic up to the order of the terms in each softmax sum. Which is faster
depends on the GPU and library versions (docs/benchmarks.md): `ATTENTION_KERNEL` holds the measured
choice. A batch with no padding takes diffusers' unmasked path either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

if TYPE_CHECKING:
    import torch

KERNELS = ("sdpa", "varlen")
ATTENTION_KERNEL = "sdpa"  # measured on an H100, torch 2.11 (docs/benchmarks.md); "varlen" where it wins


class BatchAttention(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's double-stream attention, with the batch's text mask given as `text_mask` (bool,
    `[rows, text tokens]`, each row's real tokens first) through the transformer's `attention_kwargs`.

    The projections, QK norms and RoPE are diffusers' (their order and arithmetic unchanged); under
    `varlen` only the layout of the joint sequence and the attention call differ.
    """

    def __init__(self, kernel: str = "sdpa"):
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if text_mask is None or self.kernel == "sdpa":
            # Nothing padded (SDPA takes FlashAttention), or diffusers' masked path with our mask.
            mask = text_mask if text_mask is not None else encoder_hidden_states_mask
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, attention_mask, image_rotary_emb)
        import torch
        from torch.nn.attention.varlen import varlen_attn

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
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # [image, text, padding] per row, flattened to one packed sequence of `rows * length` tokens.
        rows, image_tokens = hidden_states.shape[:2]
        length = image_tokens + encoder_hidden_states.shape[1]
        query, key, value = (
            torch.cat([image, text], dim=1).flatten(0, 1)
            for image, text in ((img_query, txt_query), (img_key, txt_key), (img_value, txt_value))
        )
        boundaries = run_boundaries(text_mask, image_tokens)
        joint = varlen_attn(query, key, value, boundaries, boundaries, length, length)
        joint = joint.view(rows, length, -1).to(query.dtype)

        img_attn_output = attn.to_out[0](joint[:, :image_tokens].contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout
        txt_attn_output = attn.to_add_out(joint[:, image_tokens:].contiguous())
        return img_attn_output, txt_attn_output


def run_boundaries(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Cumulative run boundaries (int32, `2 * rows + 1`) of the packed sequence: per row, a run of its
    image and real text tokens, then a run of its padding (empty where the row is not padded).
    Computed on the device from the mask, so building them never waits for the GPU."""
    import torch

    length = image_tokens + text_mask.shape[1]
    real = image_tokens + text_mask.sum(dim=1)
    runs = torch.stack([real, length - real], dim=1).flatten()
    return torch.nn.functional.pad(runs.cumsum(0), (1, 0)).to(torch.int32)


def varlen_available(device: str, dtype: torch.dtype) -> bool:
    """FlashAttention's conditions: CUDA, compute capability 8.0+, half precision, and a torch with
    `varlen_attn` (2.9+)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_kernel(device: str, dtype: torch.dtype) -> str:
    """The kernel for padded batches: `ATTENTION_KERNEL` where it can run, else `sdpa`."""
    if ATTENTION_KERNEL == "varlen" and varlen_available(device, dtype):
        return "varlen"
    return "sdpa"


def use_batch_attention(
    transformer: torch.nn.Module, device: str, dtype: torch.dtype, kernel: str | None = None
) -> str:
    """Install `BatchAttention` in every block of a Qwen-Image transformer; returns the kernel it uses
    for padded batches. Callers then pass the text mask as `attention_kwargs={"text_mask": mask}`."""
    kernel = kernel or choose_kernel(device, dtype)
    transformer.set_attn_processor(BatchAttention(kernel))
    return kernel
