"""On a CUDA GPU (`pytest -m gpu`): step caching per row on the fast paths the CPU tests cannot run.

The CPU tests (tests/test_step_cache.py) hold the arithmetic to diffusers' caches. Here, on the tiny model in
bf16 with the blocks compiled by Inductor and FlashAttention-4 where it is installed (the text stream packed,
CFG's halves joint), what only a GPU shows: sub-batches of every size run compiled, each size compiled once
(no recompile on the next batch), a first-block forward waits for the GPU exactly once (its `[rows]`
decisions coming home), not once per row or block, and the offload modes, which stream the blocks' weights
from host memory through hooks, make a step-cached row's decisions and image as the resident mode does.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.gpu

STEPS, ROWS = 6, 4


def _generator():
    from qwen_batch.memory.placement import Placement
    from qwen_batch.pipeline.denoise import ImageGenerator
    from qwen_batch.weights.model_source import resolve_model

    return ImageGenerator(resolve_model("tiny"), "cuda", torch.bfloat16, Placement("bf16", compile=True))


def _batch(generator, spec: str, seed: int = 0):
    from qwen_batch.manifest import Request

    hidden = generator.pipe.transformer.config.joint_attention_dim
    requests = [Request(n, f"r{n}", f"p{n}", " ", 256, 256, seed + n, STEPS, 4.0, step_cache=spec) for n in range(ROWS)]
    prompts = [torch.randn(length, hidden) for length in (12, 30, 7, 21)]  # different lengths: packed under fa4
    negatives = [torch.randn(3, hidden) for _ in range(ROWS)]
    return requests, prompts, negatives


def _staggered(step: int, first: int, rows: int) -> list[bool]:
    """Image 3 computes every step, images 0 and 2 on even steps, image 1 on odd ones (a row's two passes
    alike): 2 or 3 images of 4 compute at each step, a sub-batch smaller than the forward."""
    images = [(first + row) % ROWS for row in range(rows)]
    return [image == 3 or (step + image) % 2 == 0 for image in images]


def test_sub_batches_run_compiled_and_compile_once_per_size(monkeypatch):
    import torch._dynamo

    from qwen_batch.pipeline.step_cache import first_block

    torch._dynamo.reset()
    generator = _generator()
    monkeypatch.setattr(first_block, "FORCED", _staggered)
    sizes = []
    bucket = first_block.sub_batch_size
    monkeypatch.setattr(first_block, "sub_batch_size", lambda n, rows: sizes.append(bucket(n, rows)) or bucket(n, rows))
    images = generator.generate(*_batch(generator, "first-block:0.1"))
    assert images.steps_computed == [(3, 3), (4, 4), (3, 3), (6, 6)], "the forced schedule, row by row"
    assert min(sizes) < max(sizes), "sub-batches smaller than the forward ran"
    assert all(np.asarray(picture).std() > 5 for picture in images), "bf16 must not give flat (NaN) images"
    with torch._dynamo.config.patch(error_on_recompile=True):
        list(generator.generate(*_batch(generator, "first-block:0.1", seed=10)))  # the same sizes: no new graph
    generator.close()
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["offload", "sequential"])
def test_streamed_weights_give_the_same_decisions_and_images(tmp_path, tiny_model, monkeypatch, mode):
    """A reused step runs only block 0 through the streaming hooks (and prefetches block 1), a sub-batch runs
    the rest: the same arithmetic as resident bf16, so the same computed steps and images. Resident runs as
    the offload modes do in two ways it would not choose itself, each a rounding difference the tiny model
    amplifies to about 2.5/255: the feed-forwards' GELU as a kernel of its own (its GEMM epilogue rounds once
    instead of twice), and CFG's halves in one forward, the negatives padded and masked (resident SDPA runs
    them apart: 2.2-2.5/255 on the CPU in bf16, rows with and without a step cache alike). So aligned, the
    images on an H200 were identical to the bit (session 12)."""
    import qwen_batch.memory.placement
    import qwen_batch.pipeline.denoise.text
    from qwen_batch.pipeline.step_cache import first_block
    from qwen_batch.run.engine import RunConfig, release_generator, run
    from tests.support import pixels, small_row, write_manifest

    monkeypatch.setattr(qwen_batch.memory.placement, "GELU_EPILOGUE", False)
    monkeypatch.setattr(qwen_batch.pipeline.denoise.text, "CFG_LAYOUT", "joint")
    monkeypatch.setattr(first_block, "FORCED", _staggered)  # sub-batches of 2 and 4 rows, whatever the weights
    rows = [small_row(f"fb{n}", f"prompt {n}", seed=n, step_cache="first-block:0.1") for n in range(ROWS)]
    rows += [
        small_row("ts", "a cat", seed=7, step_cache="taylorseer:interval=2,warmup=1"),
        small_row("plain", "a cat", seed=7),
    ]
    for row in rows:
        row["num_inference_steps"] = STEPS
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    outcomes = {}
    for label in ("bf16", mode):
        release_generator()
        output = tmp_path / label
        summary = run(
            RunConfig(str(manifest), str(output), device="cuda", batch_size=ROWS, memory_mode=label, compile="off")
        )
        release_generator()
        assert summary.exit_code == 0 and summary.generated == len(rows), summary.problems
        table = pq.read_table(output / "results.parquet").to_pylist()
        counts = {row["id"]: (row["steps_computed"], row["uncond_steps_computed"]) for row in table}
        images = {row["id"]: pixels(output / "images" / f"{row['id']}.png") for row in rows}
        outcomes[label] = counts, images
    (counts, images), (streamed_counts, streamed_images) = outcomes["bf16"], outcomes[mode]
    assert streamed_counts == counts
    assert sorted(counts[f"fb{n}"] for n in range(ROWS)) == [(3, 3), (3, 3), (4, 4), (6, 6)], "the forced schedule"
    assert counts["ts"][0] < STEPS, "TaylorSeer predicted some steps"
    differences = {name: np.abs(streamed_images[name] - image) for name, image in images.items()}
    for name, difference in differences.items():
        print(f"{name}: {mode} vs resident mean {difference.mean():.3f}/255, max {difference.max()}/255")
    for name, difference in differences.items():
        assert difference.mean() < 0.1 and difference.max() <= 2, name
        assert images[name].std() > 5, f"{name}: bf16 must not give flat (NaN) images"


def test_a_first_block_forward_waits_for_the_gpu_once():
    """The residual test's `[rows]` decisions are the one device-to-host copy of a forward (none on the first
    step, where every row computes); gathering, packing a sub-batch's text and scattering never wait."""
    generator = _generator()
    batch = _batch(generator, "first-block:0.3")
    list(generator.generate(*batch))  # warm-up: compiles, RoPE tables
    torch.cuda.synchronize()
    forwards = []
    handle = generator.pipe.transformer.register_forward_pre_hook(lambda *args: forwards.append(1))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = generator.generate(*batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        handle.remove()
    list(images)
    waits = [warning for warning in caught if "synchroniz" in str(warning.message)]
    per_step = len(forwards) // STEPS
    assert len(waits) == (STEPS - 1) * per_step, [str(warning.message) for warning in waits[:3]]
    generator.close()
