"""Out of GPU memory: a batch that does not fit is retried in halves, down to single rows.

Whether a batch fits depends on its size, resolution and prompt lengths, and on what else holds the
GPU, so a batch size that works for most of a manifest can fail for one batch hours into a run. Rather
than fail its rows, the engine frees what the failed attempt held and runs each half of the batch
(`retry_in_halves`); only a single row that still does not fit fails, with the error in its result.
A row's image does not depend on what shares its batch, so the halves' images are the ones the full
batch would have made. The encoders use `run_in_halves`, where a single text that still does not fit
stops the stage (there is no result row to carry its error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from qwen_batch.memory.device import release_memory

log = logging.getLogger(__name__)

T = TypeVar("T")

# What allocators say when they run out: torch.OutOfMemoryError's "CUDA out of memory. Tried to
# allocate ...", cuBLAS/cuDNN's "CUDA error: out of memory", and the CPU allocator's refusal.
_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for RuntimeErrors that report an allocation failure."""
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, alias torch.cuda.OutOfMemoryError
        return True
    return isinstance(error, RuntimeError) and any(message in str(error).lower() for message in _MESSAGES)


def halves(rows: Sequence[T]) -> tuple[list[T], list[T]]:
    middle = (len(rows) + 1) // 2
    return list(rows[:middle]), list(rows[middle:])


def retry_in_halves(rows: Sequence[T], run: Callable[[list[T]], None], device: str) -> None:
    """Run `run` on each half of `rows` after freeing cached GPU memory.

    Call it after leaving the `except` block that caught the out-of-memory error: until then the
    error's traceback keeps the failed attempt's tensors alive and nothing can be freed. `run` is the
    caller's own batch function, so a half that still does not fit is halved again, down to one row.
    """
    first, second = halves(rows)
    log.warning(
        "out of GPU memory with a batch of %d rows; retrying as batches of %d and %d",
        len(rows),
        len(first),
        len(second),
    )
    release_memory(device)
    run(first)
    run(second)


def run_in_halves(
    rows: Sequence[T], run: Callable[[list[T]], None], device: str, too_big: Callable[[T, BaseException], Exception]
) -> None:
    """`run(rows)`; out of GPU memory, each half in turn the same way (`retry_in_halves`), down to one
    row; a single row that still does not fit raises `too_big(row, error)`. Halves that succeeded keep
    their effects (what `run` stored stays stored)."""
    try:
        run(list(rows))
        return
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        if len(rows) == 1:
            raise too_big(rows[0], error) from error
    # Out of the `except` block: the error's traceback no longer holds the attempt's tensors.
    retry_in_halves(rows, lambda half: run_in_halves(half, run, device, too_big), device)
