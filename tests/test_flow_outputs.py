"""The flows' output options: shard outputs in chunks of whole shards, what the UI's artifacts say of the formats,
shards and marks, and C2PA signing from Prefect Secret blocks whose key text never reaches the server.

The flow runs in this process against a real Prefect server on loopback (tests/prefect_server.py), on the tiny
model, 256x256 with 2 steps; the checks without a server come first.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from flows import report
from flows.parameters import BatchParameters, FanoutParameters
from flows.qwen_image_batch import chunk_rows
from qwen_batch.io.storage import Folder
from qwen_batch.outputs.encoder import MARKS
from qwen_batch.outputs.images import ImageFormat
from qwen_batch.run.summary import DenoiseStats
from tests.prefect_server import PrefectStack
from tests.support import small_row, write_manifest
from tests.test_marks import make_chain

# --- Without a server ------------------------------------------------------------------------------


def test_shard_outputs_make_chunks_of_whole_shards():
    assert chunk_rows(BatchParameters(chunk_size=32, shard_size=2)) == 32  # files: the chunk size as given
    webdataset = {"output_format": "webdataset"}
    assert chunk_rows(BatchParameters(**webdataset, chunk_size=32, shard_size=1000)) == 1000
    assert chunk_rows(BatchParameters(**webdataset, chunk_size=32, shard_size=10)) == 40  # not 3 shards and 2 rows
    assert chunk_rows(BatchParameters(output_format="parquet", chunk_size=1, shard_size=2)) == 2
    assert chunk_rows(BatchParameters(**webdataset, chunk_size=8, shard_size=4)) == 8
    assert "whole shards" in BatchParameters.model_fields["chunk_size"].description


def test_c2pa_secrets_go_together_and_not_with_files():
    both = BatchParameters(c2pa_cert_secret="cert", c2pa_key_secret="key")
    assert both.content_credentials  # a method: nothing is loaded while parameters are checked
    with pytest.raises(ValidationError, match="c2pa_cert_secret and c2pa_key_secret go together"):
        BatchParameters(c2pa_cert_secret="cert")
    with pytest.raises(ValidationError, match="c2pa_cert_secret and c2pa_key_secret go together"):
        FanoutParameters(c2pa_key_secret="key")
    with pytest.raises(ValidationError, match=r"from Secret blocks .* or from files on the worker"):
        BatchParameters(c2pa_cert_secret="cert", c2pa_key_secret="key", c2pa_cert="c.pem", c2pa_key="k.pem")
    assert BatchParameters(c2pa_cert_secret="", c2pa_key_secret="").content_credentials() is None  # emptied boxes
    # The shard runs get the blocks' names, as every job field.
    shard = BatchParameters(**FanoutParameters(c2pa_cert_secret="c", c2pa_key_secret="k").shard_parameters(1))
    assert (shard.c2pa_cert_secret, shard.c2pa_key_secret, shard.shard) == ("c", "k", "1/2")


def test_the_summary_names_formats_shards_and_marks():
    denoise = DenoiseStats(generated=6, image_bytes=3 * 2**20, shards=3, shard_rows=6, shard_bytes=2**29)
    outputs = {"output_format": "parquet", "image_format": "jpeg", "marks": MARKS[True]}
    rows = dict(report.output_metrics(outputs, denoise))
    assert rows == {
        "output": "parquet, jpeg images",
        "images stored (GiB)": "0.003",
        "shards written": "3 published, 0.50 GiB, 2 images per shard",
        "marks": "IPTC XMP + C2PA (signed)",
        "C2PA signed": "yes",
    }
    files = dict(report.output_metrics({**outputs, "output_format": "files", "marks": MARKS[False]}, denoise))
    assert "shards written" not in files and files["C2PA signed"] == "no" and files["marks"] == "IPTC XMP"
    assert report.output_metrics({}, denoise) == []  # a report from before the output options


def test_the_marks_named_without_an_encoder_are_the_encoders():
    from qwen_batch.outputs.encoder import ImageEncoder

    assert MARKS[False] == ImageEncoder().marks
    assert MARKS[True] == ImageEncoder(credentials=object()).marks  # type: ignore[arg-type]


def test_samples_of_any_image_format_and_where_shards_are(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "images" / "fox.jpg", "JPEG")
    outputs = {"output_format": "files", "image_format": "jpeg", "marks": "IPTC XMP"}
    markdown = report.samples_markdown(Folder(str(tmp_path)), "r.parquet", [{"id": "fox", "prompt": "a fox"}], outputs)
    assert "`images/<id>.jpg`" in markdown
    assert "](data:image/jpeg;base64," in markdown and f"({(tmp_path / 'images' / 'fox.jpg').as_uri()})" in markdown

    (tmp_path / "data").mkdir()
    for number in range(12):
        (tmp_path / "data" / f"{number:05d}.parquet").write_bytes(b"")
    (tmp_path / "data" / "00000_stats.json").write_text("{}")
    outputs = {"output_format": "parquet", "image_format": "webp", "marks": "IPTC XMP"}
    markdown = report.samples_markdown(Folder(str(tmp_path)), "r.parquet", [{"id": "fox", "prompt": "a fox"}], outputs)
    assert "Parquet shards `data/*.parquet`" in markdown and "12 shard file(s)" in markdown
    assert f"[data/00000.parquet]({(tmp_path / 'data' / '00000.parquet').as_uri()})" in markdown
    assert "data/00010.parquet" not in markdown and "... and 2 more" in markdown
    assert "base64" not in markdown and "images/" not in markdown

    empty = Folder(str(tmp_path / "empty"))
    markdown = report.samples_markdown(empty, "r.parquet", [], {**outputs, "output_format": "webdataset"})
    assert "WebDataset shards `shards/*.tar`" in markdown and "No shards yet." in markdown


# --- On a Prefect server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, qwen_batch_home: Path):
    """A Prefect server only: the flow runs in this process, as `python flows/qwen_image_batch.py` runs it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = PrefectStack(tmp_path_factory.mktemp("prefect"), qwen_batch_home)
    try:
        stack.start_server()
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            yield stack
            APILogHandler().flush()  # this process's last logs, while the server still takes them
    finally:
        stack.stop()


