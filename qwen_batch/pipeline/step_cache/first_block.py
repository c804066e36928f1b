"""FirstBlockCache per row: the first block runs for every row; each row then runs the other blocks or reuses them.

diffusers' `FirstBlockCacheConfig(threshold=T)` (hooks/first_block_cache.py), with the batch-wide decision made
row by row. For one row (one pass: conditional and unconditional passes are rows of their own, as diffusers'
"cond" and "uncond" cache contexts), at each step:

1. block 0 runs; its image-stream residual `r = block0(h) - h` is compared with the residual `p` of the row's
   last *full* step: `mean|r - p| / mean|p|`, means over that row's tokens and channels (diffusers: over the
   whole batch, then `.item()`), in the model's dtype, the ratio compared with T in float64 as Python compares
   `.item()`; the first step has no `p` and computes, as does every step before the spec's `warmup` (cache-dit's
   warm-up steps; diffusers has none, and the default, 0, is diffusers');
2. above T, the row computes: the other blocks run (ControlNet samples added after each block, as the
   transformer's loop does), `p` becomes `r`, and the tail residual `t = (last block's output) - block0(h)` is
   kept; at or below T, its image stream becomes `block0(h) + t` (and `p` stays), then every block's ControlNet
   sample is added, as diffusers' skipped blocks pass their input through the transformer's loop.

The transformer's text stream is not kept: after the blocks the transformer reads the image stream only.

The rows that compute are gathered into a sub-batch that runs blocks 1..N-1; the others take their reused
output. One device-to-host copy per forward (the `[rows]` decisions, to choose the sub-batch), none on the first
step. The sub-batch is padded, with rows that reuse (their results thrown away), to the next power of two or the
forward's whole rows: compiled blocks see a few batch sizes, each compiled once (marked static), instead of
one per count of computing rows, and the batches without a step cache keep their own compiled graph. A packed
text stream (qwen_batch.families.qwen_image.packed_text) is packed again for the sub-batch's rows.

The forward runs through the transformer's own `forward` (its embeddings, hooks, offloading, packed-text
marks), with its blocks replaced for that call by `SplitBlocks`, which calls the real blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from qwen_batch.families.qwen_image.packed_text import packed_places
from qwen_batch.memory.device import to_device
from qwen_batch.pipeline.step_cache import Forward, per_image
from qwen_batch.pipeline.step_cache.spec import FirstBlock

# A benchmark hook: (step, the forward's first row, its rows) -> whether each of those rows computes, instead of
# the residual test's answer (the test still runs and still costs its one copy per forward). Random weights'
# residuals say nothing about how often a real model's stay under a threshold, so bench/step_cache.py forces
# the fraction of computed steps. Step 0 computes whatever it says: there is nothing to reuse yet.
Forced = Callable[[int, int, int], Sequence[bool]]
FORCED: Forced | None = None  # never set outside benchmarks


def sub_batch_size(computing: int, rows: int) -> int:
    """The sub-batch `computing` rows run in: the next power of two, at most the forward's `rows`."""
    return min(1 << max(computing - 1, 0).bit_length(), rows)


class _PassRows:
    """One forward's rows: the residual of each row's last full step and its tail residual."""

    def __init__(self):
        self.head: torch.Tensor | None = None  # [rows, image tokens, dim]
        self.tail: torch.Tensor | None = None


