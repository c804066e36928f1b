"""RoPE in real arithmetic (qwen_batch/families/qwen_image/rotary.py): diffusers' complex result bit for bit, and no complex
arithmetic left in the compiled blocks, where Inductor cannot generate code for it and runs it as
eager kernels (about 3% of a full-size forward on an H200)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

import qwen_batch.families.qwen_image.attention as attention
from qwen_batch.families.qwen_image.rotary import apply_rotary
from tests.test_packed_text import _embeddings, _run, _transformer


def _rotary_inputs(dtype: torch.dtype, scale: float):
    generator = torch.Generator("cpu").manual_seed(int(scale * 1000))
    x = (torch.randn(3, 37, 4, 128, generator=generator) * scale).to(dtype)
    angles = torch.randn(37, 64, generator=generator) * 50
    return x, torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_real_rotary_is_diffusers_complex_rotary_bit_for_bit(dtype, scale):
    x, freqs = _rotary_inputs(dtype, scale)
    expected = apply_rotary_emb_qwen(x, freqs, use_real=False)
    assert expected.dtype == dtype
    assert torch.equal(apply_rotary(x, freqs), expected)
    assert torch.equal(apply_rotary(x, torch.view_as_real(freqs)), expected)  # the real view, as the blocks pass
    assert torch.equal(torch.compile(apply_rotary, fullgraph=True)(x, freqs), expected)
    assert not torch.equal(apply_rotary(x, freqs.conj().resolve_conj()), expected)  # the sign of the sine matters


def _complex_values_in_compiled_blocks(transformer, *batch) -> list[str]:
    """The compiled blocks' graph nodes (Dynamo's, before any code generation) that compute a complex
    tensor; the rotary frequencies' own inputs are allowed."""
    import torch._dynamo

    found = []

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            value = node.meta.get("example_value")
            if node.op != "placeholder" and isinstance(value, torch.Tensor) and value.is_complex():
                found.append(str(node.target))
        return graph_module.forward

    torch._dynamo.reset()
    transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    _run(transformer, *batch)
    torch._dynamo.reset()
    return found


@pytest.mark.parametrize("packed", [False, True], ids=["sdpa-padded", "fa4-packed"])
def test_the_compiled_blocks_compute_no_complex_tensor(tiny_model, monkeypatch, packed):
    from qwen_batch.families.qwen_image.attention import use_batch_attention
    from qwen_batch.families.qwen_image.packed_text import pack_text, share_timestep_modulation
    from qwen_batch.pipeline.denoise.text import pad_embeddings

    def model_and_batch():
        transformer = _transformer(tiny_model)  # fa4 layout
        embeddings = _embeddings(transformer.config.joint_attention_dim)
        hidden = torch.randn(len(embeddings), 16, 64, generator=torch.Generator("cpu").manual_seed(1))
        if not packed:
            use_batch_attention(transformer, "cpu", torch.float32, kernel="sdpa")
            text, mask = pad_embeddings(embeddings, "cpu", torch.float32)
            return transformer, hidden, text, {"text_mask": mask}
        share_timestep_modulation(transformer)
        text, mask, index = pack_text(embeddings, 16, torch.float32)
        return transformer, hidden, text, {"text_mask": mask, "text_index": index}

    assert _complex_values_in_compiled_blocks(*model_and_batch()) == []
    # And the check sees what diffusers' complex multiply leaves there.
    monkeypatch.setattr(attention, "REAL_ROTARY", False)
    assert "<built-in function mul>" in _complex_values_in_compiled_blocks(*model_and_batch())
