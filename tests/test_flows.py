"""The Prefect adapter without a server: parameters, chunks, retries, task options, what the UI is
sent, the deployments file, and that the library never imports Prefect. The flows themselves run
against a real server in test_flows_e2e.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.states import Failed
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel, ValidationError

from flows import report
from flows.parameters import BatchParameters, FanoutParameters
from flows.qwen_image_batch import make_chunks, qwen_image_batch
from flows.qwen_image_fanout import qwen_image_fanout
from flows.task_policy import STORAGE_RETRIES, is_transient_storage_failure, retry_on_storage_errors
from qwen_batch.errors import ManifestError, NotFoundError, StorageError
from qwen_batch.io.storage import Folder
from qwen_batch.manifest import Request

REPO = Path(__file__).resolve().parents[1]
FLOWS = [(qwen_image_batch, BatchParameters), (qwen_image_fanout, FanoutParameters)]


# --- Parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flow", "model"), FLOWS, ids=["batch", "fanout"])
def test_the_ui_form_is_the_model_flat_with_every_field_described_and_limited(flow, model):
    schema = parameter_schema(flow).model_dump()
    properties = schema["properties"]
    assert list(properties) == list(model.model_fields), "flat: one form field per model field, in order"
    for name, field in properties.items():
        assert field["description"] == " ".join(model.model_fields[name].description.split()), name
        assert field["default"] == model.model_fields[name].default, name
    assert schema["required"] == []  # the defaults run the example on the tiny model
    limited = properties["batch_size"]["anyOf"][0]  # a number from 1 to 64, or empty: the planner's choice
    assert (limited["minimum"], limited["maximum"], properties["batch_size"]["default"]) == (1, 64, None)
    assert properties["dtype"]["enum"] == ["auto", "bf16", "fp32"]
    assert properties["device"]["pattern"] == r"^(auto|cpu|cuda(:\d+)?)$"
    assert properties["manifest"]["default"] == "prompts/demo.parquet"


def test_shard_parameters_are_checked_by_the_schema_and_by_the_model():
    properties = parameter_schema(qwen_image_batch).model_dump()["properties"]
    assert properties["shard"]["pattern"] == r"^\d+/\d+$"
    assert BatchParameters(shard="1/2").shard_numbers == (1, 2)
    with pytest.raises(ValidationError, match=r"shard\n.*shard 2/2: K must be from 0 to N - 1"):
        BatchParameters(shard="2/2")
    with pytest.raises(ValidationError, match="shard"):
        BatchParameters(shard="half")


def test_unknown_and_invalid_parameters_fail_before_the_flow_runs_naming_the_field():
    with pytest.raises(ValidationError, match=r"batch\n  Extra inputs are not permitted"):
        BatchParameters(batch=8)
    # What Prefect checks when a run starts, before the flow's body: types, limits, validators, names.
    with pytest.raises(ParameterTypeError, match="batch_size: Input should be greater than or equal to 1"):
        qwen_image_batch.validate_parameters({"batch_size": 0})
    with pytest.raises(ParameterTypeError, match="shard: Value error, shard 3/2"):
        qwen_image_batch.validate_parameters({"shard": "3/2"})
    with pytest.raises(SignatureMismatchError, match="'batch'"):
        qwen_image_batch.validate_parameters({"batch": 8})
    validated = qwen_image_batch.validate_parameters({"manifest": "m.parquet", "batch_size": "8"})
    assert validated["batch_size"] == 8 and validated["model"] == "tiny" and validated["shard"] == "0/1"


def test_each_shard_run_gets_the_job_and_its_shard():
    fanout = FanoutParameters(
        manifest="s3://b/m.parquet", output="s3://b/out", shards=3, batch_size=2, cache="c", fp8_every_linear=True
    )
    shard = BatchParameters(**fanout.shard_parameters(2))
    assert shard.shard == "2/3" and shard.is_shard
    assert shard.job_fields() == fanout.job_fields()
    config = shard.run_config()
    assert config.shard_index == 2 and config.shard_count == 3 and config.fp8_every_linear


def test_adapters_and_shift_reach_the_run_and_every_shard(tmp_path, monkeypatch):
    from qwen_batch.adapters.loras import LoraRef

    monkeypatch.chdir(tmp_path)  # a relative path is the worker's, from its working directory
    loras = [{"path": "loras/lightning.safetensors", "scale": 1.0}, {"path": "s3://b/style.safetensors", "scale": 0.5}]
    fanout = FanoutParameters(loras=loras, scheduler_shift=3.0, shards=2)
    shard = BatchParameters(**fanout.shard_parameters(1))
    config = shard.run_config()
    assert config.loras == (
        LoraRef(str(tmp_path / "loras/lightning.safetensors"), 1.0),
        LoraRef("s3://b/style.safetensors", 0.5),
    )
    assert config.scheduler_shift == 3.0
    with pytest.raises(ValidationError, match="scale"):
        BatchParameters(loras=[{"path": "x.safetensors", "scale": 20}])
    with pytest.raises(ValidationError, match="scheduler_shift"):
        BatchParameters(scheduler_shift=0)
    with pytest.raises(ValidationError, match="extra"):
        BatchParameters(loras=[{"path": "x.safetensors", "weight": 1}])


def test_storage_settings_are_options_never_credentials():
    params = BatchParameters(s3_endpoint_url="http://minio:9000", s3_profile="batch")
    assert params.storage_options() == {"s3": {"endpoint_url": "http://minio:9000", "profile": "batch"}}
    # S3 credentials are never parameters; C2PA's key is a file path or a Secret block's name, never the key.
    credentials = [name for name in BatchParameters.model_fields if "key" in name or "secret" in name]
    assert set(credentials) == {"c2pa_key", "c2pa_cert_secret", "c2pa_key_secret"}
    assert BatchParameters.model_fields["c2pa_key"].annotation == (str | None)


# --- Chunks --------------------------------------------------------------------------------------


def request(index: int, width: int = 256) -> Request:
    return Request(index, f"row-{index}", "a prompt", " ", width, 256, index, 2, 4.0)


def test_chunks_are_whole_batches_and_10000_rows_are_hundreds_of_tasks_not_thousands():
    rows = [request(index, width=256 if index % 3 else 512) for index in range(10_000)]
    chunks = make_chunks(rows, batch_size=4, chunk_size=32)
    assert 300 <= len(chunks) <= 320
    assert sorted(row.index for chunk in chunks for row in chunk) == list(range(10_000)), "every row once"
    assert all(len(chunk) <= 32 for chunk in chunks)
    # No batch is split between chunks: a chunk's batches are the batches of the whole run.
    from qwen_batch.run.engine import make_batches

    assert [batch for chunk in chunks for batch in make_batches(chunk, 4)] == make_batches(rows, 4)


def test_a_batch_larger_than_the_chunk_size_is_one_chunk():
    assert [len(chunk) for chunk in make_chunks([request(i) for i in range(10)], batch_size=4, chunk_size=2)] == [
        4,
        4,
        2,
    ]
    assert make_chunks([], batch_size=4, chunk_size=32) == []


# --- Retries and task options --------------------------------------------------------------------


def storage_error(cause: BaseException, kind: type[StorageError] = StorageError) -> StorageError:
    try:
        raise kind("s3://bucket/key: trouble") from cause
    except StorageError as error:
        return error


def test_only_storage_io_that_may_pass_is_retried():
    assert is_transient_storage_failure(storage_error(ConnectionResetError("reset by peer")))
    assert is_transient_storage_failure(storage_error(TimeoutError("read timed out")))
    try:  # reading the manifest: a ManifestError raised from the StorageError
        raise ManifestError("cannot read the manifest") from storage_error(ConnectionError())
    except ManifestError as error:
        assert is_transient_storage_failure(error)
    assert not is_transient_storage_failure(storage_error(FileNotFoundError(), NotFoundError))
    assert not is_transient_storage_failure(storage_error(PermissionError("denied")))
    assert not is_transient_storage_failure(StorageError("not a readable Parquet file"))
    assert not is_transient_storage_failure(ManifestError("column 'id' has 2 duplicated value(s)"))
    assert not is_transient_storage_failure(report.RowsFailed("2 rows failed", {}))
    assert not is_transient_storage_failure(ValueError("bad input"))


def test_the_retry_condition_reads_the_failed_state():
    assert retry_on_storage_errors(None, None, Failed(data=storage_error(ConnectionError())))
    assert not retry_on_storage_errors(None, None, Failed(data=ManifestError("no 'prompt' column")))


def test_no_task_caches_or_persists_and_only_storage_failures_are_retried():
    import flows.qwen_image_batch as batch
    import flows.qwen_image_fanout as fanout

    tasks = [
        batch.validate,
        batch.encode,
        batch.denoise,
        batch.finalize_run,
        fanout.check_manifest,
        fanout.merge_shards,
    ]
    for task in tasks:
        assert task.cache_policy.__class__.__name__ == "_None", task.name  # NO_CACHE: inputs are never hashed
        assert task.persist_result is False, task.name
        assert task.retries == STORAGE_RETRIES["retries"] and task.retry_condition_fn is retry_on_storage_errors
    assert [task.name for task in tasks[:4]] == ["validate", "encode", "denoise", "finalize"]
    for flow, _ in FLOWS:
        assert flow.persist_result is False and not flow.retries


# --- What the UI is sent -------------------------------------------------------------------------


def test_progress_reports_rows_done_of_the_rows_to_generate(monkeypatch):
    sent = []
    monkeypatch.setattr(report, "create_progress_artifact", lambda **kwargs: sent.append(kwargs) or "artifact-id")
    monkeypatch.setattr(
        report, "update_progress_artifact", lambda artifact, percent, text: sent.append((artifact, percent, text))
    )
    progress = report.ArtifactProgress("qwen-image-batch-progress", total=10, interval=3600)
    assert sent.pop(0) == {"progress": 0.0, "key": "qwen-image-batch-progress", "description": "0 of 10 rows done"}
    progress.start("encode", 4, "text")
    progress.advance(3)
    assert progress.describe() == "0 of 10 rows done; encoding prompts: 3 of 4 texts" and not sent  # throttled
    progress.finish()
    progress.start("denoise", 4, "img")
    progress.advance(4)
    progress.finish()  # a chunk ends: always sent
    assert sent[-1] == ("artifact-id", 40.0, "4 of 10 rows done")
    empty = report.ArtifactProgress("k", total=0)
    assert empty.percent == 100.0 and empty.describe().startswith("Nothing to generate")


def test_the_problems_table_escapes_cells_and_shows_the_first_rows():
    problems = [[3, "a|b", "invalid", "width 1000 | height <x>\nsecond line"]]
    markdown = report.problems_markdown(problems, total=60, results="/out/results.parquet")
    assert "| 3 | a\\|b | invalid | width 1000 \\| height &lt;x&gt; second line |" in markdown
    assert "... and 59 more in `/out/results.parquet`." in markdown
    assert report.problems_markdown([], total=0, results="r").startswith("**Every row is ok**")


def test_samples_are_thumbnails_linking_to_the_images(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (512, 256), "red").save(tmp_path / "images" / "fox.png")
    samples = [{"id": "fox", "prompt": "a red fox " * 20}, {"id": "gone", "prompt": "deleted since"}]
    markdown = report.samples_markdown(Folder(str(tmp_path)), str(tmp_path / "results.parquet"), samples)
    assert f"[{tmp_path}]({tmp_path.as_uri()})" in markdown
    fox, gone = markdown.splitlines()[-2:]
    assert (
        fox.startswith("| ![fox](data:image/jpeg;base64,")
        and f"[fox]({(tmp_path / 'images' / 'fox.png').as_uri()})" in fox
    )
    assert fox.endswith("| a red fox a red fox a red fox a red fox a red fox a red fox… |")
    assert gone.startswith("|  | [gone](")  # an image that cannot be read: a link only
    assert report.link("s3://bucket/out") == "s3://bucket/out"


def test_artifact_keys_name_the_shard():
    assert report.artifact_key("qwen-image-batch", "summary") == "qwen-image-batch-summary"
    assert report.artifact_key("qwen-image-batch", "summary", "1/4") == "qwen-image-batch-summary-shard-1-of-4"


# --- Deployments, and the boundary with the library ----------------------------------------------


def test_the_deployments_file_declares_the_three_deployments():
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {item["name"]: item for item in config["deployments"]}
    assert set(deployments) == {"nightly", "shard", "fanout"}
    assert deployments["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert "schedules" not in deployments["shard"] and "schedules" not in deployments["fanout"]
    assert [deployments[name]["work_pool"]["name"] for name in ("nightly", "shard", "fanout")] == [
        "gpu",
        "gpu",
        "control",
    ]
    flows: dict[str, tuple[str, type[BaseModel]]] = {
        "flows/qwen_image_batch.py:qwen_image_batch": (qwen_image_batch.name, BatchParameters),
        "flows/qwen_image_fanout.py:qwen_image_fanout": (qwen_image_fanout.name, FanoutParameters),
    }
    assert [flows[deployments[name]["entrypoint"]][0] for name in ("nightly", "shard", "fanout")] == [
        "qwen-image-batch",
        "qwen-image-batch",
        "qwen-image-fanout",
    ]
    for name, deployment in deployments.items():
        model = flows[deployment["entrypoint"]][1]
        model(**deployment.get("parameters", {}))  # valid values, no unknown name
        assert (REPO / deployment["entrypoint"].split(":")[0]).is_file(), name
    assert (REPO / deployments["nightly"]["parameters"]["manifest"]).is_file()
    assert "pull" not in config, "prefect deploy records the repository root as the working directory"


def test_each_flow_is_versioned_by_its_own_file():
    from prefect.utilities.hashing import file_hash

    assert qwen_image_batch.version == file_hash(str(REPO / "flows" / "qwen_image_batch.py"))
    assert qwen_image_fanout.version == file_hash(str(REPO / "flows" / "qwen_image_fanout.py"))


def documented_parameters() -> dict[str, str]:
    """{name: the flow it is marked for ("batch", "fan-out"; "" for both)} from the first column of the table
    under docs/prefect.md's "### Parameters" heading: a name mentioned anywhere else does not count."""
    lines = (REPO / "docs" / "prefect.md").read_text().splitlines()
    start = lines.index("### Parameters") + 1
    end = next(n for n in range(start, len(lines)) if lines[n].startswith("#"))
    documented = {}
    for line in lines[start:end]:
        if line.startswith("| `"):
            cell = line.split("|")[1]
            marked = re.search(r"\((batch|fan-out)\)", cell)
            documented |= dict.fromkeys(re.findall(r"`(\w+)`", cell), marked.group(1) if marked else "")
    return documented