class FirstBlockRows:
    """A batch's FirstBlockCache, row by row (see the module's docstring)."""

    def __init__(self, spec: FirstBlock, transformer: torch.nn.Module, rows: int, forced: Forced | None = None):
        if len(transformer.transformer_blocks) < 2:
            raise ValueError("first-block caching needs a transformer of 2 or more blocks")
        self.threshold, self.warmup, self.transformer = spec.threshold, spec.warmup, transformer
        self.forced = forced if forced is not None else FORCED
        self.computed = [0] * rows  # full steps per step row
        self._passes: dict[int, _PassRows] = {}

    def wants_controls(self, step: int) -> bool:
        return True  # reused rows add every block's ControlNet sample too

    def run(self, step: int, forwards: Sequence[Forward]) -> list[torch.Tensor]:
        outputs = []
        for forward in forwards:
            rows = self._passes.setdefault(forward.first, _PassRows())
            split = SplitBlocks(self, rows, forward, step)
            with _blocks_replaced(self.transformer, split):
                outputs.append(forward.call())
        return outputs

    def steps_computed(self, batch: int) -> list[tuple[int, int | None]]:
        return per_image(self.computed, batch)

    def decide(self, rows: _PassRows, residual: torch.Tensor, forward: Forward, step: int) -> list[bool]:
        """Which of the forward's rows compute; remembers the residual of those that do."""
        if rows.head is None or step < self.warmup:  # nothing to compare with yet, or warming up: every row computes
            decisions = [True] * forward.rows
            rows.head = residual
        else:
            previous = rows.head
            change = (residual - previous).abs().mean(dim=(1, 2)) / previous.abs().mean(dim=(1, 2))
            computes = change.to(torch.float64) > self.threshold
            decisions = computes.tolist()  # the one device-to-host copy of the forward
            if self.forced is not None:
                decisions = [bool(value) for value in self.forced(step, forward.first, forward.rows)]
                computes = _on_device(decisions, residual.device, torch.bool)
            rows.head = torch.where(computes[:, None, None], residual, previous)
        for row, computes_row in enumerate(decisions):
            self.computed[forward.first + row] += bool(computes_row)
        return decisions


