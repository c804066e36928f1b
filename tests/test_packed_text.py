"""The packed text stream (qwen_batch/families/qwen_image/packed_text.py): a padded batch's text runs through the text
stream's layers as its real tokens only, and the transformer's output is the padded path's. On the CPU
the `fa4` layout runs `prefix_attention`'s masked stand-in; tests/test_gpu_speed_paths.py runs the
real kernel."""

from __future__ import annotations

import pytest
import torch

from qwen_batch.families.qwen_image.attention import BatchAttention, use_batch_attention
from qwen_batch.families.qwen_image.packed_text import (
    FirstRowModulation,
    pack,
    pack_text,
    packed_places,
    share_timestep_modulation,
    unpack,
)
from qwen_batch.families.qwen_image.text_length import compile_once_for_every_text_length
from qwen_batch.pipeline.denoise.text import pad_embeddings

LENGTHS = (9, 4, 1)  # a prompt, a shorter one, a negative " "
PADDED = 16


def _embeddings(hidden: int, length: int | None = None) -> list[torch.Tensor]:
    """One embedding per row of LENGTHS, each that row's length or `length` tokens long."""
    generator = torch.Generator("cpu").manual_seed(0)
    return [torch.randn(length or row_length, hidden, generator=generator) for row_length in LENGTHS]


def test_each_packed_token_goes_where_the_padded_layout_has_it():
    embeddings = _embeddings(8)
    packed, mask, index = pack_text(embeddings, PADDED, torch.float32)
    assert packed.shape == (1, sum(LENGTHS), 8)
    assert mask.tolist() == [[token < length for token in range(PADDED)] for length in LENGTHS]
    padded = torch.zeros(len(LENGTHS), PADDED, 8)
    for row, embedding in enumerate(embeddings):
        padded[row, : len(embedding)] = embedding
    assert torch.equal(unpack(packed, index, len(LENGTHS), PADDED), padded)
    assert torch.equal(pack(padded, index), packed)
    with pytest.raises(ValueError, match="more than the padded length 8"):
        pack_text(embeddings, 8, torch.float32)


def _transformer(tiny_model):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    use_batch_attention(transformer, "cpu", torch.float32, kernel="fa4")
    return transformer


def _run(transformer, hidden, text, text_kwargs):
    rows = hidden.shape[0]
    with torch.inference_mode():
        return transformer(
            hidden_states=hidden,
            timestep=torch.full((rows,), 0.6),  # a batch steps in lockstep: one timestep for every row
            encoder_hidden_states=text,
            attention_kwargs=text_kwargs,
            img_shapes=[[(1, 4, 4)]] * rows,
            return_dict=False,
        )[0]


def test_the_packed_text_stream_gives_the_padded_output_from_real_tokens_only(tiny_model):
    transformer = _transformer(tiny_model)
    embeddings = _embeddings(transformer.config.joint_attention_dim)
    hidden = torch.randn(len(LENGTHS), 16, 64, generator=torch.Generator("cpu").manual_seed(1))
    text, mask = pad_embeddings(embeddings, "cpu", torch.float32)
    padded = _run(transformer, hidden, text, {"text_mask": mask})

    assert share_timestep_modulation(transformer) == len(transformer.transformer_blocks)
    packed, mask, index = pack_text(embeddings, mask.shape[1], torch.float32)
    seen = []
    transformer.transformer_blocks[0].txt_mlp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ours = _run(transformer, hidden, packed, {"text_mask": mask, "text_index": index})
    assert seen[0].shape[:2] == (1, sum(LENGTHS))  # the feed-forward saw the real tokens, no padding
    torch.testing.assert_close(ours, padded, rtol=1e-5, atol=1e-5)
    # And the index matters: the same tokens put in each other's places give something else.
    assert not torch.allclose(
        _run(transformer, hidden, packed, {"text_mask": mask, "text_index": index.flip(0)}), padded
    )


def test_a_short_packed_text_gets_filler_the_mask_hides(tiny_model):
    """Under fp8, cuBLASLt refuses the text MLP's GEMM for 1-32 tokens (H200): a packed text shorter than a
    minimum is filled up to it in the layout's padding slots, and the output stays the padded path's."""
    transformer = _transformer(tiny_model)
    embeddings = _embeddings(transformer.config.joint_attention_dim)
    hidden = torch.randn(len(LENGTHS), 16, 64, generator=torch.Generator("cpu").manual_seed(1))
    text, mask = pad_embeddings(embeddings, "cpu", torch.float32)
    padded = _run(transformer, hidden, text, {"text_mask": mask})

    share_timestep_modulation(transformer)
    packed, filled_mask, index = pack_text(embeddings, mask.shape[1], torch.float32, at_least=20)
    assert packed.shape[1] == 20 and torch.equal(filled_mask, mask)  # 14 real tokens and 6 of filler
    filler_places = index[sum(LENGTHS) :]
    assert not mask.flatten()[filler_places].any(), "filler sits in slots the mask hides"
    assert len(set(index.tolist())) == len(index), "every token has a slot of its own"
    seen = []
    transformer.transformer_blocks[0].txt_mlp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ours = _run(transformer, hidden, packed, {"text_mask": mask, "text_index": index})
    assert seen[0].shape[:2] == (1, 20)
    torch.testing.assert_close(ours, padded, rtol=1e-5, atol=1e-5)
    # Longer text keeps its length; two negative prompts of 6 tokens in a 64-token layout get 52 of filler.
    assert len(packed_places([40, 33], 64, 64)) == 73
    assert len(packed_places([6, 6], 64, 64)) == 64
    with pytest.raises(ValueError, match="no room to pad 14 packed tokens to 64"):
        packed_places(LENGTHS, PADDED, 64)


