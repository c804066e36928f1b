"""Shards of equal predicted GPU time: a mixed manifest does not leave one GPU idle at the end."""

from __future__ import annotations

import random

import pytest

from qwen_batch.manifest import Request
from qwen_batch.sharding import assign_shards, idle_tail, predicted_cost, shard_costs


def request(row_id: str, width: int = 1024, height: int = 1024, steps: int = 50, cfg: float = 4.0, images=()):
    return Request(
        index=0,
        id=row_id,
        prompt="p",
        negative_prompt=" ",
        width=width,
        height=height,
        seed=0,
        num_inference_steps=steps,
        true_cfg_scale=cfg,
        images=tuple(images),
    )


def hash_split(requests, shards):
    """The split by a hash of the id that shards used before: fair only when rows cost the same."""
    import hashlib

    return {r.id: int.from_bytes(hashlib.sha256(r.id.encode()).digest()[:8], "big") % shards for r in requests}


def test_cost_grows_with_size_steps_guidance_and_edit_inputs():
    base = predicted_cost(request("a"))
    assert predicted_cost(request("a", 1664, 928)) > base * 1.4  # 6,032 vs 4,096 image tokens, attention grows faster
    assert predicted_cost(request("a", 512, 512)) < base / 4
    assert predicted_cost(request("a", steps=25)) == pytest.approx(base / 2)
    assert predicted_cost(request("a", cfg=1.0)) == pytest.approx(base / 2)
    assert predicted_cost(request("a", images=["x.png"])) > base * 2  # the input image's tokens join the sequence


def test_a_mixed_manifest_is_balanced_by_cost_not_by_row_count():
    rng = random.Random(0)
    sizes = [(512, 512), (1664, 928)]
    requests = [request(f"r{n}", *rng.choice(sizes), steps=rng.choice([20, 50])) for n in range(400)]
    for shards in (2, 3, 8):
        balanced = shard_costs(requests, assign_shards(requests, shards), shards)
        hashed = shard_costs(requests, hash_split(requests, shards), shards)
        assert idle_tail(balanced) < 0.002, shards  # within one light row of each other
        assert idle_tail(hashed) > 5 * idle_tail(balanced), shards


def test_every_row_lands_in_exactly_one_shard_and_the_split_is_the_same_in_every_process():
    requests = [request(f"r{n}", 256 + 16 * (n % 20), 512, steps=2 + n % 7) for n in range(300)]
    first = assign_shards(requests, 4)
    assert set(first) == {r.id for r in requests} and set(first.values()) == {0, 1, 2, 3}
    shuffled = list(reversed(requests))  # order of the manifest's rows does not matter
    assert assign_shards(shuffled, 4) == first
    assert assign_shards(requests, 1) == dict.fromkeys(first, 0)
    with pytest.raises(ValueError):
        assign_shards(requests, 0)


def test_idle_tail_of_a_perfect_and_a_lopsided_split():
    assert idle_tail([10.0, 10.0]) == 0.0
    assert idle_tail([10.0, 5.0]) == pytest.approx(0.25)  # one GPU idle for half the time: a quarter overall
    assert idle_tail([]) == 0.0
