"""The text mask through `attention_kwargs` (qwen_batch/attention.py) is diffusers' masked arithmetic,
bit for bit on the CPU, without handing the mask to the transformer (which syncs with the GPU)."""

from __future__ import annotations

import pytest
import torch

from qwen_batch.attention import BatchAttention, choose_kernel, use_batch_attention


def _transformer(tiny_model):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


def _inputs(joint_dim: int):
    generator = torch.Generator("cpu").manual_seed(0)
    hidden = torch.randn(3, 16, 64, generator=generator)
    text = torch.randn(3, 9, joint_dim, generator=generator)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    text[~mask] = 0
    return hidden, text, mask


def _run(transformer, hidden, text, **mask_argument):
    with torch.inference_mode():
        return transformer(
            hidden_states=hidden,
            timestep=torch.tensor([0.2, 0.5, 0.9]),
            encoder_hidden_states=text,
            img_shapes=[[(1, 4, 4)]] * 3,
            return_dict=False,
            **mask_argument,
        )[0]


def test_the_mask_through_attention_kwargs_gives_diffusers_masked_output_exactly(tiny_model):
    transformer = _transformer(tiny_model)
    hidden, text, mask = _inputs(transformer.config.joint_attention_dim)
    stock = _run(transformer, hidden, text, encoder_hidden_states_mask=mask)
    assert use_batch_attention(transformer, "cpu", torch.float32) == "sdpa"  # varlen is CUDA-only
    assert isinstance(transformer.transformer_blocks[0].attn.processor, BatchAttention)
    ours = _run(transformer, hidden, text, attention_kwargs={"text_mask": mask})
    assert torch.equal(ours, stock)
    # And the mask matters: without it the padded rows come out different.
    assert not torch.allclose(_run(transformer, hidden, text, attention_kwargs={"text_mask": None}), stock)


def test_an_unknown_kernel_is_refused_and_the_cpu_never_gets_varlen():
    with pytest.raises(ValueError, match="attention kernel 'flash3'"):
        BatchAttention("flash3")
    assert choose_kernel("cpu", torch.bfloat16) == "sdpa"
