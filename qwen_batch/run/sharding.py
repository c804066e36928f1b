"""Splitting a manifest into shards of equal predicted GPU time, one shard per GPU worker.

A shard that holds more work than the others keeps its GPU busy while the others sit idle at the end
(the "idle tail"). Splitting by row count, or by a hash of the id, is only fair when every row costs
the same; a manifest that mixes 512x512 and 1664x928 rows, or 20 and 50 steps, is not like that. So
the split balances predicted GPU time:

- A row costs the transformer's work for it (the cost model in ../shared/reference/qwen-image.md:
  linear layers grow with the token count, attention with its square), times the steps it runs (a row
  that starts from an image skips the first part of its schedule, by its `strength`), times two with
  true CFG, plus, for ControlNet rows, a ControlNet forward per control image on each step it acts (once
  for both passes; a twelfth of a transformer forward: 5 blocks to 60). A step cache's reused steps are
  counted where the spec alone says which they are: a TaylorSeer row's predicted steps run nothing and
  cost nothing; a first-block row's decisions depend on the model's residuals, unknown until it runs, so
  every step of it counts, as the upper bound.
- The transformer is the run's model family's (its linears' and attention's widths, from its planner costs):
  Qwen-Image's by default. A family with a prefix KV cache (Qwen-Image-2.1) runs a row's prefix (its text and
  condition images) at its first step only; every later step runs the image tokens, attending to the cached
  prefix, so a 2.1 row's condition images cost a small part of what an edit's input images do.
- Every batch costs a little more than its rows: each forward of a batch pays a share that does not
  shrink with fewer rows (fitted to H100 runs in bf16: about 0.02 s a forward, an eighth of a
  1024x1024 row's 0.17 s; docs/scale-out.md). So cutting a group of same-size rows into more, partial
  batches costs time: a 2-GPU run that cut the 1-GPU run's 7 batches into 9 did 2.2% more GPU work.

The split is built per group of rows that can share a batch (same size, steps, guidance and inputs):
pieces are dealt out heaviest first, each to the shard with the least predicted time so far
(longest-processing-time-first), then rows are moved off the slowest shard while that lowers its
predicted time, counting the batches each shard ends up with: one row or one batch at a time, or two
pieces for one (two full batches of 1664x928 rows can trade places with three smaller batches). Two
deals are tried, in whole batches and in single rows, and the one whose slowest shard is predicted
faster is kept.

The split is a pure function of the manifest's valid rows, the shard count, the batch size and the model
family: every
shard process, and the fan-out parent, computes the same one without talking to each other. Keep the
same manifest, shard count, batch size and model to resume; rows already done are skipped whichever shard
they land in, because resume looks at the shared output folder, not at the shard.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.memory.placement import DEFAULT_BATCH_SIZE
from qwen_batch.pipeline.conditions.controlnet import control_acts
from qwen_batch.pipeline.conditions.image_start import skipped_steps
from qwen_batch.pipeline.step_cache.spec import TaylorSeer, parse_step_cache

if TYPE_CHECKING:
    from qwen_batch.families import ModelFamily
    from qwen_batch.manifest import Request

HIDDEN = 3072  # the transformer's inner width; a constant factor, kept for readable arithmetic
TEXT_TOKENS = 64  # a typical prompt; the text's share of the cost is small next to 4,096 image tokens
# An edit input (or a 2.1 condition image) is encoded at about 1024x1024: (1024/16)^2 tokens per image.
EDIT_INPUT_TOKENS = 4096
DEFAULT_EDIT_SIZE = 1024  # an edit row without a size gets about 1024x1024
# What a batch costs beyond its rows, per forward, as a share of one 1024x1024 row's forward: fitted
# to the per-size seconds per image of a 1-GPU and a 2-GPU run on H100s (bf16, eager, 50 steps), whose
# batches of 1 to 4 rows differ (docs/scale-out.md): 0.02 s a forward next to a row's 0.17 s.
BATCH_OVERHEAD = 0.12
# A control image's ControlNet forward next to one transformer forward: InstantX's Union ControlNet runs 5
# blocks to the transformer's 60, on the same tokens (measured on an H200: 0.0112 s a row against 0.1184 s,
# docs/benchmarks.md).
CONTROLNET_SHARE = 5 / 60
# Exchanges made after a deal, at most: a few per group and shard pair are enough for a few shards;
# with hundreds of shards of few rows each, later exchanges gain little and each costs a search.
MOVES_PER_SPLIT = 20_000
MIN_MOVES = 200
TARGETS = 8  # the slowest shard gives work to this many of the lightest shards, at most
COMPOUND_TARGETS = 3  # and trades pieces (one for one, two for one) with this many of them
EXCHANGE_LIMIT = 2_000  # compound exchanges tried per pair of shards, at most about this many


@dataclass(frozen=True)
class _Transformer:
    """What a forward costs per layer, in FLOPs: a token through the linears, a query-key pair of attention."""

    linear: float
    pair: float
    prefix_cache: bool  # a row's prefix runs at its first step only (Qwen-Image-2.1)

    def forward(self, tokens: int, pairs: float | None = None) -> float:
        return self.linear * tokens + self.pair * (tokens**2 if pairs is None else pairs)


QWEN_IMAGE = _Transformer(linear=24 * HIDDEN**2, pair=4 * HIDDEN, prefix_cache=False)


def _transformer(family: ModelFamily | None) -> _Transformer:
    """The family's transformer as its planner costs describe it (`ModelFamily.cost_constants`); Qwen-Image's
    by default (the same figures as its family's)."""
    if family is None:
        return QWEN_IMAGE
    costs = family.cost_constants()
    return _Transformer(
        linear=2 * costs.DIT_LINEAR_PARAMS_PER_TOKEN,
        pair=4 * costs.DIT_HIDDEN,
        prefix_cache=bool(costs.PREFIX_KV_BYTES_PER_TOKEN),
    )


def _reference_forward(transformer: _Transformer) -> float:
    """One forward of a 1024x1024 row."""
    return transformer.forward((1024 // 16) ** 2 + TEXT_TOKENS)


@functools.cache
def _steps_run(steps: int, strength: float | None, step_cache: str | None, controlled: tuple[float, float] | None):
    """Of a schedule of `steps`, how many steps run the transformer's blocks, and how many of those also run the
    ControlNet: all the steps left after `strength` cuts the start, but a TaylorSeer row's predicted ones
    (which run nothing, the ControlNet included); those in the row's control range."""
    steps -= 0 if strength is None else skipped_steps(steps, strength)
    spec = parse_step_cache(step_cache)
    full = [step for step in range(steps) if not isinstance(spec, TaylorSeer) or spec.computes(step)]
    return len(full), sum(control_acts(step, steps, controlled) for step in full) if controlled else 0


def _steps(request: Request) -> tuple[int, int]:
    strength = request.strength if request.starts_from_image else None
    controlled = request.control_range if request.controls else None
    return _steps_run(request.num_inference_steps, strength, request.step_cache, controlled)


def _forwards(request: Request) -> int:
    """The transformer forwards the row runs."""
    return _steps(request)[0] * (2 if request.uses_cfg else 1)


def predicted_cost(request: Request, family: ModelFamily | None = None) -> float:
    """The row's transformer (and ControlNet) work on the family's model (None: Qwen-Image), in FLOPs per layer
    (a relative figure: layers are the same for all of a family's rows)."""
    transformer = _transformer(family)
    width = request.width or DEFAULT_EDIT_SIZE
    height = request.height or DEFAULT_EDIT_SIZE
    image = (width // 16) * (height // 16)
    prefix = TEXT_TOKENS + EDIT_INPUT_TOKENS * len(request.images)
    controlnet_forwards = _steps(request)[1] * len(request.controls) * CONTROLNET_SHARE
    whole = transformer.forward(image + prefix)  # every step's forward, without a prefix cache
    if not transformer.prefix_cache:
        return whole * (_forwards(request) + controlnet_forwards)
    # The first step runs the whole sequence (the prefix attends block-causally: about half its pairs) and
    # caches the prefix's keys and values; every later step runs the image tokens against them.
    first = transformer.forward(image + prefix, pairs=prefix**2 / 2 + image * (prefix + image))
    later = transformer.forward(image, pairs=image * (prefix + image))
    steps = _steps(request)[0]
    passes = 2 if request.uses_cfg else 1
    return passes * (first + max(steps - 1, 0) * later) + whole * controlnet_forwards


def batch_overhead(request: Request, family: ModelFamily | None = None) -> float:
    """What one batch of rows like `request` costs beyond the rows themselves, in the same units."""
    return BATCH_OVERHEAD * _reference_forward(_transformer(family)) * _forwards(request)


def _tiebreak(row_id: str) -> bytes:
    return hashlib.sha256(b"qwen-batch/shard/" + row_id.encode("utf-8")).digest()


@dataclass
class _Group:
    """Rows that cost the same and can share a batch, and how many of them each shard takes. All are priced as
    the first: only a ControlNet row's control range can differ within one (it is not part of the batch key),
    and the batch's ControlNet runs on every step any of its rows' ranges covers anyway."""

    rows: list[Request]  # in a fixed order that does not depend on the manifest's row order
    row_cost: float
    overhead: float
    counts: list[int]

    def load(self, count: int, batch_size: int) -> float:
        return count * self.row_cost + math.ceil(count / batch_size) * self.overhead


def _groups(requests: Sequence[Request], shards: int, family: ModelFamily | None) -> list[_Group]:
    by_key: dict[tuple, list[Request]] = {}
    for request in requests:
        by_key.setdefault((*request.batch_key, len(request.images)), []).append(request)
    groups = []
    for rows in by_key.values():
        rows.sort(key=lambda request: _tiebreak(request.id))
        groups.append(_Group(rows, predicted_cost(rows[0], family), batch_overhead(rows[0], family), [0] * shards))
    groups.sort(key=lambda group: (-group.row_cost, _tiebreak(group.rows[0].id)))
    return groups


def _shard_loads(groups: list[_Group], shards: int, batch_size: int) -> list[float]:
    return [sum(group.load(group.counts[shard], batch_size) for group in groups) for shard in range(shards)]


def _deal(groups: list[_Group], shards: int, batch_size: int, unit: int) -> None:
    """Longest-processing-time-first over pieces of `unit` rows of a group (its last piece may be smaller)."""
    pieces = []
    for index, group in enumerate(groups):
        for start in range(0, len(group.rows), unit):
            size = min(unit, len(group.rows) - start)
            pieces.append((size * group.row_cost, index, size))
    pieces.sort(key=lambda piece: (-piece[0], piece[1]))
    for group in groups:
        group.counts = [0] * shards
    loads = [(0.0, shard) for shard in range(shards)]  # a heap of (predicted time so far, shard)
    for _, index, size in pieces:
        load, shard = heapq.heappop(loads)
        group = groups[index]
        have = group.counts[shard]
        group.counts[shard] = have + size
        heapq.heappush(loads, (load + group.load(have + size, batch_size) - group.load(have, batch_size), shard))


def _pieces(group: _Group, count: int, batch_size: int) -> list[int]:
    """Row counts worth moving off a shard that holds `count` rows of the group: one row, a batch, the partial one."""
    return sorted({1, min(count, batch_size), count % batch_size} - {0}) if count else []


def _exchanges(groups: list[_Group], source: int, target: int, batch_size: int, compound: bool) -> Iterator[tuple]:
    """Rows moved between two shards: one piece from source to target or, when `compound`, up to two
    pieces there and one back (two full batches can trade places with one that costs as much)."""
    there = [(g, k) for g, group in enumerate(groups) for k in _pieces(group, group.counts[source], batch_size)]
    back = [(g, -k) for g, group in enumerate(groups) for k in _pieces(group, group.counts[target], batch_size)]
    # Pairs and triples grow with the square and cube of the pieces: tried only while that stays small
    # (a manifest of a few sizes and step counts); with many groups, single moves balance well enough.
    swaps = compound and len(there) * len(back) <= EXCHANGE_LIMIT
    triples = swaps and len(there) ** 2 * len(back) <= 2 * EXCHANGE_LIMIT
    for index, first in enumerate(there):
        yield (first,)
        for returned in back if swaps else ():
            yield first, returned
        for second in there[index + 1 :] if triples else ():
            yield first, second
            for returned in back:
                yield first, second, returned


def _loads_after(
    groups: list[_Group], loads: list[float], source: int, target: int, exchange: tuple, batch_size: int
) -> tuple[float, float, dict[int, int]] | None:
    moved: dict[int, int] = {}
    for index, count in exchange:
        moved[index] = moved.get(index, 0) + count
    source_load, target_load = loads[source], loads[target]
    for index, count in moved.items():
        group = groups[index]
        have, has = group.counts[source], group.counts[target]
        if count > have or -count > has:
            return None
        source_load += group.load(have - count, batch_size) - group.load(have, batch_size)
        target_load += group.load(has + count, batch_size) - group.load(has, batch_size)
    return source_load, target_load, moved


def _best_exchange(groups: list[_Group], loads: list[float], batch_size: int) -> tuple[int, int, dict[int, int]] | None:
    """The exchange with another shard that lowers the slowest shard's time the most (then adds the least work)."""
    shards = len(loads)
    slowest = max(range(shards), key=lambda s: (loads[s], -s))
    # The lightest shards are where work can go; with hundreds of shards, trying them all costs more
    # than it finds.
    lightest = heapq.nsmallest(TARGETS, (s for s in range(shards) if s != slowest), key=lambda s: (loads[s], s))
    best, best_key = None, (loads[slowest], 0.0)
    for rank, target in enumerate(lightest):
        # Compound exchanges only with the few lightest shards: they are where the work can go, and the
        # number of compound exchanges grows with the cube of the groups.
        for exchange in _exchanges(groups, slowest, target, batch_size, compound=rank < COMPOUND_TARGETS):
            after = _loads_after(groups, loads, slowest, target, exchange, batch_size)
            if after is None:
                continue
            source_load, target_load, moved = after
            key = (max(source_load, target_load), source_load + target_load - loads[slowest] - loads[target])
            if key < best_key and key[0] < loads[slowest] * (1 - 1e-12):
                best, best_key = (slowest, target, moved), key
    return best


def _improve(groups: list[_Group], shards: int, batch_size: int) -> None:
    # Each exchange lowers the slowest shard and leaves the other below where it was: no cycles.
    loads = _shard_loads(groups, shards, batch_size)
    for _ in range(max(MIN_MOVES, MOVES_PER_SPLIT // shards)):
        exchange = _best_exchange(groups, loads, batch_size)
        if exchange is None:
            return
        source, target, moved = exchange
        for index, count in moved.items():
            groups[index].counts[source] -= count
            groups[index].counts[target] += count
        for shard in (source, target):
            loads[shard] = sum(group.load(group.counts[shard], batch_size) for group in groups)


def assign_shards(
    requests: Sequence[Request], shards: int, batch_size: int | None = None, family: ModelFamily | None = None
) -> dict[str, int]:
    """Row id -> shard (0..shards-1), balancing predicted time in whole batches; deterministic for a manifest.

    `batch_size` is the run's --batch-size; None (left to the memory planner) plans for the default,
    so every shard and the fan-out parent, given the same setting, compute the same split. `family` is the
    model's (its transformer's costs; None: Qwen-Image's).
    """
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, not {shards}")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
    groups = _groups(requests, shards, family)
    # Two starts, each improved by moving rows: whole batches dealt out (few partial batches), and rows
    # dealt out one by one (fine-grained balance). The better of the two is kept.
    best: tuple[tuple[float, float], list[list[int]]] | None = None
    for unit in (batch_size, 1):
        _deal(groups, shards, batch_size, unit)
        _improve(groups, shards, batch_size)
        loads = _shard_loads(groups, shards, batch_size)
        score = (max(loads), sum(loads))
        if best is None or score < best[0]:
            best = (score, [list(group.counts) for group in groups])
    for group, counts in zip(groups, best[1], strict=True):
        group.counts = counts
    assignment: dict[str, int] = {}
    for group in groups:
        rows = iter(group.rows)
        for shard, count in enumerate(group.counts):
            for _ in range(count):
                assignment[next(rows).id] = shard
    return assignment


def shard_costs(
    requests: Sequence[Request],
    assignment: dict[str, int],
    shards: int,
    batch_size: int | None = None,
    family: ModelFamily | None = None,
) -> list[float]:
    """Each shard's predicted time (its rows, and the batches they make), to report the balance."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    groups = _groups(requests, shards, family)
    for group in groups:
        for request in group.rows:
            group.counts[assignment[request.id]] += 1
    return _shard_loads(groups, shards, batch_size)


def idle_tail(costs: Sequence[float]) -> float:
    """The share of the slowest shard's time the others wait, on average: 0 is perfectly balanced."""
    slowest = max(costs, default=0.0)
    if not slowest:
        return 0.0
    return sum(slowest - cost for cost in costs) / (len(costs) * slowest)
