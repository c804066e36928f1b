"""Step caching per row (docs/step-cache.md): diffusers' FirstBlockCache and TaylorSeer, row by row.

The contract, on the CPU in float32 with the tiny model, within 2/255 per pixel: a row with a step cache gives
the image diffusers' `QwenImagePipeline` gives with `transformer.enable_cache(...)` of the same settings, and the
same image and the same count of fully computed steps alone, batched with rows of other prompts (whose
decisions differ), in a run mixing other specs, sizes and rows without a cache, packed or padded, with CFG's
halves joint or split, in a shard, and on resume. The thresholds come from the tiny model's measured relative
changes (0.18-0.6 a step, nearly the same for every prompt): 0.3 computes 6 of 8 steps, 0.48 two or three (a
different count for rows of one batch), 0.6 reuses all but two; each is at least 1e-3 from every change it is
compared with (`Margins`), so no decision the tests rely on is within rounding of its threshold.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.errors import ConfigError
from qwen_batch.manifest import RowDefaults, read_manifest, validate_table
from qwen_batch.outputs.png import PARAMETERS_KEY, read_png_metadata
from qwen_batch.pipeline.step_cache import FirstBlock, TaylorSeer, parse_step_cache
from qwen_batch.pipeline.step_cache.first_block import FirstBlockRows, sub_batch_size
from qwen_batch.pipeline.step_cache.spec import StepCacheError, normalized
from qwen_batch.run.engine import RunConfig, run
from tests.support import (
    differing_images,
    diffusers_adapters,
    diffusers_reference,
    fa4_layout,
    pixels,
    small_row,
    write_manifest,
)

TOLERANCE = 2  # of 255
STEPS = 8
FOX = "A red fox running through a snowy birch forest under a full moon"
ROWS = [
    small_row("fox-03", FOX, seed=0, step_cache="first-block:0.3"),
    small_row("fox-048", FOX, seed=0, step_cache="first-block:0.48"),
    small_row("cat-048", "a cat", negative_prompt="blurry", seed=1, step_cache="first-block:0.480"),
    small_row("zh-048", "一只在月光下奔跑的狐狸", seed=2, step_cache="first-block:0.48"),
    small_row("fox-06", FOX, seed=0, step_cache="first-block:0.6"),  # reuses most steps
    small_row("fox-06-w3", FOX, seed=0, step_cache="first-block:0.6,warmup=3"),  # but not its first 3
    small_row("lighthouse-048", "a lighthouse in a storm", seed=3, true_cfg_scale=1.0, step_cache="first-block:0.48"),
    small_row("fox-ts", FOX, seed=0, step_cache="taylorseer"),
    small_row("cat-ts", "a cat", negative_prompt="blurry", seed=1, step_cache="taylorseer:interval=2,warmup=1,order=2"),
    small_row("fox", FOX, seed=0),  # the cached rows' twin without a cache
    small_row("wide-032", FOX, seed=0, width=384, step_cache="first-block:0.32"),
]  # fmt: skip
for _row in ROWS:
    _row["num_inference_steps"] = STEPS
IDS = [row["id"] for row in ROWS]


def results(output) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}


def counts(output) -> dict[str, tuple]:
    return {key: (row["steps_computed"], row["uncond_steps_computed"]) for key, row in results(output).items()}


MARGIN = 1e-3  # a row's relative change moved by under 1e-6 of itself between batch sizes (docs/step-cache.md)


class Margins:
    """Records how far each first-block decision's relative change was from its threshold: a decision within
    rounding of it could go either way, and a test relying on it would pass by luck."""

    def __init__(self, patch: pytest.MonkeyPatch):
        self.closest = float("inf")
        decide = FirstBlockRows.decide

        def recording(cache, rows, residual, forward, step):
            if rows.head is not None and step >= cache.warmup:
                previous = rows.head
                change = (residual - previous).abs().mean(dim=(1, 2)) / previous.abs().mean(dim=(1, 2))
                self.closest = min(self.closest, float((change.double() - cache.threshold).abs().min()))
            return decide(cache, rows, residual, forward, step)

        patch.setattr(FirstBlockRows, "decide", recording)

    def check(self) -> None:
        assert self.closest > MARGIN, f"a decision was {self.closest:.1e} from its threshold: choose another"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The manifest alone (batches of 1) and batched (4): the batched run mixes specs, sizes and a row without a
    cache, and puts the first-block:0.48 rows with CFG (fox, cat, zh) in one batch."""
    folder = tmp_path_factory.mktemp("step-cache")
    manifest = write_manifest(folder / "m.parquet", ROWS)
    outputs = {}
    with pytest.MonkeyPatch.context() as patch:
        margins = Margins(patch)
        for batch_size in (1, 4):
            outputs[batch_size] = folder / f"batch{batch_size}"
            summary = run(RunConfig(str(manifest), str(outputs[batch_size]), batch_size=batch_size, device="cpu"))
            assert summary.exit_code == 0 and summary.generated == len(ROWS), summary.problems
    margins.check()
    return manifest, outputs


