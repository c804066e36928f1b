"""Reliability and security: crashes, GPU out-of-memory, storage faults, hostile input, no code from data.

Each fault is injected from outside the library, on the tiny model: SIGKILL at named points of a real
CLI process (tests/faults.py, tests/crash_trials.py), CUDA's OutOfMemoryError from the generator, a
fault-injecting fsspec store, and manifests built to be broken or malicious. docs/reliability.md
lists what was tried and the outcomes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.io.storage import Folder
from tests.crash_trials import MAX_ROWS_IN_FLIGHT, ROWS, TRIALS, run_crash_trial
from tests.faults import FaultyFileSystem, cli_process, recording_generate
from tests.support import pixels, small_row, write_manifest

REPOSITORY = Path(__file__).parents[1]


def results(output: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}


# 1. Crash safety -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "nth"), TRIALS, ids=[point for point, _ in TRIALS])
def test_a_run_killed_at_any_point_completes_when_run_again_with_every_row_exactly_once(
    point, nth, tmp_path, tiny_model
):
    trial = run_crash_trial(point, nth, tmp_path)

    assert trial.killed, f"the run was never killed at {point}:\n{trial.killed_run_output}"
    assert trial.incomplete_files_visible == 0, "a half-written image or part file carries its final name"
    assert trial.rerun_exit_code == 0
    assert (trial.results_rows, trial.rows_lost, trial.rows_duplicated, trial.rows_not_ok) == (ROWS, 0, 0, 0)
    assert trial.parts_left == 0 and trial.temporary_files_referenced == 0
    # Rows finished before the kill are skipped; only rows in flight are generated twice.
    assert trial.done_rows_rewritten == 0
    assert trial.generated_on_rerun == ROWS - trial.done_before_kill
    assert trial.regenerated <= MAX_ROWS_IN_FLIGHT
    if point == "encode":  # the embeddings written before the kill are used, the half-written one is not
        assert trial.cache_entries_before_kill == nth - 1
        assert trial.texts_encoded_on_rerun == ROWS + 1 - trial.cache_entries_before_kill  # prompts and " "
    if point.startswith("merge"):
        assert (trial.done_before_kill, trial.generated_on_rerun) == (ROWS, 0)


def test_the_merge_sweeps_away_temporary_files_of_killed_writers_but_not_fresh_ones(tmp_path, tiny_model):
    import os
    import time

    output = tmp_path / "out"
    (output / "images").mkdir(parents=True)
    stale, fresh = output / "images" / ".tmp-0123-a.png", output / "images" / ".tmp-4567-b.png"
    stale.write_bytes(b"half an image")
    fresh.write_bytes(b"a write in progress in another process")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))

    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat")])
    assert main(["run", str(manifest), "--output", str(output), "--device", "cpu", "-q"]) == 0
    assert not stale.exists() and fresh.exists()
    assert results(output)["a"]["status"] == "ok"


# 2. GPU out of memory --------------------------------------------------------------------------------


def test_a_batch_out_of_gpu_memory_is_retried_in_halves_and_only_a_row_that_never_fits_fails(
    tmp_path, tiny_model, monkeypatch, capsys
):
    from qwen_batch.pipeline.denoise import ImageGenerator

    rows = [small_row(f"r{n}", f"prompt number {n}") for n in range(3)] + [small_row("huge", "it never fits")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    args = [str(manifest), "--device", "cpu", "--batch-size", "4", "-q"]
    assert main(["run", *args, "--output", str(tmp_path / "reference")]) == 0  # the same rows, no OOM
    reference = results(tmp_path / "reference")
    capsys.readouterr()

    calls: list[list[str]] = []
    releases = []
    too_big = lambda ids: len(ids) > 1 or "huge" in ids  # noqa: E731
    monkeypatch.setattr(ImageGenerator, "generate", recording_generate(calls, out_of_memory_for=too_big))
    monkeypatch.setattr("qwen_batch.memory.oom.release_memory", lambda device: releases.append(device))
    output = tmp_path / "out"
    assert main(["run", *args, "--output", str(output)]) == 1

    assert calls == [["r0", "r1", "r2", "huge"], ["r0", "r1"], ["r0"], ["r1"], ["r2", "huge"], ["r2"], ["huge"]]
    assert releases == ["cpu"] * 3  # cached memory is freed before each retry
    rows = results(output)
    for row_id in ("r0", "r1", "r2"):
        assert rows[row_id]["status"] == "ok"
        # Within the correctness contract's 2/255 (tests/test_contract.py), not bit for bit: the CPU's
        # matmul kernels may block a batch of 4 and a batch of 1 differently on some processors.
        difference = np.abs(pixels(rows[row_id]["image"]) - pixels(reference[row_id]["image"]))
        assert difference.max() <= 2, "a row's image does not depend on its batch"
    assert rows["huge"]["status"] == "failed"
    assert rows["huge"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    printed = capsys.readouterr().out
    assert "generated  3" in printed and "failed     1" in printed
    assert "row 3 id='huge' failed: OutOfMemoryError: CUDA out of memory" in printed


def test_the_text_encoder_out_of_gpu_memory_halves_its_batch_and_a_single_prompt_stops_cleanly(
    tmp_path, tiny_model, monkeypatch, capsys
):
    import torch

    from qwen_batch.pipeline.encode import PromptEncoder

    original = PromptEncoder.encode
    sizes: list[int] = []

    def encode(self, texts):
        sizes.append(len(texts))
        if len(texts) > 1 or any("never fits" in text for text in texts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(self, texts)

    monkeypatch.setattr(PromptEncoder, "encode", encode)
    monkeypatch.setattr("qwen_batch.memory.oom.release_memory", lambda device: None)
    rows = [small_row(f"r{n}", f"prompt number {n}", true_cfg_scale=1.0) for n in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert (
        main(["run", str(manifest), "--device", "cpu", "--encode-batch-size", "4", "-q", "-o", str(tmp_path / "a")])
        == 0
    )
    assert sizes == [3, 2, 1, 1, 1]  # halved down to single prompts, every image made
    assert all(row["status"] == "ok" for row in results(tmp_path / "a").values())

    manifest = write_manifest(tmp_path / "m2.parquet", [small_row("x", "it never fits", true_cfg_scale=1.0)])
    capsys.readouterr()
    assert main(["run", str(manifest), "--device", "cpu", "-q", "-o", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "the text encoder ran out of GPU memory on a single prompt" in error and "Traceback" not in error


def test_what_counts_as_out_of_memory():
    import torch

    from qwen_batch.memory.oom import halves, is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not from an allocator
    assert halves([1, 2, 3]) == ([1, 2], [3])


# 3. Storage faults -----------------------------------------------------------------------------------


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setattr("qwen_batch.io.storage.RETRY_BASE_DELAY", 0.001)
    yield FaultyFileSystem.reset()
    FaultyFileSystem.reset()


def upload(tmp_path: Path, rows: list[dict], url: str = "faulty://bucket/m.parquet") -> str:
    folder, name = url.rsplit("/", 1)
    Folder(folder).write_bytes(name, write_manifest(tmp_path / "m.parquet", rows).read_bytes())
    return url


def stored_results(url: str) -> dict[str, dict]:
    table = pq.read_table(io.BytesIO(Folder(url).read_bytes("results.parquet")), use_threads=False)
    return {row["id"]: row for row in table.to_pylist()}


def test_transient_errors_on_every_kind_of_read_and_write_are_retried_and_no_row_is_lost(
    store, tmp_path, tiny_model, caplog
):
    manifest = upload(tmp_path, [small_row(f"r{n}", f"prompt number {n}") for n in range(6)])
    store.inject(transient_every=1)  # every call fails once: a connection reset, a timeout or a 503
    output = "faulty://bucket/out"
    assert main(["run", manifest, "--output", output, "--device", "cpu", "--batch-size", "2", "-q"]) == 0

    rows = stored_results(output)
    assert sorted(rows) == [f"r{n}" for n in range(6)] and {row["status"] for row in rows.values()} == {"ok"}
    for row in rows.values():
        assert hashlib.sha256(Folder(output).read_bytes(f"images/{row['id']}.png")).hexdigest() == row["sha256"]
    retries = [record for record in caplog.records if "retrying in" in record.getMessage()]
    assert store.injected >= 40 and len(retries) == store.injected
    retried = " ".join(record.getMessage() for record in retries)
    for kind in ("ConnectionResetError", "TimeoutError", "OSError"):
        assert kind in retried
    for where in ("m.parquet", "/cache/", "/images/", "/_parts/", "results.parquet"):
        assert where in retried, f"no fault was injected at {where}"


def test_an_outage_that_outlasts_the_retries_stops_the_run_early_and_keeps_what_was_written(
    store, tmp_path, tiny_model, monkeypatch, capsys
):
    from qwen_batch.pipeline.denoise import ImageGenerator

    rows = [small_row(f"r{n}", f"prompt number {n}") for n in range(10)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    calls: list[list[str]] = []
    monkeypatch.setattr(ImageGenerator, "generate", recording_generate(calls))
    # The output probe, 11 embeddings, then 3 rows (image + part file each), then the store goes down.
    store.inject(down_after_writes=1 + 11 + 3 * 2)
    output = "faulty://bucket/out"
    args = ["run", str(manifest), "--output", output, "--device", "cpu", "--batch-size", "1", "-q"]
    assert main(args) == 2

    error = capsys.readouterr().err
    assert error.startswith("qwen-batch: error: faulty://bucket/out/") and "(after 4 attempts)" in error
    assert "the store is down" in error
    assert len(calls) <= 3 + 4, "the run stops soon after the outage instead of generating every row"
    store.recover()
    assert Folder(output).list_files("images", ".png") == ["images/r0.png", "images/r1.png", "images/r2.png"]
    calls.clear()
    assert main(args) == 0
    assert [ids for ids in calls] == [[f"r{n}"] for n in range(3, 10)], "the rows written before are not redone"
    assert {row["status"] for row in stored_results(output).values()} == {"ok"}


def test_a_permanent_error_on_one_image_fails_that_row_only_and_is_not_retried(store, tmp_path, tiny_model, capsys):
    manifest = upload(tmp_path, [small_row(f"r{n}", f"prompt number {n}") for n in range(3)])
    store.inject(denied=("/images/r1.png",))
    output = "faulty://bucket/out"
    assert main(["run", manifest, "--output", output, "--device", "cpu", "-q"]) == 1
    rows = stored_results(output)
    assert [rows[row_id]["status"] for row_id in ("r0", "r1", "r2")] == ["ok", "failed", "ok"]
    assert "writing the image failed" in rows["r1"]["error"] and "access denied" in rows["r1"]["error"]
    assert store.denials == 1, "access denied is not retried"


# 4. Hostile and broken input -------------------------------------------------------------------------

LONG_PROMPT = ("a lighthouse on a cliff above a stormy sea, oil painting, " * 1800)[:100_000]
HOSTILE_IDS = {
    "slash": "a/b",
    "backslash": "..\\..\\evil",
    "dotdot": "..",
    "traversal": "../../escaped",
    "absolute": "/tmp/escaped",
    "windows": "C:\\escaped",
    "nul": "nul\x00byte",
    "fullwidth-solidus": "a\uff0fb",
    "division-slash": "a\u2215b",
    "cyrillic": "\u0441\u0430t",  # looks like "cat"
    "hidden": ".hidden",
    "temporary-name": ".tmp-x",
    "too-long": "x" * 129,
    "empty": "",
}
BAD_VALUES = {
    # id: (columns, what the row's error must say)
    "width-nan": ({"width": float("nan")}, "width nan is not a whole number"),
    "width-inf": ({"width": float("inf")}, "width inf is not a whole number"),
    "width-negative": ({"width": -512.0}, "width -512 is out of range: use 256 to 2048"),
    "width-huge": ({"width": 1e12}, "width 1000000000000 is out of range"),
    "width-not-16": ({"width": 1000.0}, "width 1000 is not a multiple of 16: use 992 or 1008"),
    "seed-beyond-int64": ({"seed": 2**64 - 1}, "seed 18446744073709551615 is outside the int64 range"),
    "cfg-inf": ({"true_cfg_scale": float("inf")}, "true_cfg_scale inf is out of range"),
    "cfg-nan": ({"true_cfg_scale": float("nan")}, "true_cfg_scale nan is out of range"),
    "prompt-null": ({"prompt": None}, "prompt is empty"),
    "steps-huge": ({"num_inference_steps": 10**15}, "num_inference_steps 1000000000000000 is out of range"),
}
# Types a careless writer produces: sizes as float (pandas, with gaps), seeds as uint64.
HOSTILE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("width", pa.float64()),
        ("height", pa.int64()),
        ("seed", pa.uint64()),
        ("num_inference_steps", pa.int64()),
        ("true_cfg_scale", pa.float64()),
    ]
)


def test_hostile_rows_are_refused_one_by_one_and_no_file_lands_outside_the_output(tmp_path, tiny_model):
    base = {"prompt": "a cat", "width": 256.0, "height": 256, "num_inference_steps": 2}
    rows = [{**base, "id": "good"}, {**base, "id": "long-prompt", "prompt": LONG_PROMPT}]
    rows += [{**base, "id": row_id} for row_id in HOSTILE_IDS.values()]
    rows += [{**base, "id": None}]
    rows += [{**base, "id": row_id, **columns} for row_id, (columns, _) in BAD_VALUES.items()]
    manifest = write_manifest(tmp_path / "m.parquet", rows, schema=HOSTILE_SCHEMA)
    output = tmp_path / "out"

    done = cli_process(["run", str(manifest), "--output", str(output), "--device", "cpu", "-q"], tmp_path / "run.log")

    assert done.exitcode == 1, done.output
    assert "Traceback" not in done.output
    table = pq.read_table(output / "results.parquet").to_pylist()
    assert len(table) == len(rows)  # every row accounted for, in order
    by_id = {row["id"]: row for row in table}
    assert by_id["good"]["status"] == "ok"
    long = by_id["long-prompt"]
    assert long["status"] == "ok" and long["prompt"] == LONG_PROMPT
    assert "1024-token limit: truncated" in long["warning"]
    for row_id in HOSTILE_IDS.values():
        assert by_id[row_id]["status"] == "invalid" and "is not allowed" in by_id[row_id]["error"], row_id
    assert table[2 + len(HOSTILE_IDS)]["error"].startswith("id is missing")
    for row_id, (_, reason) in BAD_VALUES.items():
        assert by_id[row_id]["status"] == "invalid" and reason in by_id[row_id]["error"], row_id

    written = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    outside = {name for name in written if not name.startswith("out/")} - {"m.parquet", "run.log"}
    assert not outside, f"files written outside the output folder: {outside}"
    assert sorted(path.name for path in (output / "images").iterdir()) == ["good.png", "long-prompt.png"]
    assert not Path("/tmp/escaped.png").exists()


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string column whose bytes are not UTF-8: pyarrow builds it without checking, as some writers do."""
    import numpy as np

    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


