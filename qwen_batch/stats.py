"""Stats that add: a stage's counters, summed across batches, chunks and workers with `+` or `sum()`.

As datatrove's `Stats`: a subclass is a dataclass of counters. `a + b` adds each field (a `peak()` field keeps
the larger; a list concatenates); `to_dict` is the one JSON-able form (a flow's task result, the summary
artifact), `from_dict` reads it back. So adding a counter is one line in its dataclass: the CLI summary, the
flow's report and its merge of chunks pick it up from there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

ADD = "qwen_batch.stats.add"  # field metadata: how two values of the field combine
SERIALIZED = "qwen_batch.stats.serialized"  # field metadata: False for what stays in the process (records)

S = TypeVar("S", bound="Stats")


def _larger(first: float | None, second: float | None) -> float | None:
    present = [value for value in (first, second) if value is not None]
    return max(present) if present else None


def peak() -> Any:
    """A high-water mark (peak GPU memory): the larger of two, None where nothing was measured."""
    return field(default=None, metadata={ADD: _larger})


def in_process() -> Any:
    """A list that adds up (records) but is not part of `to_dict`: too large to send around as a summary."""
    return field(default_factory=list, metadata={SERIALIZED: False})


@dataclass
class Stats:
    def __add__(self: S, other: S) -> S:
        if not isinstance(other, type(self)):
            return NotImplemented
        return type(self)(
            **{
                f.name: f.metadata.get(ADD, operator.add)(getattr(self, f.name), getattr(other, f.name))
                for f in fields(self)
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(SERIALIZED, True)}

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.metadata.get(SERIALIZED, True) and f.name in data})