def _cache_config(spec):
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if isinstance(spec, FirstBlock):
        return FirstBlockCacheConfig(threshold=spec.threshold)
    return TaylorSeerCacheConfig(
        cache_interval=spec.interval,
        disable_cache_before_step=spec.warmup,
        max_order=spec.order,
        disable_cache_after_step=spec.until,
        use_lite_mode=True,
        taylor_factors_dtype=torch.float32,  # the model's dtype, as qwen-batch keeps them
    )


def _warm_up(pipe, steps: int) -> None:
    """cache-dit's warm-up steps on diffusers' FirstBlockCache, which has none: its head hook computes each
    cache context's (pass's) first `steps` forwards as if above the threshold, keeping their residuals as it
    keeps any computed step's."""
    from collections import Counter

    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = HookRegistry.check_if_exists_or_initialize(pipe.transformer.transformer_blocks[0])
    hook = head.get_hook(_FBC_LEADER_BLOCK_HOOK)
    decide, forwards = hook._should_compute_remaining_blocks, Counter()

    def warming_up(residual):
        context = id(hook.state_manager.get_state())  # one state per context, alive for the whole call
        forwards[context] += 1
        return forwards[context] <= steps or decide(residual)

    hook._should_compute_remaining_blocks = warming_up


def cached_reference(pipe, request, call=diffusers_reference) -> np.ndarray:
    """diffusers' image for a row, with `enable_cache` of the row's spec (reset after every call)."""
    spec = parse_step_cache(request.step_cache)
    pipe.transformer.enable_cache(_cache_config(spec))
    if isinstance(spec, FirstBlock) and spec.warmup:
        _warm_up(pipe, spec.warmup)
    try:
        image = call(pipe, request)
    finally:
        pipe.transformer.disable_cache()
    return pixels(image)


def test_rows_match_diffusers_with_the_same_cache(runs, tiny_model):
    from diffusers import QwenImagePipeline

    manifest, outputs = runs
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    compared = []
    for request in read_manifest(str(manifest)).requests:
        if request.step_cache is None:
            continue
        reference = cached_reference(pipe, request)
        for batch_size, output in outputs.items():
            ours = pixels(output / "images" / f"{request.id}.png")
            assert np.abs(ours - reference).max() <= TOLERANCE, (request.id, batch_size)
            compared.append((request.id, batch_size))
    cached = [row["id"] for row in ROWS if row.get("step_cache")]
    assert len(cached) == len(ROWS) - 1  # all but the twin without a cache
    assert sorted(compared) == sorted((key, batch_size) for key in cached for batch_size in (1, 4))


def test_a_row_is_the_same_alone_and_batched_and_computes_the_same_steps(runs):
    _, outputs = runs
    assert not differing_images(IDS, outputs[4], outputs[1], TOLERANCE)
    assert counts(outputs[4]) == counts(outputs[1])


def test_the_caches_act_and_decide_row_by_row(runs):
    """Guards the tests above: the steps really are reused (the image changes), some thresholds compute some
    steps and not others, and rows of one batch and one spec decide differently (the sub-batch path)."""
    _, outputs = runs
    computed = counts(outputs[4])
    assert computed["fox"] == (None, None)
    assert computed["fox-06"][0] <= 2, "first-block:0.6 reuses most steps"
    assert 3 <= computed["fox-06-w3"][0] < STEPS, "first-block:0.6,warmup=3 computes its first 3 steps, then reuses"
    assert all(1 < steps < STEPS for steps, _ in (computed["fox-03"], computed["fox-048"], computed["cat-048"]))
    batch = [computed[row] for row in ("fox-048", "cat-048", "zh-048")]
    assert len(set(batch)) > 1, "rows of one batch and one threshold made different decisions"
    assert any(steps != uncond for steps, uncond in batch), "a row's two passes decided apart"
    assert computed["lighthouse-048"][1] is None
    assert computed["fox-ts"] == (4, 4)  # steps 0, 1, 2 (warm-up) and 4 of 8
    assert computed["cat-ts"] == (4, 4)  # steps 0, 2, 4, 6
    plain = pixels(outputs[1] / "images" / "fox.png")
    for row in ("fox-03", "fox-06", "fox-ts"):
        assert np.abs(pixels(outputs[1] / "images" / f"{row}.png") - plain).max() > 20, row
    reused_early = pixels(outputs[1] / "images" / "fox-06.png")
    assert np.abs(pixels(outputs[1] / "images" / "fox-06-w3.png") - reused_early).max() > 20, "warm-up acts"