def _manifest_file(kind: str, path: Path) -> None:
    good = [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}]
    if kind == "truncated":
        write_manifest(path, good)
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "csv":
        path.write_text("id,prompt\na,a cat\n")
    elif kind == "json":
        path.write_text(json.dumps(good))
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    elif kind == "width-as-text":
        pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "width": ["1024"]}), path)
    elif kind == "prompt-as-number":
        pq.write_table(pa.table({"id": ["a"], "prompt": [42]}), path)
    elif kind == "invalid-utf8-prompt":
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": _invalid_utf8([b"a cat", b"caf\xe9 \xff"])}), path)
    elif kind == "invalid-utf8-extra-column":
        pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "note": _invalid_utf8([b"\xc3\x28"])}), path)
    elif kind == "duplicate-ids":
        write_manifest(path, [*good, {"id": "a", "prompt": "a bird"}])
    elif kind == "no-prompt-column":
        pq.write_table(pa.table({"id": ["a"], "text": ["p"]}), path)
    else:
        raise AssertionError(kind)


BROKEN_FILES = {
    "truncated": "not a readable Parquet file",
    "csv": "not a readable Parquet file",
    "json": "not a readable Parquet file",
    "empty-file": "not a readable Parquet file",
    "folder": "is a folder, not a file",
    "width-as-text": "column 'width' has type string; it must be integer",
    "prompt-as-number": "column 'prompt' has type int64; it must be string",
    "invalid-utf8-prompt": "column 'prompt' is not valid UTF-8 text at row(s) 1",
    "invalid-utf8-extra-column": "column 'note' is not valid UTF-8 text at row(s) 0",
    "duplicate-ids": "column 'id' has 1 duplicated value(s): 'a' at rows 0, 2",
    "no-prompt-column": "missing required column(s) 'prompt'",
}


