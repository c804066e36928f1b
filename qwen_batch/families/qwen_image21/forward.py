"""The 2.1 transformer over a batch of rows that differ in prompt and condition images.

Under `causal_condition`, a row's prefix (its text and condition-image tokens) is modulated from t = 0 and
attends only to itself, so its keys and values at every block are the same at every step. diffusers computes
them at the first step of a call and reuses them (its `QwenImage21KVCache`); its batched call pads prompts to one
length, which moves each row's image in the rotary positions (its own test accepts a 2e-3 drift), and gives
every prompt the same condition images.

Here each row's first step is diffusers' own forward for that row alone (`prefill`): the row's prediction at
that step and its prefix's keys and values, exactly as the pipeline makes them. Every later step runs the
batch's target tokens together (`Decoder.forward`): the projections, norms, modulation and feed-forwards over
all rows at once, and the attention of each group of rows with one prefix length against its own prefix (no
padding, no mask), which is the pipeline's decode step for that row. The blocks' own modules (and any adapter
layers in them) do the arithmetic, in the pipeline's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SLOT_TOKENS = 4  # each of the encoder's image slots stands for 2x2 latent tokens


@dataclass
class RowForward:
    """One forward row of a batch (a row, or a row's negative prompt with guidance) as its prefix defines it."""

    text: torch.Tensor  # [tokens, hidden] on the device
    slots: torch.Tensor  # [tokens] bool on the device
    image_latents: torch.Tensor | None  # the condition images' packed latents, one after another [n, channels]
    image_shapes: tuple[tuple[int, int, int], ...]


@dataclass
class Prefix:
    """A forward row's cached prefix: its keys and values at every block, and its target tokens' rotary."""

    keys: list[torch.Tensor]  # per block [1, prefix, heads, head_dim]
    values: list[torch.Tensor]
    rotary: torch.Tensor  # [target, head_dim / 2] complex
    cache: object = None  # diffusers' QwenImage21KVCache holding the same keys and values (the per-row steps)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


def _layout(row: RowForward, target_shape: tuple[int, int, int]) -> tuple[list, torch.Tensor]:
    """diffusers' `img_shapes` for the row and `img_mask` over the encoder's sequence plus the target's slots."""
    target_slots = math.prod(target_shape) // SLOT_TOKENS
    img_mask = torch.cat([row.slots, row.slots.new_ones(target_slots)])[None]
    return [[*row.image_shapes, target_shape]], img_mask


def prefill(
    transformer, row: RowForward, latents: torch.Tensor, timestep: torch.Tensor, target_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, Prefix]:
    """The first step of one forward row, as the pipeline runs it for that row alone (`kv_cache_mode`
    "extract"): its prediction for the target tokens `[1, target, channels]` and its prefix for later steps."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(len(transformer.transformer_blocks))
    output = pipeline_forward(transformer, row, latents, timestep, target_shape, cache, "extract")
    layers = cache.layer_caches
    prefix = Prefix(
        [layer.k for layer in layers], [layer.v for layer in layers], _target_rotary(transformer, row, target_shape)
    )
    prefix.cache = cache
    return output, prefix


def pipeline_forward(transformer, row: RowForward, latents, timestep, target_shape, cache, mode: str) -> torch.Tensor:
    """diffusers' transformer forward for one forward row alone, as the pipeline calls it at a step: "extract" at
    the first (the prefix's keys and values into `cache`), "cached" after. Its target tokens' prediction."""
    img_shapes, img_mask = _layout(row, target_shape)
    hidden = latents if row.image_latents is None else torch.cat([row.image_latents[None], latents], dim=1)
    output = transformer(
        hidden_states=hidden,
        timestep=timestep,
        encoder_hidden_states=row.text[None],
        encoder_hidden_states_mask=None,  # alone: nothing is padded (the pipeline passes None then too)
        img_shapes=img_shapes,
        img_mask=img_mask,
        kv_cache=cache,
        kv_cache_mode=mode,
        return_dict=False,
    )[0]
    return output[:, -latents.shape[1] :]


def _target_rotary(transformer, row: RowForward, target_shape: tuple[int, int, int]) -> torch.Tensor:
    """The rotary embedding of the row's target tokens: the pipeline's over the row's whole sequence, sliced."""
    img_shapes, img_mask = _layout(row, target_shape)
    repeats = torch.where(img_mask, SLOT_TOKENS, 1)[0]
    image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)
    rotary = transformer.pos_embed(img_shapes[0], image_pad_mask, device=row.text.device)
    return rotary[-math.prod(target_shape) :]


class BeforeAttention(torch.nn.Module):
    """A block's work before its attention, for target tokens: norm, modulation, Q/K/V, QK norms, RoPE.
    Shapes do not depend on the rows' prefixes, so this compiles once for every batch."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor, rotary: torch.Tensor):
        from qwen_batch.families.qwen_image.rotary import apply_rotary

        attn = self.block.attn
        modulated = self.block.img_norm1(hidden) * (1 + scale)
        head_dim = attn.inner_dim // attn.heads
        query = attn.to_q(modulated).unflatten(-1, (-1, head_dim))
        key = attn.to_k(modulated).unflatten(-1, (-1, head_dim))
        value = attn.to_v(modulated).unflatten(-1, (-1, head_dim))
        query = apply_rotary(attn.norm_q(query).to(value.dtype), rotary)
        key = apply_rotary(attn.norm_k(key).to(value.dtype), rotary)
        return query, key, value


class AfterAttention(torch.nn.Module):
    """A block's work after its attention: output projection, gated residual, the modulated SwiGLU."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden, attention, gate, scale, mlp_gate):
        block = self.block
        attention = attention.flatten(2, 3).type_as(hidden)
        hidden = hidden + gate.tanh() * block.attn.to_out[1](block.attn.to_out[0](attention))
        hidden = hidden + mlp_gate.tanh() * block.img_mlp(block.img_norm2(hidden) * (1 + scale))
        if hidden.dtype == torch.float16:
            hidden = hidden.clip(-65504, 65504)
        return hidden


def block_regions(transformer, compile: bool = False) -> list[tuple[BeforeAttention, AfterAttention]]:
    """Each block's two regions around its attention, compiled when asked (regional: the 32 blocks share
    their graphs; the attention between, whose key length is each row's prefix, stays out of them)."""
    regions = [(BeforeAttention(block), AfterAttention(block)) for block in transformer.transformer_blocks]
    if compile:
        from qwen_batch.memory.placement import COMPILE_OPTIONS

        for before, after in regions:
            before.compile(fullgraph=True, dynamic=False, options=dict(COMPILE_OPTIONS) or None)
            after.compile(fullgraph=True, dynamic=False, options=dict(COMPILE_OPTIONS) or None)
    return regions


class Decoder:
    """The steps after the first, for a batch of forward rows with their prefixes."""

    def __init__(self, transformer, prefixes: Sequence[Prefix], regions=None, attend=None):
        self.transformer = transformer
        self.regions = regions or block_regions(transformer)
        # [rows, target, head_dim / 2, 2]: real, gathered once per batch (compiled code takes no complex tensor)
        self.rotary = torch.view_as_real(torch.stack([prefix.rotary for prefix in prefixes]))
        self.attend = attend or sdpa
        # Consecutive rows with one prefix length attend in one call (a slice of the batch, no gather); their
        # prefixes are stacked once per block, here (a single row's are used as they are: no copy).
        self.groups = []
        start, layers = 0, range(len(prefixes[0].keys))
        for end in range(1, len(prefixes) + 1):
            if end < len(prefixes) and prefixes[end].length == prefixes[start].length:
                continue
            run = prefixes[start:end]
            keys = [run[0].keys[b] if len(run) == 1 else torch.cat([p.keys[b] for p in run]) for b in layers]
            values = [run[0].values[b] if len(run) == 1 else torch.cat([p.values[b] for p in run]) for b in layers]
            self.groups.append((slice(start, end), keys, values))
            start = end

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, first_block=None) -> torch.Tensor:
        """The prediction for every forward row's target tokens `[rows, target, channels]`. `first_block`: the
        batch's per-row first-block cache (`FirstBlockSteps`), which decides after block 0 which rows run the others."""
        transformer = self.transformer
        hidden = transformer.img_in(latents)
        timestep = timestep.to(hidden.dtype)
        timestep = torch.cat([timestep, timestep.new_zeros(1)])  # the t = 0 row the prefix was modulated with
        temb = transformer.time_text_embed(timestep, hidden)
        modulation = transformer.modulation(temb)[:-1].unsqueeze(1)  # every token here is a target token
        first, second = modulation.chunk(2, dim=-1)
        scale, gate = first.chunk(2, dim=-1)
        mlp_scale, mlp_gate = second.chunk(2, dim=-1)
        arguments = (scale, gate, mlp_scale, mlp_gate, self.rotary)
        if first_block is None:
            hidden = self._blocks(hidden, range(len(self.regions)), arguments)
        else:
            head = self._blocks(hidden, range(1), arguments)
            hidden = first_block.rest(self, hidden, head, arguments)
        norm = transformer.norm_out
        norm_scale = norm.linear(norm.silu(temb).to(hidden.dtype))[:-1].unsqueeze(1)
        return transformer.proj_out(norm.norm(hidden) * (1 + norm_scale))

    def _blocks(self, hidden: torch.Tensor, indices, arguments, rows: list[int] | None = None) -> torch.Tensor:
        """The blocks `indices` over `hidden`, all the forward rows' or (`rows`: their places) a sub-batch's."""
        scale, gate, mlp_scale, mlp_gate, rotary = arguments
        for index in indices:
            before, after = self.regions[index]
            query, key, value = before(hidden, scale, rotary)
            attention = self._attention(index, query, key, value, rows)
            hidden = after(hidden, attention, gate, mlp_scale, mlp_gate)
        return hidden

    def _attention(self, index: int, query, key, value, rows: list[int] | None = None) -> torch.Tensor:
        """Each row's target queries against its prefix's keys then its own: full attention, no mask."""
        outputs = []
        if rows is not None:  # a sub-batch: each row against its own prefix, one call a row
            for place, row in enumerate(rows):
                prefix_keys, prefix_values = self._prefix(row, index)
                one = slice(place, place + 1)
                full_keys = torch.cat([prefix_keys, key[one]], dim=1)
                outputs.append(self.attend(query[one], full_keys, torch.cat([prefix_values, value[one]], dim=1)))
            return torch.cat(outputs)
        for group, keys, values in self.groups:
            full_keys = torch.cat([keys[index], key[group]], dim=1)
            full_values = torch.cat([values[index], value[group]], dim=1)
            outputs.append(self.attend(query[group], full_keys, full_values))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _prefix(self, row: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        for group, keys, values in self.groups:
            if group.start <= row < group.stop:
                place = slice(row - group.start, row - group.start + 1)
                return keys[index][place], values[index][place]
        raise IndexError(row)


class StepGraph:
    """The decoder's steps replayed from a CUDA graph. Once the prefixes are cached, every step of a batch has the
    same shapes and reads the same tensors, so its ~1,000 kernel launches are recorded once and replayed: the
    batch's second step runs eagerly on a side stream (the allocator and lazy initialisation settle there, and its
    result is the step's), the graph is recorded after it (no GPU work), and later steps copy their inputs into
    the graph's and replay. What it saves is launch time, which matters only where the GPU's work per step is
    small (batch 1, Turbo); bench/qwen_image21.py's kernels scenario measures it."""

    def __init__(self, decoder: Decoder):
        self.decoder, self.graph = decoder, None

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, first_block=None) -> torch.Tensor:
        if first_block is not None:  # decides per step which rows run: not one fixed graph
            return self.decoder.forward(latents, timestep, first_block)
        if self.graph is not None:
            self.latents.copy_(latents)
            self.timestep.copy_(timestep)
            self.graph.replay()
            return self.output.clone()  # the graph's output is overwritten by the next replay; step caches keep it
        self.latents, self.timestep = latents.clone(), timestep.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            prediction = self.decoder.forward(self.latents, self.timestep)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.decoder.forward(self.latents, self.timestep)
        return prediction