@pytest.mark.parametrize("lever", ["fa4 layout, text packed", "text packed to fp8's minimum", "joint CFG"])
def test_speed_levers_keep_images_and_decisions(runs, tmp_path, monkeypatch, lever):
    """FlashAttention-4's layout with the text stream packed (each sub-batch packs its own rows' text), also to
    fp8's minimum of tokens (cuBLASLt refuses fp8 GEMMs of 1-32 text tokens; a sub-batch of one or two rows
    stopped an fp8 run on an H200), and CFG's halves as one forward of twice the rows (the CPU's default is
    two): the same images and counts."""
    from dataclasses import replace

    import qwen_batch.pipeline.denoise.text
    import qwen_batch.pipeline.step_cache.first_block as first_block
    from qwen_batch.pipeline.denoise import ImageGenerator

    if lever == "joint CFG":
        monkeypatch.setattr(qwen_batch.pipeline.denoise.text, "CFG_LAYOUT", "joint")
        packs = []
    else:
        packs = fa4_layout(monkeypatch, packed=True)
    minimum = qwen_batch.pipeline.denoise.text.FP8_PACKED_TEXT_MINIMUM if lever == "text packed to fp8's minimum" else 0
    if minimum:  # as under fp8 matmuls, which the CPU does not run
        init = ImageGenerator.__init__

        def with_fp8_text_minimum(generator, *args, **kwargs):
            init(generator, *args, **kwargs)
            components = generator.components
            components.text_layout = replace(components.text_layout, packed_minimum=minimum)

        monkeypatch.setattr(ImageGenerator, "__init__", with_fp8_text_minimum)
    sub_batch_texts = []
    packed_tokens = first_block._packed_tokens

    def recording_packed_tokens(*args):
        tokens, places = packed_tokens(*args)
        sub_batch_texts.append(tokens.numel())
        return tokens, places

    monkeypatch.setattr(first_block, "_packed_tokens", recording_packed_tokens)
    sizes = []
    bucket = first_block.sub_batch_size
    monkeypatch.setattr(first_block, "sub_batch_size", lambda n, rows: sizes.append((n, rows)) or bucket(n, rows))
    manifest, outputs = runs
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu"))
    assert summary.generated == len(ROWS)
    assert not differing_images(IDS, tmp_path / "out", outputs[4], TOLERANCE)
    assert counts(tmp_path / "out") == counts(outputs[4])
    assert any(bucket(n, rows) < rows for n, rows in sizes), "a sub-batch ran fewer rows than its forward"
    assert bool(packs) == bool(sub_batch_texts) == (lever != "joint CFG")
    lengths = packs + sub_batch_texts
    assert all(length >= minimum for length in lengths), lengths
    if minimum:
        assert min(lengths) == minimum, "no packed text was short enough to need filler"


def test_a_shard_gives_each_row_the_same_image(runs, tmp_path):
    manifest, outputs = runs
    for shard in (0, 1):
        config = RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu", shard=f"{shard}/2")
        assert run(config).exit_code == 0
    assert not differing_images(IDS, tmp_path / "out", outputs[1], TOLERANCE)
    run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu"))  # merges, generates nothing
    assert counts(tmp_path / "out") == counts(outputs[1])


