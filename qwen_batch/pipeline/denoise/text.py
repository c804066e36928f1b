"""A batch's text as the transformer's forwards take it: padded with a mask, or packed, in one forward or two.

The choices here are decided once per loaded model (`TextLayout.choose`, from the attention kernel and the
memory mode) and applied per batch by the text-conditions block (`text_forwards`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.families.qwen_image.attention import FA4, SDPA
from qwen_batch.memory.device import to_device
from qwen_batch.memory.placement import FP8, Placement, fp8_compute_available, weights_stay_put

if TYPE_CHECKING:
    import torch

TEXT_BUCKET = 64  # padded text lengths are multiples of this (see pad_embeddings)
# Under fp8 matmuls the text stream is padded (and masked) to a multiple of this many tokens even when every
# row has the same length. On an H200 (torch 2.11, torchao 0.17, cuBLASLt) the fp8 GEMM of the text MLP's
# down-projection (12,288 inputs) with 6 rows failed with CUBLAS_STATUS_NOT_SUPPORTED, which stopped eager and
# compiled fp8 alike when a batch's text was short and unpadded (SDPA, CFG halves apart: the negative prompt " "
# is a few tokens); 3,072-input layers ran at every row count tried, and packed text of hundreds of tokens ran.
# At 12,288 inputs every row count from 1 to 32 failed and 64 ran (bench/kernels.py, fp8-shapes): a whole bucket,
# which padded batches already use (no new compiled shapes).
FP8_TEXT_MULTIPLE = TEXT_BUCKET
# Packed text (below) under fp8 matmuls is made at least this long, with filler in the padded layout's masked
# slots (qwen_batch.families.qwen_image.packed_text.packed_places): a step cache's sub-batch of one or two rows
# packed 6-30 tokens and stopped an fp8 run. Longer packed text keeps its length, as every fp8 benchmark ran it.
FP8_PACKED_TEXT_MINIMUM = 64
# With true CFG: "joint" runs the conditional and unconditional rows in one forward, the negatives
# padded to the prompts' length; "split" runs them as two forwards, each padded to its own length (the
# negatives, all " ", then need no mask at all). "auto" picks by the attention kernel, as measured on
# an H200 (docs/benchmarks.md): under SDPA the mask is what costs, and split is 3.2% faster per image;
# under FlashAttention-4 padding costs almost nothing, and joint's larger forward is 1.5% faster. Only
# where the weights stay put: offload streams them and fp8 storage casts them once per forward, which
# split would do twice.
CFG_LAYOUT = "auto"
# Under FlashAttention-4, a padded batch's text stream runs packed: its layers see the rows' real tokens
# only (qwen_batch.families.qwen_image.packed_text). Measured on an H200: 0.1207 -> 0.1189 s per row-forward,
# 12.27 -> 12.12 s per image (docs/benchmarks.md); its images are the padded path's (tests/test_contract.py,
# test_edit.py).
PACK_TEXT = True


@dataclass(frozen=True)
class TextLayout:
    """How a loaded model's forwards take their text."""

    pack: bool  # the text stream packed to the rows' real tokens (FlashAttention-4)
    multiple: int  # rows of one length are padded to a multiple of this too (FP8_TEXT_MULTIPLE under fp8)
    packed_minimum: int  # a packed text's fewest tokens, filler included (FP8_PACKED_TEXT_MINIMUM under fp8)
    cfg_layout: str  # "joint" or "split": true CFG's halves in one forward or two

    @classmethod
    def choose(cls, kernel: str, placement: Placement, device: str) -> TextLayout:
        """The layout for a transformer whose padded batches attend through `kernel`, placed as `placement` says."""
        fp8_matmuls = placement.mode == FP8 and fp8_compute_available(device)
        split = kernel == SDPA and weights_stay_put(placement.mode, device)
        return cls(
            pack=PACK_TEXT and kernel == FA4,
            multiple=FP8_TEXT_MULTIPLE if fp8_matmuls else 1,
            packed_minimum=FP8_PACKED_TEXT_MINIMUM if fp8_matmuls else 0,
            cfg_layout=CFG_LAYOUT if CFG_LAYOUT != "auto" else "split" if split else "joint",
        )


