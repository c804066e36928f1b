"""Step caching per row: opt-in speed for many-step rows, each row's image independent of its batch-mates.

diffusers (FirstBlockCache, TaylorSeer), cache-dit, vLLM-Omni and SGLang decide per **batch**: the residual test
is a mean over the whole batch, so whether a row's step runs or is reused depends on which prompts share its
batch, and a row gives another image alone. Here every decision and every piece of state belongs to one row:

- **rows**: with true CFG a row's conditional and unconditional passes are two rows with their own state, as
  diffusers keeps them in two cache contexts ("cond", "uncond"); the step's rows are numbered as the engine
  lays them out, conditional rows first, whether CFG's halves run as one forward or as two;
- **first-block** (`first_block.FirstBlockRows`): the first block runs for every row, the residual test is made
  per row (a `[rows]` mask, one device-to-host copy per forward), the rows that must compute are gathered into a
  sub-batch (padded to a few sizes, so compiled blocks do not recompile per size) that runs the other blocks,
  the others add their cached residual;
- **taylorseer** (`taylorseer.TaylorSeerRows`): its full steps come on a fixed schedule, the same for every row of
  a batch (rows share their spec: it is part of `Request.batch_key`), so a step runs the transformer for the
  whole batch or for none; each row extrapolates its own outputs.

The denoise loop (`qwen_batch.pipeline.denoise.blocks`) asks `for_batch` for a batch's step cache and, when there
is one, hands it each step's forwards (`Forward`) instead of calling the transformer itself; a batch without a
step cache runs the plain loop, untouched. How often each row computed in full is counted per row
(`steps_computed`). The spec's text: `qwen_batch.pipeline.step_cache.spec`. Why and how: docs/step-cache.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qwen_batch.pipeline.step_cache.spec import FirstBlock, StepCacheError, TaylorSeer, normalized, parse_step_cache

if TYPE_CHECKING:
    import torch

__all__ = ["FirstBlock", "Forward", "StepCacheError", "TaylorSeer", "for_batch", "normalized", "parse_step_cache"]


@dataclass
class Forward:
    """One transformer forward of a step, as the engine would run it."""

    first: int  # its first row among the step's rows (conditional rows, then unconditional ones)
    rows: int
    call: Callable[..., torch.Tensor]  # runs the transformer over these rows; keyword arguments are added to its call
    controls: list[torch.Tensor] | None = None  # ControlNet block samples for these rows, or None
    # Packed text (qwen_batch.families.qwen_image.packed_text): each row's real text tokens, to pack a sub-batch's own. None: padded.
    text_lengths: Sequence[int] | None = None
    text_minimum: int = 0  # a packed text's fewest tokens, filler included (qwen_batch.families.qwen_image.packed_text)

    @property
    def control_kwargs(self) -> dict[str, list[torch.Tensor]]:
        """The ControlNet's samples as the transformer takes them (nothing when there are none)."""
        return {"controlnet_block_samples": self.controls} if self.controls else {}


class BatchStepCache(Protocol):
    """A batch's step cache, as the denoise loop uses it."""

    def wants_controls(self, step: int) -> bool:
        """Whether this step's forwards need the ControlNet's block samples."""

    def run(self, step: int, forwards: Sequence[Forward]) -> list[torch.Tensor]:
        """Each forward's output, computed or reused row by row."""

    def steps_computed(self, batch: int) -> list[tuple[int, int | None]]:
        """Per image: the steps its conditional pass computed in full, and its unconditional pass's (None
        without true CFG)."""


def for_batch(spec_text: str | None, transformer: torch.nn.Module, rows: int) -> BatchStepCache | None:
    """The step cache of a batch whose rows carry `spec_text` (they all do: `Request.batch_key`), or None.
    `rows`: the step's rows, the batch's or, with true CFG, twice as many."""
    spec = parse_step_cache(spec_text)
    if spec is None:
        return None
    if isinstance(spec, FirstBlock):
        from qwen_batch.pipeline.step_cache.first_block import FirstBlockRows

        return FirstBlockRows(spec, transformer, rows)
    from qwen_batch.pipeline.step_cache.taylorseer import TaylorSeerRows

    return TaylorSeerRows(spec, rows)


def per_image(counts: Sequence[int], batch: int) -> list[tuple[int, int | None]]:
    """Counts per step row -> (conditional, unconditional or None) per image."""
    if len(counts) == batch:
        return [(count, None) for count in counts]
    return [(counts[row], counts[batch + row]) for row in range(batch)]


def step_cache_line(computed: int, run: int) -> str:
    """A run's step caching in words, for its summary: how much of the cached rows' work ran in full."""
    return (
        f"{computed:,} of {run:,} steps computed in full ({computed / run:.0%}) by the rows with a step cache "
        "(each CFG pass counted)"
    )