def test_resume_skips_done_rows_and_a_changed_spec_regenerates_its_row(tmp_path, tiny_model):
    rows = [
        small_row("a", FOX, seed=0, num_inference_steps=4, step_cache="first-block:0.4"),
        small_row("b", "a cat", seed=1, num_inference_steps=4, step_cache="first-block:0.4"),
        small_row("c", "a dog", seed=2, num_inference_steps=4),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    assert run(RunConfig(str(manifest), str(output), device="cpu")).generated == 3
    again = run(RunConfig(str(manifest), str(output), device="cpu"))
    assert (again.generated, again.skipped) == (0, 3)
    before = {row_id: (output / "images" / f"{row_id}.png").read_bytes() for row_id in "abc"}
    rows[1]["step_cache"] = "taylorseer:interval=2"
    write_manifest(manifest, rows)
    changed = run(RunConfig(str(manifest), str(output), device="cpu"))
    assert (changed.generated, changed.skipped) == (1, 2)
    assert (output / "images" / "b.png").read_bytes() != before["b"]
    assert all((output / "images" / f"{row_id}.png").read_bytes() == before[row_id] for row_id in "ac")
    assert results(output)["b"]["step_cache"] == "taylorseer:interval=2,warmup=3,order=1"
    # Another spelling of the same spec is the same spec: nothing to do.
    rows[1]["step_cache"] = "TaylorSeer:cache_interval=2, max_order=1"
    write_manifest(manifest, rows)
    assert run(RunConfig(str(manifest), str(output), device="cpu")).skipped == 3


def test_results_and_png_say_which_cache_ran_and_how_many_steps_it_computed(runs):
    _, outputs = runs
    recorded = results(outputs[4])
    assert recorded["cat-048"]["step_cache"] == "first-block:0.48"  # normalized from 0.480
    assert recorded["fox"]["step_cache"] is None
    png = (outputs[4] / "images" / "cat-048.png").read_bytes()
    metadata = read_png_metadata(png)
    assert metadata["step_cache"] == "first-block:0.48"
    assert (metadata["steps_computed"], metadata["uncond_steps_computed"]) == counts(outputs[4])["cat-048"]
    with Image.open(io.BytesIO(png)) as image:
        steps, uncond = counts(outputs[4])["cat-048"]
        assert (
            f"Step cache: first-block:0.48, steps computed: {steps} (negative prompt {uncond})"
            in image.text[PARAMETERS_KEY]
        )
    assert "step_cache" not in read_png_metadata((outputs[4] / "images" / "fox.png").read_bytes())


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("bogus", "step_cache 'bogus' is not a step cache: use none, first-block:T"),
        ("first-block:2", "the threshold 2 is out of range: use a number above 0 and at most 1"),
        ("first-block", "give first-block its threshold, a number such as first-block:0.1"),
        ("first-block:0.1,warm=3", "'warm' is not a first-block setting: give the threshold, then warmup=N"),
        ("first-block:0.1,warmup=x", "give warmup a whole number from 0 to 200"),
        ("taylorseer:interval=0", "give interval a whole number from 1 to 200"),
        ("taylorseer:every=3", "'every' is not a TaylorSeer setting: use interval, warmup, order, until"),
    ],
)
def test_a_bad_spec_makes_its_row_invalid_with_the_fix(spec, reason):
    import pyarrow as pa

    table = pa.table({"id": ["good", "bad"], "prompt": ["a", "b"], "step_cache": ["first-block:0.1", spec]})
    manifest = validate_table(table)
    assert [request.id for request in manifest.requests] == ["good"]
    (invalid,) = manifest.invalid
    assert (invalid.index, invalid.id) == (1, "bad") and reason in invalid.reason, invalid.reason
    assert "row 1 (id 'bad'): step_cache" in manifest.report()


def test_the_run_default_fills_empty_cells_and_none_turns_it_off():
    import pyarrow as pa

    table = pa.table(
        {"id": ["empty", "blank", "off", "own"], "prompt": ["a"] * 4, "step_cache": [None, " ", "none", "taylorseer"]}
    )
    requests = validate_table(table, defaults=RowDefaults(step_cache="first-block:0.10")).requests
    assert [request.step_cache for request in requests] == [
        "first-block:0.1",
        "first-block:0.1",
        None,
        "taylorseer:interval=5,warmup=3,order=1",
    ]
    with pytest.raises(ConfigError, match="--step-cache 'first-block:x'"):
        RowDefaults(step_cache="first-block:x")


