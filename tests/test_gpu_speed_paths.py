"""On a CUDA GPU (`pytest -m gpu`): the fast paths of stage 2 keep the arithmetic and never wait.

- Batch attention (qwen_batch/families/qwen_image/attention.py) takes the text mask past the transformer; its `fa4`
  kernel replaces the mask with FlashAttention-4 over each row's prefix of real tokens: each kernel's
  output must be as close to an fp32 masked reference as diffusers' own bf16 masked path is, eagerly
  and compiled, and a row must come out the same padded or alone. (fa4 tests skip where
  `flash-attn-4` is not installed.)
- RoPE in real arithmetic (qwen_batch/families/qwen_image/rotary.py), which Inductor fuses, is diffusers' complex RoPE
  within one bf16 rounding step.
- The feed-forwards' GELU in cuBLASLt's GEMM epilogue (qwen_batch/families/qwen_image/gelu_epilogue.py) is as close to
  fp32 as diffusers' separate GELU is, and survives regional compilation.
- `ImageGenerator.generate` must not make the host wait for the GPU anywhere (inputs from pinned
  memory, schedule on the host, images copied back behind the next batch): checked with
  `torch.cuda.set_sync_debug_mode("error")`, which raises at any synchronizing CUDA call.
"""

from __future__ import annotations

import pytest
import torch

from qwen_batch.families.qwen_image.attention import (
    KERNELS,
    BatchAttention,
    _flash_attention_4,
    prefix_attention,
    use_batch_attention,
)

pytestmark = pytest.mark.gpu


def _kernels():
    for kernel in KERNELS:
        installed = kernel != "fa4" or _flash_attention_4() is not None
        yield pytest.param(kernel, marks=pytest.mark.skipif(not installed, reason="flash-attn-4 is not installed"))


ROWS, IMAGE_GRID, TEXT = 4, (1, 16, 16), 64
TEXT_LENGTHS = (64, 40, 7, 1)  # the last rows: a short prompt, the negative " "