@pytest.mark.parametrize("kind", BROKEN_FILES)
def test_a_broken_manifest_file_stops_with_one_clear_message_and_writes_nothing(kind, tmp_path):
    manifest, output = tmp_path / "m.parquet", tmp_path / "out"
    _manifest_file(kind, manifest)
    done = cli_process(["run", str(manifest), "--output", str(output), "-q"], tmp_path / "run.log")

    assert done.exitcode == 2
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1, done.output  # one message, no traceback
    assert lines[0].startswith("qwen-batch: error: ") and str(manifest) in lines[0]
    assert BROKEN_FILES[kind] in lines[0]
    assert not output.exists()


# 5. No code execution from data ----------------------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _calls_and_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (("import", alias.name.split(".")[0], node) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield ("import", node.module.split(".")[0], node)
        elif isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            yield ("call", name, node)


def test_no_library_or_flow_code_can_unpickle_or_run_code_from_data():
    problems = []
    for path in sorted([*REPOSITORY.glob("qwen_batch/*.py"), *REPOSITORY.glob("flows/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for kind, name, node in _calls_and_imports(tree):
            where = f"{path.relative_to(REPOSITORY)}:{node.lineno}"
            keywords = {keyword.arg: keyword.value for keyword in getattr(node, "keywords", [])}
            if kind == "import" and name in UNPICKLERS:
                problems.append(f"{where}: imports {name}")
            elif kind == "call" and name in ("eval", "exec") and isinstance(node.func, ast.Name):
                problems.append(f"{where}: calls {name}")  # the builtins; `module.eval()` is torch's mode switch
            elif kind == "call" and name in ("read_pickle", "load_state_dict_from_url"):
                problems.append(f"{where}: calls {name}")
            elif kind == "call" and name == "load" and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("torch", "pickle", "np", "numpy"):
                    problems.append(f"{where}: calls {owner.id}.load")
            if kind == "call" and "trust_remote_code" in keywords:
                problems.append(f"{where}: passes trust_remote_code")
            if kind == "call" and "allow_pickle" in keywords:
                problems.append(f"{where}: passes allow_pickle")
            if kind == "call" and name in ("task", "flow") and path.parent.name == "flows":
                # Prefect pickles what it caches or persists: flows and tasks do neither.
                spread = [keyword.value for keyword in node.keywords if keyword.arg is None]
                uses_policy = any(isinstance(value, ast.Name) and value.id == "TASK_OPTIONS" for value in spread)
                persist = keywords.get("persist_result")
                if not (uses_policy or (isinstance(persist, ast.Constant) and persist.value is False)):
                    problems.append(f"{where}: a Prefect {name} that may cache or persist its results")
            if kind == "call" and name == "from_pretrained":
                value = keywords.get("use_safetensors")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: from_pretrained without use_safetensors=True")
    assert not problems, problems


def test_a_run_unpickles_nothing_and_writes_only_data_formats(tmp_path, tiny_model, monkeypatch):
    import pickle

    import safetensors.torch
    import torch

    from qwen_batch.outputs.png import read_png_metadata
    from qwen_batch.run.engine import release_generator

    release_generator()  # load the model in this test, under the guard below
    refused = []

    def refuse(name):
        def unpickle(*args, **kwargs):
            refused.append(name)
            raise AssertionError(f"{name} was called during a run")

        return unpickle

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    output = tmp_path / "out"
    assert main(["run", str(manifest), "--output", str(output), "--device", "cpu", "-q"]) == 0
    assert not refused

    files = [path for path in output.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} <= {".png", ".parquet", ".safetensors", ".json"}
    for path in files:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert read_png_metadata(data)["id"] == path.stem
            with Image.open(path) as image:
                assert image.format == "PNG"
        elif path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".safetensors":
            assert set(safetensors.torch.load(data)) and json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        else:
            json.loads(data)