def test_the_cli_takes_a_run_default_and_refuses_a_bad_one(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", FOX, seed=0, num_inference_steps=4)])
    output = tmp_path / "out"
    assert main(["run", str(manifest), "-o", str(output), "--step-cache", "bogus", "-q"]) == 2
    assert "--step-cache 'bogus' is not a step cache" in capsys.readouterr().err
    assert not output.exists(), "nothing written"
    assert main(["run", str(manifest), "-o", str(output), "--device", "cpu", "--step-cache", "first-block:0.4"]) == 0
    row = results(output)["a"]
    assert row["step_cache"] == "first-block:0.4" and row["steps_computed"] >= 1
    # The summary says how much of the cached rows' work ran in full: 4 steps, conditional and negative passes.
    computed = row["steps_computed"] + row["uncond_steps_computed"]
    assert f"step cache  {computed} of 8 steps computed in full" in capsys.readouterr().out


def test_the_flow_summary_shows_the_step_cache_only_when_a_row_used_one():
    from flows.qwen_image_batch import summary_metrics
    from qwen_batch.pipeline.encode import EncodeStats
    from qwen_batch.run.summary import DenoiseStats, Summary

    def report(cached_steps: int, computed: int) -> dict:
        denoise = DenoiseStats(generated=2, seconds=4.0, cached_steps=cached_steps, cached_steps_computed=computed)
        return Summary(2, 2, 0, 0, 0, EncodeStats(), denoise, "out", "out/results.parquet", []).to_dict()

    assert "step cache: steps computed / run" not in dict(summary_metrics(report(0, 0)))
    assert dict(summary_metrics(report(100, 37)))["step cache: steps computed / run"] == "37 / 100"


def test_the_flow_parameter_is_checked_and_normalized():
    from pydantic import ValidationError

    from flows.parameters import BatchParameters

    assert BatchParameters(step_cache="first-block:0.10").run_config().row_defaults.step_cache == "first-block:0.1"
    assert BatchParameters().run_config().row_defaults.step_cache is None
    warm = BatchParameters(step_cache="first-block:0.12, warmup=4")
    assert warm.run_config().row_defaults.step_cache == "first-block:0.12,warmup=4"
    with pytest.raises(ValidationError, match="step_cache"):
        BatchParameters(step_cache="first-block:many")


def test_specs_normalize_and_taylorseer_follows_diffusers_schedule():
    from diffusers import TaylorSeerCacheConfig
    from diffusers.hooks.hooks import CacheContext, StateManager
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState

    assert normalized("first-block:threshold=1e-1") == "first-block:0.1"
    assert normalized("first-block:0.10,warmup=0") == "first-block:0.1", "no warm-up: the spec as it always was"
    assert normalized("First-Block: threshold=0.12, WARMUP=4") == "first-block:0.12,warmup=4"
    assert parse_step_cache("first-block:0.12,warmup=4") == FirstBlock(0.12, warmup=4)
    assert normalized(" None ") is None and normalized(None) is None
    assert parse_step_cache("taylorseer:disable_cache_after_step=40") == TaylorSeer(until=40)
    with pytest.raises(StepCacheError, match="given twice"):
        parse_step_cache("taylorseer:order=1,max_order=2")
    for spec in (TaylorSeer(), TaylorSeer(interval=2, warmup=1, order=2), TaylorSeer(interval=3, warmup=4, until=12)):
        config = TaylorSeerCacheConfig(
            cache_interval=spec.interval, disable_cache_before_step=spec.warmup, disable_cache_after_step=spec.until
        )
        manager = StateManager(TaylorSeerState)
        manager.set_context(CacheContext("cond"))
        hook = TaylorSeerCacheHook(
            config.cache_interval,
            config.disable_cache_before_step,
            torch.float32,
            manager,
            config.disable_cache_after_step,
        )
        assert [spec.computes(step) for step in range(20)] == [hook._measure_should_compute()[0] for _ in range(20)]


def test_sub_batches_come_in_a_few_sizes():
    assert [sub_batch_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [sub_batch_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert {sub_batch_size(n, 16) for n in range(1, 17)} == {1, 2, 4, 8, 16}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_compiled_blocks_compile_once_per_sub_batch_size(tmp_path, tiny_model, monkeypatch, layout):
    """Sub-batches of any count of computing rows reach the compiled blocks in a few sizes, each compiled once with
    its batch dimension static (the batches without a step cache keep their graph); a packed text stream keeps
    its length symbolic, as the whole batch's. Dynamo traces only (the eager backend): no kernels are built."""
    import torch._dynamo

    import qwen_batch.pipeline.step_cache.first_block as first_block
    from qwen_batch.run.engine import denoise_stage, encode_stage, load_generator, plan_run, release_generator

    if layout == "packed":
        fa4_layout(monkeypatch, packed=True)
    graphs, sizes = [], set()

    def backend(graph, example_inputs):
        hidden = next(node for node in graph.graph.nodes if node.name == "l_hidden_states_")
        graphs.append(hidden.meta["example_value"].shape[0])
        return graph.forward

    bucket = first_block.sub_batch_size

    def recorded(computing, rows):
        sizes.update({rows, bucket(computing, rows)})
        return bucket(computing, rows)

    monkeypatch.setattr(first_block, "sub_batch_size", recorded)
    prompts = [FOX, "a lighthouse", "一只猫", "a busy market street with lanterns in the rain", "x", "a ship"]
    rows = [
        small_row(f"r{index}", prompt, seed=index, num_inference_steps=STEPS, step_cache="first-block:0.48")
        for index, prompt in enumerate(prompts)
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=6, device="cpu"))
    encode_stage(plan)
    generator = load_generator(plan.source, plan.device, plan.dtype, plan.memory.denoiser)
    torch._dynamo.reset()
    generator.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    try:
        assert denoise_stage(plan).generated == len(rows)
    finally:
        release_generator()
        torch._dynamo.reset()
    whole = max(sizes)  # the forwards' rows: the batch's, or twice as many with CFG's halves joint
    assert len(sizes) > 1, "sub-batches smaller than their forward ran"
    assert all(isinstance(size, int) for size in graphs), "the batch dimension stays static"
    # The forwards' own size may have two graphs (CFG's halves apart have two text lengths: the plain loop's
    # behaviour, automatic dynamic shapes); each sub-batch size has one.
    assert sorted(size for size in graphs if size != whole) == sorted(sizes - {whole}), "one graph per sub-batch size"


# --- the other kinds of rows take a step cache too ---------------------------------------------------------


def test_edit_rows_match_diffusers_with_the_same_cache(tmp_path, tiny_model, monkeypatch):
    from diffusers import QwenImageEditPipeline

    from qwen_batch.weights.model_source import resolve_model
    from tests.test_edit import diffusers_edit, edit_row, make_input, write_edit_manifest

    (tmp_path / "img").mkdir()
    make_input(tmp_path / "img" / "square.png", (256, 256), 1)
    rows = [
        edit_row("red", "img/square.png", "make it red", seed=1, width=256, height=256, num_inference_steps=STEPS,
                 step_cache="first-block:0.35"),
        edit_row("moon", "img/square.png", "add a moon", seed=2, width=256, height=256, num_inference_steps=STEPS,
                 step_cache="taylorseer:interval=3"),
    ]  # fmt: skip
    manifest = write_edit_manifest(tmp_path / "m.parquet", rows)
    margins = Margins(monkeypatch)
    assert run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=2, device="cpu")).exit_code == 0
    margins.check()
    pipe = QwenImageEditPipeline.from_pretrained(resolve_model("tiny-edit").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        with Image.open(request.images[0]) as opened:
            reference = cached_reference(pipe, request, lambda p, r: diffusers_edit(p, r, [opened.convert("RGB")]))
        ours = pixels(tmp_path / "out" / "images" / f"{request.id}.png")
        assert np.abs(ours - reference).max() <= TOLERANCE, request.id
    assert 1 < results(tmp_path / "out")["red"]["steps_computed"] < STEPS


def test_lightning_adapter_rows_match_diffusers_with_the_same_cache(tmp_path, tiny_model, monkeypatch):
    from diffusers import QwenImagePipeline

    from qwen_batch.tiny.lora import write_tiny_lora

    write_tiny_lora("tiny", tmp_path / "lightning.safetensors", rank=4, layout="kohya", seed=3)
    lightning = {
        "true_cfg_scale": 1.0,
        "scheduler_shift": 3.0,
        "loras": [{"path": "lightning.safetensors", "scale": 1.0}],
    }
    rows = [
        small_row("fast", FOX, seed=3, num_inference_steps=STEPS, step_cache="first-block:0.35", **lightning),
        small_row("fast-2", "a cat", seed=4, num_inference_steps=STEPS, step_cache="first-block:0.35", **lightning),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    margins = Margins(monkeypatch)
    assert run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=2, device="cpu")).exit_code == 0
    margins.check()
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        with diffusers_adapters(pipe, request):
            reference = cached_reference(pipe, request)
        ours = pixels(tmp_path / "out" / "images" / f"{request.id}.png")
        assert np.abs(ours - reference).max() <= TOLERANCE, request.id
    steps = [row["steps_computed"] for row in results(tmp_path / "out").values()]
    assert all(1 < count < STEPS for count in steps), steps