@dataclass(frozen=True)
class TextForward:
    """One transformer forward's rows and their text, the same at every step of a batch."""

    first: int  # its first row among the step's rows (conditional rows, then unconditional ones)
    rows: int
    text: torch.Tensor  # on the device: padded [rows, tokens, hidden] or packed [1, real tokens, hidden]
    text_kwargs: dict  # the attention's: `text_mask`, and `text_index` where packed
    # Packed: each row's real text length, for a step cache to pack a sub-batch's own. None: padded.
    lengths: list[int] | None


def text_forwards(
    texts: Sequence[torch.Tensor], batch: int, use_cfg: bool, layout: TextLayout, device: str, dtype: torch.dtype
) -> list[TextForward]:
    """The forwards of a step: `texts` are the step's rows' unpadded embeddings, [cond..., uncond...], in one
    forward padded to one length with a mask or, split, each half padded to its own length."""
    groups = [texts[:batch], texts[batch:]] if use_cfg and layout.cfg_layout == "split" else [texts]
    forwards, first = [], 0
    for group in groups:
        text, text_kwargs = text_condition(group, layout, device, dtype)
        forwards.append(TextForward(first, len(group), text, text_kwargs, packed_lengths(group, text_kwargs)))
        first += len(group)
    return forwards


def text_condition(
    embeddings: Sequence[torch.Tensor], layout: TextLayout, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, dict]:
    """One forward's text on the device, and the attention kwargs that go with it: padded with a mask
    (`text_mask`, None when no row is padded), or packed with its place in that padded layout (`text_index`,
    qwen_batch.families.qwen_image.packed_text) where the text stream runs packed."""
    from qwen_batch.families.qwen_image.packed_text import pack_text

    length = padded_length(embeddings, layout.multiple)
    if length is None or not layout.pack:
        embeds, mask = pad_embeddings(embeddings, device, dtype, layout.multiple)
        return embeds, {"text_mask": mask}
    packed, mask, index = pack_text(embeddings, length, dtype, layout.packed_minimum)
    text_kwargs = {"text_mask": to_device(mask, device), "text_index": to_device(index, device)}
    return to_device(packed, device), text_kwargs


def packed_lengths(embeddings: Sequence[torch.Tensor], text_kwargs: dict) -> list[int] | None:
    """A packed forward's rows' real text lengths (a step cache packs a sub-batch's own text from them)."""
    return [embedding.shape[0] for embedding in embeddings] if text_kwargs.get("text_index") is not None else None


def pad_embeddings(
    embeddings: Sequence[torch.Tensor], device: str, dtype: torch.dtype, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack `[tokens, hidden]` embeddings into `[rows, max_tokens, hidden]` plus a mask.

    The mask is None when no row is padded: the pipeline passes None in that case too, and it lets
    the attention take its fastest path. When rows are padded anyway, the padding goes up to a multiple
    of TEXT_BUCKET tokens: masked keys get zero attention weight, so the images are the same, and a
    compiled transformer meets a few text lengths instead of one per batch (no recompiles). `multiple`:
    rows of one length are padded too, to a multiple of it (FP8_TEXT_MULTIPLE).
    """
    import torch

    longest = padded_length(embeddings, multiple) or embeddings[0].shape[0]
    hidden = embeddings[0].shape[1]
    stacked = torch.zeros(len(embeddings), longest, hidden, dtype=dtype)  # built on the host, sent once
    mask = torch.zeros(len(embeddings), longest, dtype=torch.bool)
    for row, embedding in enumerate(embeddings):
        stacked[row, : embedding.shape[0]] = embedding.to(device="cpu", dtype=dtype)
        mask[row, : embedding.shape[0]] = True
    if all(embedding.shape[0] == longest for embedding in embeddings):
        return to_device(stacked, device), None
    return to_device(stacked, device), to_device(mask, device)


def padded_length(embeddings: Sequence[torch.Tensor], multiple: int = 1) -> int | None:
    """The batch's padded text length (the longest, rounded up to TEXT_BUCKET), or None when every row
    has the same length, a multiple of `multiple`, and nothing is padded."""
    lengths = {embedding.shape[0] for embedding in embeddings}
    if len(lengths) == 1:
        (length,) = lengths
        return None if length % multiple == 0 else -(-length // multiple) * multiple
    return -(-max(lengths) // TEXT_BUCKET) * TEXT_BUCKET
