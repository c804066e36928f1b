"""The text mask through `attention_kwargs` (qwen_batch/families/qwen_image/attention.py) is diffusers' masked arithmetic,
bit for bit on the CPU, without handing the mask to the transformer (which syncs with the GPU); the
`fa4` layout (each row's real tokens a prefix, attended by `prefix_attention`) gives the same images
up to rounding. Where FlashAttention-4 is absent (here) `prefix_attention` runs its masked SDPA
equivalent, so the layout, the prefix lengths and the zeroed padding are tested on any machine; the
GPU tests (tests/test_gpu_speed_paths.py) run the real kernel."""

from __future__ import annotations

import pytest
import torch

from qwen_batch.families.qwen_image.attention import (
    ATTENTION_ENV,
    BatchAttention,
    choose_kernel,
    prefix_attention,
    use_batch_attention,
)


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
    assert use_batch_attention(transformer, "cpu", torch.float32) == "sdpa"  # fa4 needs a Hopper GPU
    assert isinstance(transformer.transformer_blocks[0].attn.processor, BatchAttention)
    ours = _run(transformer, hidden, text, attention_kwargs={"text_mask": mask})
    assert torch.equal(ours, stock)
    # And the mask matters: without it the padded rows come out different.
    assert not torch.allclose(_run(transformer, hidden, text, attention_kwargs={"text_mask": None}), stock)


def test_the_fa4_layout_gives_the_masked_output_and_padding_never_leaks(tiny_model):
    transformer = _transformer(tiny_model)
    hidden, text, mask = _inputs(transformer.config.joint_attention_dim)
    stock = _run(transformer, hidden, text, encoder_hidden_states_mask=mask)
    use_batch_attention(transformer, "cpu", torch.float32, kernel="fa4")
    ours = _run(transformer, hidden, text, attention_kwargs={"text_mask": mask})
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)  # the order of the softmax terms only
    # Whatever the padded positions hold, the real tokens' output does not move.
    poisoned = torch.where(mask[..., None], text, torch.full_like(text, 1e4))
    assert torch.equal(_run(transformer, hidden, poisoned, attention_kwargs={"text_mask": mask}), ours)


def test_prefix_attention_attends_within_each_prefix_and_zeroes_the_rest():
    generator = torch.Generator("cpu").manual_seed(0)
    query, key, value = (torch.randn(3, 10, 2, 8, generator=generator) for _ in range(3))
    lengths = torch.tensor([10, 4, 1], dtype=torch.int32)
    out = prefix_attention(query, key, value, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(tensor[row : row + 1, :length].transpose(1, 2) for tensor in (query, key, value))
        ).transpose(1, 2)
        torch.testing.assert_close(out[row : row + 1, :length], alone)
        assert torch.count_nonzero(out[row, length:]) == 0


def test_kernel_choice_refuses_what_cannot_run_here(monkeypatch):
    with pytest.raises(ValueError, match="attention kernel 'flash3'"):
        BatchAttention("flash3")
    assert choose_kernel("cpu", torch.bfloat16) == "sdpa"  # auto: FlashAttention-4 needs a Hopper GPU
    monkeypatch.setenv(ATTENTION_ENV, "fa4")
    with pytest.raises(ValueError, match=r"compute capability 9\.0"):
        choose_kernel("cpu", torch.bfloat16)
    monkeypatch.setenv(ATTENTION_ENV, "flash3")
    with pytest.raises(ValueError, match="QWEN_BATCH_ATTENTION='flash3'"):
        choose_kernel("cpu", torch.bfloat16)


def test_a_broken_flash_attention_4_install_falls_back_to_sdpa_and_says_why(monkeypatch, caplog):
    """Installed but unloadable (a CUDA library missing, say): the run goes on through SDPA with a
    warning naming the error, instead of failing on its first batch."""
    import sys
    import types

    import qwen_batch.families.qwen_image.attention as attention

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libcute_dsl_runtime.so: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", Broken("flash_attn.cute.interface"))
    attention._flash_attention_4.cache_clear()
    try:
        assert attention._flash_attention_4() is None
    finally:
        attention._flash_attention_4.cache_clear()
    assert "flash-attn-4 is installed but does not load (OSError: libcute_dsl_runtime.so" in caplog.text