class FirstBlockSteps:
    """diffusers' FirstBlockCache decided per forward row (`qwen_batch.pipeline.step_cache.first_block`'s test and
    counts): block 0 runs for every row; a row whose block-0 residual moved more than the threshold since its last
    full step runs the other blocks (in a sub-batch of the rows that do), the others add their cached tail.

    The first step, diffusers' forward for each row alone, runs every block: hooks on the first and last block
    keep each row's target tokens of block 0's input and output and of the last block's output."""

    def __init__(self, cache):
        self.cache = cache  # FirstBlockRows: the per-row decisions and counts
        self.rows = None  # its per-row state: the residual of each row's last full step, its tail residual
        self._first: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def capture(self, transformer, target_tokens: int):
        """A context for one row's first step: its block-0 input and output and last output, target tokens."""
        import contextlib

        seen = {}

        def before(module, args, kwargs):
            seen["input"] = kwargs["hidden_states"][:, -target_tokens:]

        def after(name):
            def hook(module, args, kwargs, output):
                seen[name] = output[:, -target_tokens:]

            return hook

        @contextlib.contextmanager
        def hooked():
            blocks = transformer.transformer_blocks
            handles = [
                blocks[0].register_forward_pre_hook(before, with_kwargs=True),
                blocks[0].register_forward_hook(after("head"), with_kwargs=True),
                blocks[-1].register_forward_hook(after("last"), with_kwargs=True),
            ]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
                self._first.append((seen["input"], seen["head"], seen["last"]))

        return hooked()

    def first_step(self, rows: int) -> None:
        """After the first step: every row computed; its residuals are the next step's references."""
        from qwen_batch.pipeline.step_cache import Forward
        from qwen_batch.pipeline.step_cache.first_block import _PassRows

        inputs, heads, lasts = (torch.cat(parts) for parts in zip(*self._first, strict=True))
        self.rows = _PassRows()
        self.cache.decide(self.rows, heads - inputs, Forward(0, rows, None), 0)
        self.rows.tail = lasts - heads
        self._first = []
        self.step = 0

    def rest(self, decoder: Decoder, hidden: torch.Tensor, head: torch.Tensor, arguments) -> torch.Tensor:
        """Blocks 1.. for the rows that compute, block 0's output plus their tail for the others."""
        from qwen_batch.pipeline.step_cache import Forward
        from qwen_batch.pipeline.step_cache.first_block import sub_batch_size

        self.step += 1
        count = hidden.shape[0]
        decisions = self.cache.decide(self.rows, head - hidden, Forward(0, count, None), self.step)
        computing = [row for row, computes in enumerate(decisions) if computes]
        output = head + self.rows.tail
        if not computing:
            return output
        blocks = range(1, len(decoder.regions))
        if len(computing) == count:
            last = decoder._blocks(head, blocks, arguments)
            self.rows.tail = last - head
            return last
        # A sub-batch padded with rows that reuse (their results dropped) to a few sizes: compiled blocks see those.
        size = sub_batch_size(len(computing), count)
        chosen = computing + [row for row in range(count) if row not in computing][: size - len(computing)]
        index = torch.tensor(chosen, device=hidden.device)
        scale, gate, mlp_scale, mlp_gate, rotary = arguments
        sub = (scale.index_select(0, index), gate.index_select(0, index), mlp_scale.index_select(0, index),
               mlp_gate.index_select(0, index), rotary.index_select(0, index))  # fmt: skip
        last = decoder._blocks(head.index_select(0, index), blocks, sub, chosen)[: len(computing)]
        places = torch.tensor(computing, device=hidden.device)
        self.rows.tail.index_copy_(0, places, last - head.index_select(0, places))
        return output.index_copy(0, places, last)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Full attention `[rows, tokens, heads, head_dim]`: PyTorch's SDPA as diffusers' dispatcher calls it in the
    pipeline's decode step (its flash or cuDNN kernel on a GPU)."""
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)
