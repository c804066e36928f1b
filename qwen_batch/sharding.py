"""Splitting a manifest into shards of equal predicted GPU time, one shard per GPU worker.

A shard that holds more work than the others keeps its GPU busy while the others sit idle at the end
(the "idle tail"). Splitting by row count, or by a hash of the id, is only fair when every row costs
the same; a manifest that mixes 512x512 and 1664x928 rows, or 20 and 50 steps, is not like that. So
rows are dealt out by predicted cost: the transformer's work for the row (the cost model in
../shared/reference/qwen-image.md: linear layers grow with the token count, attention with its
square), times its steps, times two with true CFG. Heaviest rows first, each to the shard with the
least work so far (longest-processing-time-first), which leaves the shards within one light row of
each other.

The split is a pure function of the manifest's valid rows and the shard count: every shard process,
and the fan-out parent, computes the same one without talking to each other. Keep the same manifest
and shard count to resume; rows already done are skipped whichever shard they land in, because
resume looks at the shared output folder, not at the shard.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_batch.manifest import Request

HIDDEN = 3072  # the transformer's inner width; a constant factor, kept for readable arithmetic
TEXT_TOKENS = 64  # a typical prompt; the text's share of the cost is small next to 4,096 image tokens
EDIT_INPUT_TOKENS = 4096  # an edit input is encoded at about 1024x1024: (1024/16)^2 tokens per image
DEFAULT_EDIT_SIZE = 1024  # an edit row without a size gets about 1024x1024


def predicted_cost(request: Request) -> float:
    """The row's transformer work, in FLOPs per layer (a relative figure: layers are the same for all)."""
    width = request.width or DEFAULT_EDIT_SIZE
    height = request.height or DEFAULT_EDIT_SIZE
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS + EDIT_INPUT_TOKENS * len(request.images)
    per_forward = 24 * HIDDEN**2 * tokens + 4 * tokens**2 * HIDDEN
    return per_forward * request.num_inference_steps * (2 if request.uses_cfg else 1)


def _tiebreak(row_id: str) -> bytes:
    return hashlib.sha256(b"qwen-batch/shard/" + row_id.encode("utf-8")).digest()


def assign_shards(requests: Sequence[Request], shards: int) -> dict[str, int]:
    """Row id -> shard (0..shards-1), balancing predicted cost; deterministic for a given manifest."""
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, not {shards}")
    order = sorted(requests, key=lambda request: (-predicted_cost(request), _tiebreak(request.id)))
    loads = [(0.0, index) for index in range(shards)]  # a heap of (work so far, shard)
    assignment: dict[str, int] = {}
    for request in order:
        load, index = heapq.heappop(loads)
        assignment[request.id] = index
        heapq.heappush(loads, (load + predicted_cost(request), index))
    return assignment


def shard_costs(requests: Sequence[Request], assignment: dict[str, int], shards: int) -> list[float]:
    """Each shard's predicted work, to report the balance (and the idle tail it implies)."""
    costs = [0.0] * shards
    for request in requests:
        costs[assignment[request.id]] += predicted_cost(request)
    return costs


def idle_tail(costs: Sequence[float]) -> float:
    """The share of the slowest shard's time the others wait, on average: 0 is perfectly balanced."""
    slowest = max(costs, default=0.0)
    if not slowest:
        return 0.0
    return sum(slowest - cost for cost in costs) / (len(costs) * slowest)