def _transformer(dtype: torch.dtype):
    """Two blocks of the released geometry per head (head dim 128, RoPE axes 16/56/56), few heads."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=256,
        axes_dims_rope=(16, 56, 56),
    )
    return model.to("cuda", dtype).eval()


def _inputs(dtype: torch.dtype):
    generator = torch.Generator("cpu").manual_seed(1)
    tokens = IMAGE_GRID[1] * IMAGE_GRID[2]
    hidden = torch.randn(ROWS, tokens, 64, generator=generator)
    text = torch.randn(ROWS, TEXT, 256, generator=generator)
    mask = torch.zeros(ROWS, TEXT, dtype=torch.long)
    for row, length in enumerate(TEXT_LENGTHS):
        mask[row, :length] = 1
        text[row, length:] = 0  # as the engine pads
    timestep = torch.linspace(0.2, 0.9, ROWS)
    return [tensor.to("cuda") for tensor in (hidden.to(dtype), text.to(dtype), mask, timestep.to(dtype))]


def _forward(model, hidden, text, mask, timestep):
    """Through the transformer's own mask argument (stock processor) or, with `BatchAttention`
    installed, through `attention_kwargs` as the engine passes it."""
    batch_attention = isinstance(model.transformer_blocks[0].attn.processor, BatchAttention)
    with torch.inference_mode():
        return model(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None if batch_attention else mask,
            attention_kwargs={"text_mask": None if mask is None else mask.bool()} if batch_attention else None,
            img_shapes=[[IMAGE_GRID]] * hidden.shape[0],
            return_dict=False,
        )[0].float()


def _error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("kernel", list(_kernels()))
def test_batch_attention_is_as_close_to_fp32_as_the_masked_bf16_path(kernel):
    reference = _forward(_transformer(torch.float32), *_inputs(torch.float32))
    stock = _forward(_transformer(torch.bfloat16), *_inputs(torch.bfloat16))

    model = _transformer(torch.bfloat16)
    assert use_batch_attention(model, "cuda", torch.bfloat16, kernel) == kernel
    ours = _forward(model, *_inputs(torch.bfloat16))

    stock_error, our_error = _error(stock, reference), _error(ours, reference)
    print(f"relative error vs fp32 masked: stock bf16 {stock_error:.2e}, {kernel} bf16 {our_error:.2e}")
    assert 0 < stock_error < 0.02
    assert our_error <= 1.5 * stock_error + 1e-4

    # A padding token must not leak into a real one: with every padded text embedding set to 50, the
    # image tokens' output does not move at all.
    hidden, text, mask, timestep = _inputs(torch.bfloat16)
    text = torch.where(mask[..., None].bool(), text, torch.full_like(text, 50.0))
    assert torch.equal(_forward(model, hidden, text, mask, timestep), ours)


@pytest.mark.parametrize("kernel", list(_kernels()))
def test_a_row_comes_out_the_same_padded_in_a_batch_or_alone(kernel):
    model = _transformer(torch.bfloat16)
    use_batch_attention(model, "cuda", torch.bfloat16, kernel)
    hidden, text, mask, timestep = _inputs(torch.bfloat16)
    batched = _forward(model, hidden, text, mask, timestep)
    reference = _forward(_transformer(torch.float32), *_inputs(torch.float32))
    for row, length in enumerate(TEXT_LENGTHS):
        alone = _forward(model, hidden[row : row + 1], text[row : row + 1, :length], None, timestep[row : row + 1])
        # Alone, nothing is padded: diffusers' own unmasked path. The two differ by rounding only.
        assert _error(batched[row : row + 1], alone) <= 2 * _error(alone, reference[row : row + 1]) + 1e-3, row


@pytest.mark.parametrize("kernel", list(_kernels()))
def test_batch_attention_compiles_into_the_regional_graph(kernel):
    model = _transformer(torch.bfloat16)
    use_batch_attention(model, "cuda", torch.bfloat16, kernel)
    eager = _forward(model, *_inputs(torch.bfloat16))
    model.compile_repeated_blocks(fullgraph=True)  # fullgraph: a graph break here would raise
    compiled = _forward(model, *_inputs(torch.bfloat16))
    assert _error(compiled, eager) < 5e-3


@pytest.mark.skipif(_flash_attention_4() is None, reason="flash-attn-4 is not installed")
def test_flash_attention_4_attends_within_each_prefix_at_the_models_geometry():
    """Qwen-Image's heads (24 x 128), 4096 image tokens and text of different lengths: FlashAttention-4
    against the masked SDPA it replaces, in fp32, and zeros past every prefix (the output buffer is
    zeroed past the image tokens only: memory left full of NaN by a freed tensor must not show)."""
    generator = torch.Generator("cuda").manual_seed(0)
    rows, tokens = 4, 4096 + 128
    query, key, value = (
        torch.randn(rows, tokens, 24, 128, device="cuda", generator=generator).to(torch.bfloat16) for _ in range(3)
    )
    lengths = torch.tensor([4096 + 128, 4096 + 77, 4096 + 5, 4096 + 1], dtype=torch.int32, device="cuda")
    poison = torch.full_like(query, float("nan"))
    del poison  # the caching allocator hands this block to the output next
    out = prefix_attention(query, key, value, lengths, 4096).float()
    positions = torch.arange(tokens, device="cuda")
    inside = positions[None, :] < lengths[:, None]
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(tensor.float().transpose(1, 2) for tensor in (query, key, value)), attn_mask=inside[:, None, None, :]
    ).transpose(1, 2)
    for row, length in enumerate(lengths.tolist()):
        assert _error(out[row, :length], reference[row, :length]) < 1e-2, row
        assert torch.count_nonzero(out[row, length:]) == 0, row


@pytest.mark.skipif(_flash_attention_4() is None, reason="flash-attn-4 is not installed")
def test_the_packed_text_stream_gives_the_padded_output_eager_and_compiled():
    """FlashAttention-4 with the text stream packed (qwen_batch.families.qwen_image.packed_text) against the same kernel on
    padded text, in bf16, eagerly and compiled; then a batch of other text lengths, which the compiled
    blocks meet with a new packed length and must not recompile for (the engine's marking)."""
    import torch._dynamo

    from qwen_batch.families.qwen_image.packed_text import pack_text, share_timestep_modulation
    from qwen_batch.families.qwen_image.text_length import compile_once_for_every_text_length

    hidden, text, _, _ = _inputs(torch.bfloat16)
    timestep = torch.full((ROWS,), 0.6, device="cuda", dtype=torch.bfloat16)  # a batch shares its timestep

    def packed_inputs(lengths):
        embeddings = [text[row, :length].cpu() for row, length in enumerate(lengths)]
        packed, packed_mask, index = pack_text(embeddings, TEXT, torch.bfloat16)
        return packed.cuda(), packed_mask.cuda(), index.cuda()

    def run(model, encoder_hidden_states, text_kwargs):
        with torch.inference_mode():
            return model(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                attention_kwargs=text_kwargs,
                img_shapes=[[IMAGE_GRID]] * ROWS,
                return_dict=False,
            )[0].float()

    padded_model = _transformer(torch.bfloat16)
    use_batch_attention(padded_model, "cuda", torch.bfloat16, kernel="fa4")
    model = _transformer(torch.bfloat16)
    use_batch_attention(model, "cuda", torch.bfloat16, kernel="fa4")
    share_timestep_modulation(model)
    compile_once_for_every_text_length(model)
    for step, lengths in enumerate((TEXT_LENGTHS, TEXT_LENGTHS, (33, 64, 2, 1))):
        if step == 1:
            model.compile_repeated_blocks(fullgraph=True)  # fullgraph: a graph break here would raise
        row_mask = torch.arange(TEXT, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
        padded_text = text * row_mask[..., None]
        expected = run(padded_model, padded_text, {"text_mask": row_mask})
        packed, packed_mask, index = packed_inputs(lengths)
        with torch._dynamo.config.patch(error_on_recompile=step == 2):
            output = run(model, packed, {"text_mask": packed_mask, "text_index": index})
        assert _error(output, expected) < 5e-3, (step, lengths)


@pytest.mark.parametrize("kernel", list(_kernels()))
def test_fp8_keeps_a_padded_batch_finite_and_near_bf16(kernel):
    """torchao fp8 with dynamic per-row scales on a padded batch. Under fa4 a padding token's attention
    output is exactly zero, and a zero row must not get scale 0 (0/0 = NaN, which the next layer's
    keys and values then carry to every token): measured on an H200, the images came out flat."""
    from qwen_batch.memory.placement import Placement, fp8_compute_available, place_transformer

    if not fp8_compute_available("cuda"):
        pytest.skip("fp8 matmuls need compute capability 8.9+ and torchao")
    reference = _transformer(torch.bfloat16)
    use_batch_attention(reference, "cuda", torch.bfloat16, kernel=kernel)
    expected = _forward(reference, *_inputs(torch.bfloat16))
    model = _transformer(torch.bfloat16)
    place_transformer(model, Placement("fp8"), "cuda", torch.bfloat16)  # torchao fp8, block by block
    use_batch_attention(model, "cuda", torch.bfloat16, kernel=kernel)
    for compiled in (False, True):
        if compiled:
            model.compile_repeated_blocks(fullgraph=True)
        output = _forward(model, *_inputs(torch.bfloat16))
        assert torch.isfinite(output).all(), f"compiled={compiled}"
        assert _error(output, expected) < 0.25, f"compiled={compiled}"  # fp8 rounding, not garbage (~1)


def test_fp8_runs_packed_text_of_a_few_tokens_at_the_released_width():
    """cuBLASLt (H200, torch 2.11, torchao 0.17) refuses the fp8 GEMM of the text MLP's 12,288-input
    down-projection for 1-32 tokens. Packed text is as short as its rows' real tokens: a step cache's sub-batch
    of one row stopped the fp8 step-cache benchmark (session 11), as would a batch of one short prompt. Both
    get filler up to fp8's minimum (qwen_batch.families.qwen_image.packed_text.packed_places), at the released width (3,072
    hidden, 12,288 in the feed-forward), two blocks, eagerly; the sub-batch's row must come out as it does in a
    forward of its own."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_batch.families.qwen_image.packed_text import pack_text, share_timestep_modulation
    from qwen_batch.memory.placement import Placement, fp8_compute_available, place_transformer
    from qwen_batch.pipeline.denoise.blocks import transformer_call
    from qwen_batch.pipeline.denoise.text import FP8_PACKED_TEXT_MINIMUM
    from qwen_batch.pipeline.step_cache import FirstBlock, Forward
    from qwen_batch.pipeline.step_cache.first_block import FirstBlockRows

    if not fp8_compute_available("cuda") or _flash_attention_4() is None:
        pytest.skip("needs fp8 matmuls (compute capability 8.9+, torchao) and flash-attn-4 (packed text)")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = QwenImageTransformer2DModel(num_layers=2, joint_attention_dim=512).to(torch.bfloat16).eval()
    place_transformer(model, Placement("fp8"), "cuda", torch.bfloat16)
    assert use_batch_attention(model, "cuda", torch.bfloat16) == "fa4"
    share_timestep_modulation(model)
    generator = torch.Generator("cpu").manual_seed(2)
    lengths = (24, 57, 6, 6)  # two prompts and their negatives " ", as the benchmark's CFG rows
    texts = [torch.randn(length, 512, generator=generator) for length in lengths]
    hidden = torch.randn(len(lengths), 256, 64, generator=generator).to("cuda", torch.bfloat16)
    timestep = torch.full((len(lengths),), 0.6, device="cuda", dtype=torch.bfloat16)

    def forward(rows: list[int]) -> Forward:
        packed, mask, index = pack_text([texts[row] for row in rows], TEXT, torch.bfloat16, FP8_PACKED_TEXT_MINIMUM)
        kwargs = {"text_mask": mask.cuda(), "text_index": index.cuda()}
        call = transformer_call(model, hidden[rows], timestep[rows], packed.cuda(), kwargs, [[IMAGE_GRID]] * len(rows))
        return Forward(0, len(rows), call, None, [lengths[row] for row in rows], FP8_PACKED_TEXT_MINIMUM)

    with torch.inference_mode():
        alone = forward([2]).call().float()  # one row of 6 tokens: 58 of filler
        assert torch.isfinite(alone).all()
        # Step 0 computes every row; at step 1 only row 2 does, as a sub-batch of one row.
        cache = FirstBlockRows(
            FirstBlock(0.1),
            model,
            len(lengths),
            forced=lambda step, first, rows: [True] * rows if step == 0 else [row == 2 for row in range(rows)],
        )
        whole = forward([0, 1, 2, 3])
        cache.run(0, [whole])
        output = cache.run(1, [whole])[0].float()
    assert cache.computed == [1, 1, 2, 1]
    assert torch.isfinite(output).all()
    assert _error(output[2], alone[0]) < 0.02  # fp8's per-token scales: the same row, other batch-mates


def test_the_gelu_epilogue_is_as_close_to_fp32_as_diffusers_gelu_and_compiles():
    from qwen_batch.families.qwen_image.gelu_epilogue import GeluEpilogue, fuse_gelu_epilogues

    reference = _forward(_transformer(torch.float32), *_inputs(torch.float32))
    stock = _forward(_transformer(torch.bfloat16), *_inputs(torch.bfloat16))
    model = _transformer(torch.bfloat16)
    assert fuse_gelu_epilogues(model) == 2 * len(model.transformer_blocks)  # img_mlp and txt_mlp
    assert isinstance(model.transformer_blocks[0].img_mlp.net[0], GeluEpilogue)
    assert "transformer_blocks.0.img_mlp.net.0.proj.weight" in model.state_dict()  # adapters find it
    fused = _forward(model, *_inputs(torch.bfloat16))
    stock_error, fused_error = _error(stock, reference), _error(fused, reference)
    print(f"relative error vs fp32: diffusers GELU {stock_error:.2e}, epilogue {fused_error:.2e}")
    assert not torch.equal(fused, stock)  # the epilogue ran (it rounds once, not twice)
    assert fused_error <= 1.5 * stock_error + 1e-4
    model.compile_repeated_blocks(fullgraph=True)
    assert _error(_forward(model, *_inputs(torch.bfloat16)), fused) < 5e-3


def test_real_rotary_is_diffusers_complex_rotary_on_the_gpu_eager_and_compiled():
    """On the CPU the two agree bit for bit (tests/test_rotary.py). On CUDA the complex multiply and
    Inductor's kernel round their fp32 products differently (fused multiply-adds): about 2 in 100,000
    outputs come out one bf16 step apart, or, where `a cos - b sin` nearly cancels, by the fp32 rounding
    of its terms (under 1e-5 at these magnitudes)."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    from qwen_batch.families.qwen_image.rotary import apply_rotary

    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(8, 4096, 24, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    angles = torch.rand(4096, 64, device="cuda", generator=generator) * 4096
    freqs = torch.polar(torch.ones_like(angles), angles)
    expected = apply_rotary_emb_qwen(x, freqs, use_real=False)
    for ours in (apply_rotary(x, freqs), torch.compile(apply_rotary, fullgraph=True)(x, freqs)):
        torch.testing.assert_close(ours, expected, rtol=2**-7, atol=1e-5)  # bf16 keeps 8 significant bits
        assert (ours == expected).float().mean() > 0.999


def test_generating_a_batch_never_makes_the_host_wait_for_the_gpu(tiny_model):
    """From the first input copy to the decoded pixels' copy home, nothing in `generate` synchronizes:
    the host queues a whole batch (and then the next one) while the GPU works."""
    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.denoise import ImageGenerator
    from qwen_batch.weights.model_source import resolve_model

    generator = ImageGenerator(resolve_model("tiny"), "cuda", torch.bfloat16)
    hidden = generator.pipe.transformer.config.joint_attention_dim
    requests = [
        Request(
            n, f"r{n}", f"prompt {n}", " ", width=256, height=256, seed=n, num_inference_steps=3, true_cfg_scale=4.0
        )
        for n in range(2)
    ]
    prompts = [torch.randn(12, hidden), torch.randn(30, hidden)]  # different lengths: padded, packed
    negatives = [torch.randn(3, hidden), torch.randn(3, hidden)]
    list(generator.generate(requests, prompts, negatives))  # warm-up: RoPE tables, cuBLAS handles
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        images = generator.generate(requests, prompts, negatives)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    pictures = list(images)
    assert [picture.size for picture in pictures] == [(256, 256), (256, 256)]
    generator.close()