class SplitBlocks(torch.nn.Module):
    """Stands in for the transformer's `transformer_blocks` during one forward: the transformer calls it once
    as its only block, with a block's arguments, and it runs the real blocks row by row."""

    def __init__(self, cache: FirstBlockRows, rows: _PassRows, forward: Forward, step: int):
        super().__init__()
        # Plain attributes, not submodules: the blocks stay where they are in the module tree.
        self.__dict__.update(blocks=list(cache.transformer.transformer_blocks), cache=cache, rows=rows)
        self.__dict__.update(forward_info=forward, step=step)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
        modulate_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, forward = self.blocks, self.forward_info
        arguments = {
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
            "temb": temb,
            "image_rotary_emb": image_rotary_emb,
            "joint_attention_kwargs": joint_attention_kwargs,
            "modulate_index": modulate_index,
        }
        text0, image0 = blocks[0](hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **arguments)
        decisions = self.cache.decide(self.rows, image0 - hidden_states, forward, self.step)
        samples = forward.controls
        every = math.ceil(len(blocks) / len(samples)) if samples else 0
        computing = [row for row, computes in enumerate(decisions) if computes]
        computed = None
        if computing:
            size = sub_batch_size(len(computing), forward.rows)
            reusing = [row for row, computes in enumerate(decisions) if not computes]
            chosen = list(range(forward.rows)) if size == forward.rows else computing + reusing[: size - len(computing)]
            gather = _SubBatch(chosen, forward, image0.device, joint_attention_kwargs)
            image = image0 + samples[0] if samples else image0
            image, text = gather.rows(image), gather.text(text0)
            sub_arguments = gather.arguments(arguments)
            sub_samples = [gather.rows(sample) for sample in samples] if samples else None
            for index in range(1, len(blocks)):
                text, image = blocks[index](hidden_states=image, encoder_hidden_states=text, **sub_arguments)
                if index == len(blocks) - 1:
                    last = image
                if sub_samples:
                    image = image + sub_samples[index // every]
            # Rows of the sub-batch that compute: all of it when every row computes, else their places in it.
            places = computing if size == forward.rows else list(range(len(computing)))
            if len(computing) == forward.rows:
                self.rows.tail = last - image0
                return text0, image
            tail = (last - gather.rows(image0)).index_select(0, _index(places, image.device))
            self.rows.tail.index_copy_(0, _index(computing, image.device), tail)
            computed = image.index_select(0, _index(places, image.device))
        # Rows that reuse: block 0's output plus the row's tail residual, then every block's ControlNet sample.
        output = self.rows.tail + image0
        for index in range(len(blocks) if samples else 0):
            output = output + samples[index // every]
        if computed is not None:
            output = output.index_copy(0, _index(computing, output.device), computed)
        return text0, output


class _SubBatch:
    """Takes the chosen rows of a forward's tensors: the image stream, the text (padded, or packed again for
    these rows) and the blocks' other arguments. The batch dimension is marked static: compiled blocks get
    one graph per sub-batch size."""

    def __init__(self, chosen: list[int], forward: Forward, device: torch.device, attention_kwargs: dict | None):
        self.rows_in_forward = forward.rows
        self.whole = chosen == list(range(forward.rows))
        self.index = None if self.whole else _index(chosen, device)
        text_mask = (attention_kwargs or {}).get("text_mask")
        self.packed = (attention_kwargs or {}).get("text_index") is not None
        if self.packed and not self.whole:
            if forward.text_lengths is None:
                raise ValueError("a packed text stream needs its rows' text lengths (Forward.text_lengths)")
            self.tokens, self.text_index = _packed_tokens(
                chosen, forward.text_lengths, text_mask.shape[1], device, forward.text_minimum
            )

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return tensor
        return _static_rows(tensor.index_select(0, self.index))

    def text(self, text: torch.Tensor) -> torch.Tensor:
        """The chosen rows' text stream: padded `[rows, tokens, dim]`, or packed `[1, their tokens, dim]`."""
        if self.whole:
            return text
        from torch._dynamo import maybe_mark_dynamic

        taken = text.index_select(1, self.tokens) if self.packed else self.rows(text)
        maybe_mark_dynamic(taken, 1)  # the text length, as families.qwen_image.text_length marks a whole batch's
        return taken

    def arguments(self, arguments: dict) -> dict:
        """A block's other arguments for the chosen rows."""
        if self.whole:
            return arguments
        taken = dict(arguments)
        temb = arguments["temb"]
        if temb.shape[0] == 2 * self.rows_in_forward:  # zero_cond_t models: [timesteps, zero timesteps]
            index = torch.cat([self.index, self.index + self.rows_in_forward])
            taken["temb"] = _static_rows(temb.index_select(0, index))
        else:
            taken["temb"] = self.rows(temb)
        for name in ("encoder_hidden_states_mask", "modulate_index"):
            if arguments[name] is not None:
                taken[name] = self.rows(arguments[name])
        kwargs = arguments["joint_attention_kwargs"]
        if kwargs:
            kwargs = dict(kwargs)
            from torch._dynamo import maybe_mark_dynamic

            if kwargs.get("text_mask") is not None:
                kwargs["text_mask"] = self.rows(kwargs["text_mask"])
                maybe_mark_dynamic(kwargs["text_mask"], 1)  # the padded layout's length
            if self.packed:
                kwargs["text_index"] = self.text_index
                maybe_mark_dynamic(kwargs["text_index"], 0)
            taken["joint_attention_kwargs"] = kwargs
        return taken


def _packed_tokens(
    chosen: Sequence[int], lengths: Sequence[int], padded: int, device: torch.device, at_least: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the chosen rows of a packed text stream (rows of `lengths` real tokens, one after another): which
    packed tokens are theirs, and each one's place in their own padded layout of `padded` tokens a row (the
    `text_index` of qwen_batch.families.qwen_image.packed_text), filler included: copies of the stream's first token, making
    the sub-batch's text `at_least` tokens long as the whole forward's (`packed_places`). From the lengths
    on the host: nothing is read back."""
    starts = [sum(lengths[:row]) for row in range(len(lengths))]
    tokens = [token for row in chosen for token in range(starts[row], starts[row] + lengths[row])]
    places = packed_places([lengths[row] for row in chosen], padded, at_least)
    tokens += [0] * (len(places) - len(tokens))
    return _index(tokens, device), _index(places, device)


def _static_rows(tensor: torch.Tensor) -> torch.Tensor:
    from torch._dynamo import mark_static

    mark_static(tensor, 0)
    return tensor


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A host list of indices on `device`, copied without the host waiting (pinned, non-blocking)."""
    return _on_device(values, device, torch.long)


def _on_device(values: Sequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), str(device))


@contextlib.contextmanager
def _blocks_replaced(transformer: torch.nn.Module, split: SplitBlocks) -> Iterator[None]:
    """The transformer with `split` as its only block, for one call."""
    blocks = transformer.transformer_blocks
    transformer.transformer_blocks = torch.nn.ModuleList([split])
    try:
        yield
    finally:
        transformer.transformer_blocks = blocks
