"""The engine's stages as a flow calls them: chunk by chunk, with a retried chunk doing only what is left."""

from __future__ import annotations

from qwen_batch.run.engine import RunConfig, denoise_stage, encode_stage, finalize, pending, plan_run
from tests.support import small_row, write_manifest


def test_a_retried_chunk_generates_only_the_rows_its_first_attempt_did_not_write(tmp_path, tiny_model):
    rows = [small_row(f"r{n}", f"prompt {n}") for n in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu", batch_size=1))
    assert [request.id for request in plan.todo] == ["r0", "r1", "r2"]
    encode = encode_stage(plan)

    first_attempt = denoise_stage(plan, plan.todo[:2])  # then, say, the bucket failed
    assert first_attempt.generated == 2
    assert [request.id for request in pending(plan, plan.todo)] == ["r2"]

    retry = denoise_stage(plan, pending(plan, plan.todo))
    assert retry.generated == 1
    assert pending(plan, plan.todo) == []
    summary = finalize(plan, encode, retry)
    assert (summary.rows, summary.invalid, summary.failed) == (3, 0, 0)


def test_releasing_a_compiled_generator_frees_its_compiled_graphs(tmp_path, tiny_model, monkeypatch):
    """A process that runs again with another setup (tests, a notebook, a flow's second run) must not meet the last
    generator's compiled graphs: they hold its models, and dynamo caps the graphs of the blocks' one code object at 8,
    which a bf16 and then an fp8 ControlNet run in one process hit on an H100 (rows failed: recompile limit).
    Dynamo traces only (the eager backend)."""
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    from qwen_batch.run.engine import release_generator, run

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda module, *args, **kwargs: compile_module(
            module, *args, **{**kwargs, "options": None, "backend": "eager"}
        ),
    )
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a red fox"), small_row("b", "a lighthouse")])
    torch._dynamo.reset()
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu", batch_size=2, compile="on"))
    assert summary.generated == 2
    blocks = QwenImageTransformerBlock.forward.__code__
    assert _debug_get_cache_entry_list(blocks), "the run compiled the blocks"
    release_generator()
    assert not _debug_get_cache_entry_list(blocks)