def test_control_rows_match_diffusers_with_the_same_cache(tmp_path, tiny_model, monkeypatch):
    """A reused step adds every block's ControlNet sample to block 0's output and the row's tail residual, as
    diffusers' skipped blocks let the transformer's loop add them."""
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline

    from qwen_batch.tiny.controlnet import ensure_tiny_controlnet
    from tests.test_controlnet_rows import _edges

    controlnet = ensure_tiny_controlnet("union")
    edges = _edges(tmp_path / "edges.png", 0)
    rows = [
        small_row("lamp", "a lamp", control_image=[edges], seed=1, num_inference_steps=STEPS, step_cache="first-block:0.4"),
        small_row("chair", "a chair", control_image=[edges], control_scale=[0.7], control_end=0.6, seed=2,
                  num_inference_steps=STEPS, step_cache="first-block:0.4"),
        small_row("vase", "a vase", control_image=[edges], seed=3, num_inference_steps=STEPS,
                  step_cache="taylorseer:interval=2,warmup=2"),
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = RunConfig(str(manifest), str(tmp_path / "out"), batch_size=2, device="cpu", controlnet=str(controlnet))
    margins = Margins(monkeypatch)
    assert run(config).exit_code == 0
    margins.check()
    net = QwenImageControlNetModel.from_pretrained(str(controlnet), torch_dtype=torch.float32)
    pipe = QwenImageControlNetPipeline.from_pretrained(str(tiny_model), controlnet=net, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def controlled(pipe, request):
        start, end = request.control_range
        return diffusers_reference(
            pipe,
            request,
            control_image=Image.open(edges).convert("RGB"),
            controlnet_conditioning_scale=request.controls[0].scale,
            control_guidance_start=start,
            control_guidance_end=end,
        )

    for request in read_manifest(str(manifest)).requests:
        ours = pixels(tmp_path / "out" / "images" / f"{request.id}.png")
        assert np.abs(ours - cached_reference(pipe, request, controlled)).max() <= TOLERANCE, request.id
    assert 1 < results(tmp_path / "out")["lamp"]["steps_computed"] < STEPS


def test_image_to_image_and_inpainting_rows_match_diffusers_with_the_same_cache(tmp_path, tiny_model, monkeypatch):
    """Rows that start from an image count their steps from the first one that runs, as diffusers' do."""
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

    from tests.test_image_start import _mask, _photo, _reference

    photo, mask = _photo(tmp_path / "photo.png"), _mask(tmp_path / "mask.png")
    rows = [
        small_row("i2i", "a watercolor", init_image=photo, strength=0.8, seed=1, num_inference_steps=10,
                  step_cache="first-block:0.3"),
        small_row("inpaint", "a red apple", init_image=photo, mask_image=mask, strength=0.9, seed=4,
                  num_inference_steps=10, step_cache="taylorseer:interval=2,warmup=2"),
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    margins = Margins(monkeypatch)
    assert run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=2, device="cpu")).exit_code == 0
    margins.check()
    requests = {request.id: request for request in read_manifest(str(manifest)).requests}
    for kind, row_id, extra in (
        (QwenImageImg2ImgPipeline, "i2i", {}),
        (QwenImageInpaintPipeline, "inpaint", {"mask_image": Image.open(mask).convert("RGB")}),
    ):
        pipe = kind.from_pretrained(str(tiny_model), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.enable_cache(_cache_config(parse_step_cache(requests[row_id].step_cache)))
        try:
            reference = _reference(pipe, requests[row_id], **extra)
        finally:
            pipe.transformer.disable_cache()
        assert np.abs(pixels(tmp_path / "out" / "images" / f"{row_id}.png") - reference).max() <= TOLERANCE, row_id
    computed = counts(tmp_path / "out")
    assert 1 < computed["i2i"][0] < 8  # strength 0.8 of 10 steps: 8 run
    assert computed["inpaint"] == (5, 5)  # 9 run: steps 0, 1 (warm-up), 3, 5, 7