def test_the_blocks_compile_once_for_every_packed_text_length(tiny_model):
    """Each packed batch brings a new text length (the sum of its rows' real tokens), and some a new
    padded layout; a recompile stalls the GPU for 20-55 s at full size. Compiled once, every batch
    still gets the eager output."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    transformer = _transformer(tiny_model)
    share_timestep_modulation(transformer)
    eager = [_run(transformer, *batch) for batch in _packed_batches(transformer)]
    compile_once_for_every_text_length(transformer)
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    transformer.compile_repeated_blocks(fullgraph=True, backend=counter)
    for batch, expected in zip(_packed_batches(transformer), eager, strict=True):
        torch.testing.assert_close(_run(transformer, *batch), expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # one graph for the 60 blocks (here 2) and every length


def _packed_batches(transformer):
    """Three packed batches of three rows, each with its own total text length; the last one's longest
    prompt also pads the batch to another bucket."""
    hidden = torch.randn(len(LENGTHS), 16, 64, generator=torch.Generator("cpu").manual_seed(1))
    for lengths, padded in ((LENGTHS, PADDED), ((7, 3, 2), PADDED), ((20, 1, 1), 2 * PADDED)):
        embeddings = [
            embedding[:length]
            for embedding, length in zip(_embeddings(transformer.config.joint_attention_dim, 20), lengths, strict=True)
        ]
        packed, mask, index = pack_text(embeddings, padded, torch.float32)
        yield hidden, packed, {"text_mask": mask, "text_index": index}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("marked", [True, False])
def test_a_run_compiles_the_blocks_once_over_batches_of_any_text_length(
    tmp_path, tiny_model, monkeypatch, layout, marked
):
    """The engine end to end over three batches whose text lengths differ, the second padded to another
    bucket (64 -> 128 tokens): packed, as under FlashAttention-4 on the CPU, or padded with a mask, as
    under SDPA, where CFG's negatives run as a forward of their own. Compiled (Dynamo, no code generation)
    once per kind of forward; without the marking (the control case, so this test can fail) a new length
    compiles the blocks again mid-run, which at full size stalls the GPU for 18-55 s."""
    from torch._dynamo.testing import CompileCounterWithBackend

    import qwen_batch.families.qwen_image.text_length
    from qwen_batch.run.engine import RunConfig, run
    from tests.support import fa4_layout, small_row, write_manifest

    packs = fa4_layout(monkeypatch, packed=True) if layout == "packed" else []
    if not marked:
        monkeypatch.setattr(
            qwen_batch.families.qwen_image.text_length, "compile_once_for_every_text_length", lambda model: None
        )
    counter = CompileCounterWithBackend("eager")
    compile_module = torch.nn.Module.compile

    def compile_with_counter(module, *args, **kwargs):
        return compile_module(module, *args, **{**kwargs, "options": None, "backend": counter})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_counter)
    sentence = "a red fox runs through deep snow under a pale winter sun near a frozen lake"
    words = sentence.split()
    prompts = [words[: 3 + (row * 5) % 13] * (10 if row == 5 else 1) for row in range(12)]  # row 5: 70+ tokens
    manifest = write_manifest(
        tmp_path / "m.parquet", [small_row(f"r{row}", " ".join(prompt)) for row, prompt in enumerate(prompts)]
    )
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu", batch_size=4, compile="on"))
    assert summary.exit_code == 0 and summary.generated == 12
    assert len(packs) == (3 if layout == "packed" else 0)
    torch._dynamo.reset()  # the blocks' compiled code stays with this test
    kinds_of_forward = 1 if layout == "packed" else 2  # padded: the masked prompts and the unmasked negatives
    assert counter.frame_count == kinds_of_forward + (0 if marked else 1)


def test_sharing_the_timestep_modulation_changes_no_name_and_no_unpacked_output(tiny_model):
    transformer = _transformer(tiny_model)
    names = list(transformer.state_dict())
    embeddings = [embedding[:4] for embedding in _embeddings(transformer.config.joint_attention_dim)[:2]]
    hidden = torch.randn(2, 16, 64, generator=torch.Generator("cpu").manual_seed(1))
    text, mask = pad_embeddings(embeddings, "cpu", torch.float32)
    assert mask is None  # equal lengths: diffusers' unmasked path
    before = _run(transformer, hidden, text, {"text_mask": None})
    share_timestep_modulation(transformer)
    assert isinstance(transformer.transformer_blocks[0].txt_mod, FirstRowModulation)
    assert list(transformer.state_dict()) == names  # adapters and checkpoints find every weight
    torch.testing.assert_close(_run(transformer, hidden, text, {"text_mask": None}), before, rtol=1e-5, atol=1e-5)


def test_packed_text_needs_the_fa4_layout():
    with pytest.raises(ValueError, match="needs the fa4 kernel"):
        BatchAttention("sdpa")(
            None, None, None, text_mask=torch.ones(1, 1, dtype=torch.bool), text_index=torch.zeros(1)
        )
