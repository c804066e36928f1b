"""A batch's text stream packed: only the rows' real tokens go through the text stream's layers.

A batch pads its prompts to one length (`denoise.text.pad_embeddings`), and with true CFG the short
negative prompts pad the most: in the H200 benchmark's batches about four fifths of the text slots are
padding. FlashAttention-4 skips them in attention (qwen_batch.families.qwen_image.attention), but the text stream's own
layers would still run on every slot, at an image token's cost: its q/k/v and output projections, its
feed-forward, norms and modulation. Packed, the batch's text is one sequence `[1, real tokens,
hidden]`, and `text_index` gives each token's place in the padded `[rows, text tokens]` layout that
the joint attention still uses: the attention scatters the text into it and gathers the result back.

Outside attention, one thing in a block depends on the row: the text's modulation, computed from each
row's timestep embedding. Every row of a batch is at the same timestep (the engine steps a batch in
lockstep), so the first row's serves all; `share_timestep_modulation` makes the blocks' `txt_mod` use
it, which also leaves unpacked batches as they were. A packed batch's text length changes from batch
to batch, so the compiled blocks take it as symbolic from the start (`text_length.compile_once_for_every_text_length`)
instead of recompiling while the GPU waits. The images are the padded path's up to the
rounding of GEMMs over fewer rows (`tests/test_packed_text.py`; end to end for text to image, edits
and adapters in `tests/test_contract.py`, `test_edit.py`, `test_adapters.py`; on the GPU with the real
kernel in `tests/test_gpu_speed_paths.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def pack_text(
    embeddings: Sequence[torch.Tensor], padded_length: int, dtype: torch.dtype, at_least: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i's `[tokens_i, hidden]` embeddings as one `[1, sum of tokens_i (+ filler), hidden]` sequence on
    the host, with the mask of the padded layout (`[rows, padded_length]`, each row's tokens first) and
    `text_index`: each packed token's flat position `row * padded_length + token` in that layout. Zero
    filler tokens make the sequence `at_least` tokens long (`packed_places`)."""
    lengths = [embedding.shape[0] for embedding in embeddings]
    places = packed_places(lengths, padded_length, at_least)
    filler = torch.zeros(len(places) - sum(lengths), embeddings[0].shape[-1], dtype=dtype)
    packed = torch.cat([*(embedding.to(device="cpu", dtype=dtype) for embedding in embeddings), filler])[None]
    mask = torch.arange(padded_length)[None, :] < torch.tensor(lengths)[:, None]
    return packed, mask, torch.tensor(places, dtype=torch.long)


def packed_places(lengths: Sequence[int], padded_length: int, at_least: int = 0) -> list[int]:
    """Where a packed sequence's tokens go in the padded `[rows, padded_length]` layout: each row's real
    tokens, rows one after another, then, when they are fewer than `at_least`, filler tokens up to it,
    placed in padding slots (the mask hides them from attention and nothing reads their outputs back).

    Why filler: under fp8 matmuls cuBLASLt refuses the text MLP's 12,288-input GEMM for 1 to 32 tokens on an
    H200 (qwen_batch.pipeline.denoise.text.FP8_PACKED_TEXT_MINIMUM), and a packed sequence is as short as its rows'
    real tokens: a step cache's sub-batch of one or two rows (a negative prompt " " is 6 tokens)
    stopped an fp8 run, and so would a batch of one short prompt without true CFG. Longer sequences keep
    their length: packed text of hundreds of tokens, of any count, ran in every fp8 benchmark."""
    if max(lengths) > padded_length:
        raise ValueError(f"a row has {max(lengths)} text tokens, more than the padded length {padded_length}")
    places = [row * padded_length + token for row, length in enumerate(lengths) for token in range(length)]
    filler = max(at_least - len(places), 0)
    free = (row * padded_length + token for row, length in enumerate(lengths) for token in range(length, padded_length))
    places += itertools.islice(free, filler)
    if len(places) < at_least:
        raise ValueError(
            f"a padded layout of {len(lengths)} x {padded_length} has no room to pad {sum(lengths)} "
            f"packed tokens to {at_least}"
        )
    return places


def unpack(packed: torch.Tensor, text_index: torch.Tensor, rows: int, padded_length: int) -> torch.Tensor:
    """`[1, tokens, ...]` packed -> `[rows, padded_length, ...]`, zeros in the padding."""
    flat = packed.new_zeros(rows * padded_length, *packed.shape[2:]).index_copy(0, text_index, packed[0])
    return flat.unflatten(0, (rows, padded_length))


def pack(padded: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    """`[rows, padded_length, ...]` -> `[1, tokens, ...]`: the real tokens, in row order."""
    return padded.flatten(0, 1).index_select(0, text_index)[None]


def packed_positions(text_index: torch.Tensor, padded_length: int) -> torch.Tensor:
    """Each packed token's position within its own row (for the text's rotary embedding)."""
    return text_index % padded_length


class FirstRowModulation(torch.nn.Sequential):
    """A block's `txt_mod` (SiLU, Linear) fed the first row's timestep embedding only, so its
    `[1, 6 * dim]` shift, scale and gate broadcast over packed text as over padded rows. Valid because
    every row of a batch is at the same timestep. A class swap: the module tree, its parameter names
    (which adapters target) and weights stay as they are."""

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return super().forward(temb[:1])


def share_timestep_modulation(transformer: torch.nn.Module) -> int:
    """Make every block's `txt_mod` a `FirstRowModulation`; returns how many. Before compiling."""
    blocks = [block for block in transformer.transformer_blocks if type(block.txt_mod) is torch.nn.Sequential]
    for block in blocks:
        block.txt_mod.__class__ = FirstRowModulation
    return len(blocks)
