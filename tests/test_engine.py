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