def test_the_docs_list_every_parameter():
    documented = documented_parameters()
    batch, fanout = set(BatchParameters.model_fields), set(FanoutParameters.model_fields)
    assert set(documented) == batch | fanout, "the parameters table and the flows' parameters differ"
    marks = {(True, False): "batch", (False, True): "fan-out", (True, True): ""}  # (in batch, in fan-out)
    for name, flow in documented.items():
        assert flow == marks[name in batch, name in fanout], name


def test_the_library_never_imports_prefect():
    code = (
        "import pkgutil, importlib, sys, qwen_batch\n"
        "for module in pkgutil.iter_modules(qwen_batch.__path__): importlib.import_module(f'qwen_batch.{module.name}')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'prefect'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]"
    for source in (REPO / "qwen_batch").glob("*.py"):
        text = source.read_text()
        assert "import prefect" not in text and "from prefect" not in text, source.name


def test_the_flow_script_runs_from_the_repository_root_and_imports_no_torch_until_it_runs():
    done = subprocess.run(
        [sys.executable, "flows/qwen_image_batch.py", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "--manifest VALUE" in done.stdout and "--chunk-size VALUE" in done.stdout and "--shard VALUE" in done.stdout
    code = "import sys, flows.qwen_image_batch, flows.qwen_image_fanout; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout == "False\n"