def run_flow(**parameters):
    """The batch flow on the tiny model, in this process: its final state and its flow run's id."""
    from flows.qwen_image_batch import qwen_image_batch

    state = qwen_image_batch(**BatchParameters(**parameters).model_dump(), return_state=True)
    return state, str(state.state_details.flow_run_id)


def summary_table(artifacts: dict) -> dict[str, object]:
    return {row["metric"]: row["value"] for row in json.loads(artifacts["qwen-image-batch-summary"]["data"])}


def flow_run_logs(run_id: str) -> str:
    """The run's logs as the server stores them, read with the Prefect client (after flushing this process's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return "\n".join(log.message for log in logs)


@pytest.mark.slow
def test_webdataset_webp_shards_in_chunks_of_whole_shards(stack, tmp_path):
    rows = [small_row(f"row-{n}", f"a lighthouse, picture {n}") for n in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"

    state, run_id = run_flow(
        manifest=str(manifest),
        output=str(output),
        output_format="webdataset",
        image_format="webp",
        shard_size=2,
        batch_size=2,
        chunk_size=1,  # raised to one shard (2 rows) a chunk
        device="cpu",
    )
    assert state.is_completed(), state.message
    report_ = state.result()
    assert report_["outputs"]["output_format"] == "webdataset" and report_["denoise"]["shards"] == 2

    tars = sorted((output / "shards").glob("*.tar"))
    assert len(tars) == 2, "two chunks, each one full shard"
    for tar in tars:
        with tarfile.open(tar) as archive:
            names = archive.getnames()
        assert len([name for name in names if name.endswith(".webp")]) == 2, names
        assert tar.with_suffix(".parquet").is_file()  # the index beside each tar
    records = pq.read_table(output / "results.parquet", use_threads=False).to_pylist()
    assert {record["status"] for record in records} == {"ok"}
    assert {Path(record["shard"]).name for record in records} == {tar.name for tar in tars}
    assert not (output / "images").exists()
    denoise_tasks = sorted(run["name"] for run in stack.task_runs(run_id) if run["name"].startswith("denoise"))
    assert denoise_tasks == ["denoise 1 of 2", "denoise 2 of 2"]

    artifacts = stack.artifacts(run_id)
    summary = summary_table(artifacts)
    assert summary["output"] == "webdataset, webp images"
    assert summary["shards written"].startswith("2 published, ") and summary["shards written"].endswith(
        " GiB, 2 images per shard"
    )
    assert float(summary["images stored (GiB)"]) >= 0
    assert summary["marks"] == "IPTC XMP" and summary["C2PA signed"] == "no"
    samples = artifacts["qwen-image-batch-samples"]["data"]
    assert "WebDataset shards `shards/*.tar`" in samples and "2 shard file(s)" in samples
    assert f"({tars[0].as_uri()})" in samples and "images/" not in samples


@pytest.mark.slow
def test_c2pa_from_secret_blocks_signs_and_the_key_never_reaches_the_server(stack, tmp_path):
    from prefect.blocks.system import Secret

    from qwen_batch.outputs.content_credentials import read_credentials

    chain, key = make_chain()
    key_lines = [line for line in key.decode().splitlines() if "-----" not in line]
    Secret(value=chain.decode()).save("test-c2pa-chain", overwrite=True)
    Secret(value=key.decode()).save("test-c2pa-key", overwrite=True)
    rows = [small_row("cat", "a cat"), small_row("dog", "a dog")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"

    state, run_id = run_flow(
        manifest=str(manifest),
        output=str(output),
        image_format="jpeg",
        c2pa_cert_secret="test-c2pa-chain",
        c2pa_key_secret="test-c2pa-key",
        device="cpu",
    )
    assert state.is_completed(), state.message
    for row in rows:
        store = read_credentials((output / "images" / f"{row['id']}.jpg").read_bytes(), ImageFormat.JPEG)
        assert store["validation_state"] == "Valid"  # signed; only the test root is untrusted
        manifest_ = store["manifests"][store["active_manifest"]]
        assert manifest_["signature_info"]["common_name"] == "qwen-batch test signer"
        assert manifest_["title"] == f"{row['id']}.jpg"

    run = stack.api("GET", f"/flow_runs/{run_id}")
    artifacts = stack.artifacts(run_id)
    logs = flow_run_logs(run_id)
    summary = summary_table(artifacts)
    assert summary["marks"] == "IPTC XMP + C2PA (signed)" and summary["C2PA signed"] == "yes"
    assert "`images/<id>.jpg`" in artifacts["qwen-image-batch-samples"]["data"]
    assert "Secret block 'test-c2pa-chain'" in logs and "qwen-batch test signer" in logs  # names, not values
    assert run["parameters"]["c2pa_key_secret"] == "test-c2pa-key"
    results = pq.read_table(output / "results.parquet", use_threads=False).to_pylist()
    where = {
        "the flow run's parameters": json.dumps(run["parameters"]),
        "its logs": logs,
        "its artifacts": json.dumps(artifacts, default=str),
        "results.parquet": json.dumps(results, default=str)
        + (output / "results.parquet").read_bytes().decode("latin-1"),
        "its result": json.dumps(state.result(), default=str),
    }
    for name, text in where.items():
        assert not [line for line in key_lines if line in text], f"the key's text is in {name}"

    # A Secret block that does not exist: the run fails before any model loads, naming the block.
    state, run_id = run_flow(
        manifest=str(manifest),
        output=str(tmp_path / "none"),
        c2pa_cert_secret="test-c2pa-chain",
        c2pa_key_secret="no-such-block",
        device="cpu",
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "c2pa_key_secret 'no-such-block': no Secret block of that name" in message
    assert [run["name"].rsplit("-", 1)[0] for run in stack.task_runs(run_id)] == ["validate"]
    assert not (tmp_path / "none" / "images").exists()
