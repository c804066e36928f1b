"""Outputs a dataset pipeline reads, through the CLI on the tiny models: WebDataset and Parquet shards published
exactly once (SIGKILL at each step of a shard's life, then run again), WebP/JPEG, the AI-generated marks in every
image and mode, C2PA signing, and the refusals that come before any model loads."""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.io.storage import Folder
from qwen_batch.outputs.images import read_image_metadata, read_xmp
from qwen_batch.outputs.marks import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    read_source_type,
)
from qwen_batch.outputs.shards import published_rows
from tests.faults import cli_process
from tests.s3_server import keys, read_results, upload_manifest
from tests.support import picture_png, small_row, write_manifest
from tests.test_marks import make_chain  # the test certificate chain (root CA + ES256 leaf)

ROWS = [small_row(f"row.{index}", f"a lighthouse, take {index}", seed=index) for index in range(7)]
SHARD_ARGS = ["--device", "cpu", "--batch-size", "2", "--shard-size", "2", "-q"]


def shard_rows(folder: Path) -> collections.Counter:
    """How often each id is in a published shard, reading every data file whole (a partial one would not read)."""
    seen = collections.Counter()
    # As a reader lists them (glob.glob, a shell, a brace range): a killed writer's hidden `.tmp-` spool is no shard.
    for tar_path in sorted(glob.glob(str(folder / "shards" / "*.tar"))):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    seen[json.loads(tar.extractfile(member).read())["id"]] += 1
                else:
                    assert tar.extractfile(member).read() is not None
    for data_path in sorted(glob.glob(str(folder / "data" / "*.parquet"))):
        for row in pq.read_table(data_path).select(["id"]).to_pylist():
            seen[row["id"]] += 1
    return seen


def chain_files(folder: Path) -> tuple[Path, Path]:
    """A test certificate chain and its key, as PEM files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    chain, key = make_chain()
    (folder / "cert.pem").write_bytes(chain)
    (folder / "key.pem").write_bytes(key)
    return folder / "cert.pem", folder / "key.pem"


def temporaries(folder: Path) -> list[str]:
    """Temporary files a reader could mistake for data: any not hidden behind the `.tmp-` prefix."""
    return [str(path) for path in folder.rglob("*tmp*") if not path.name.startswith(".tmp-")]


def results(folder: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(folder / "results.parquet").to_pylist()}


# 1. Exactly once, whatever moment the run dies ----------------------------------------------------------------

# 7 rows, batches of 2, shards of 2: the 3rd sample, the 2nd publish, the 2nd shard's sidecars and the part file
# of the 2nd shard all fall in the middle of the run.
KILLS = [("shard-spool", 3), ("shard-publish", 2), ("shard-sidecar", 2), ("shard-recorded", 2)]


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
@pytest.mark.parametrize(("point", "nth"), KILLS, ids=[point for point, _ in KILLS])
def test_a_shard_run_killed_at_any_point_ends_with_every_row_in_exactly_one_published_shard(
    point, nth, output_format, tmp_path, tiny_model
):
    manifest = write_manifest(tmp_path / "rows.parquet", ROWS)
    output = tmp_path / "out"
    args = ["run", str(manifest), "-o", str(output), "--output-format", output_format, *SHARD_ARGS]
    killed = cli_process(args, tmp_path / "killed.log", point, nth)
    assert killed.killed, killed.output

    before = shard_rows(output)  # every visible shard reads whole: nothing partial is ever published
    assert all(count == 1 for count in before.values())
    assert main(args) == 0
    after = shard_rows(output)
    assert after == collections.Counter({row["id"]: 1 for row in ROWS}), "each row once, none missing"
    assert not temporaries(output)
    rows = results(output)
    assert {row["status"] for row in rows.values()} == {"ok"}
    published = published_rows(Folder(str(output)), output_format)
    for row_id, row in rows.items():
        assert row["shard"].endswith(published[row_id].shard) and row["key"] == published[row_id].key
        assert "." not in row["key"] and row["image"] is None
    if point in ("shard-sidecar", "shard-recorded"):  # the shard killed after publishing is kept, not regenerated
        assert all(row_id in after for row_id in before)
        assert len(list((output / ("shards" if output_format == "webdataset" else "data")).glob("*_stats.json"))) == (
            len(set(published[row_id].shard for row_id in rows))
        )


def test_a_killed_shard_run_on_s3_resumes_with_every_row_exactly_once(s3_endpoint, s3, bucket, tmp_path, tiny_model):
    manifest = upload_manifest(s3, bucket, "m.parquet", ROWS, tmp_path)
    output = f"s3://{bucket}/wds"
    args = ["run", manifest, "-o", output, "--output-format", "webdataset", "--s3-endpoint-url", s3_endpoint]
    args += SHARD_ARGS
    # The real CLI in a new process (with this test's AWS environment), killed as its 2nd shard is published.
    script = (
        "import sys; from tests.faults import kill_at; kill_at('shard-sidecar', 2); "
        "from qwen_batch.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    killed = subprocess.run([sys.executable, "-c", script, *args], env=os.environ, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert main(args) == 0

    stored = keys(s3, bucket, "wds/")
    tars = sorted(key for key in stored if key.endswith(".tar"))
    seen = collections.Counter()
    for key in tars:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    seen[json.loads(tar.extractfile(member).read())["id"]] += 1
    assert seen == collections.Counter({row["id"]: 1 for row in ROWS})
    assert not [key for key in stored if "/.tmp-" in key or "/_parts/" in key]
    rows = {row["id"]: row for row in read_results(s3, bucket, "wds/results.parquet")}
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert all(row["shard"].startswith(f"s3://{bucket}/wds/shards/") for row in rows.values())


def test_a_changed_row_is_generated_again_and_readers_never_get_both_versions(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "rows.parquet", ROWS[:4])
    output = tmp_path / "out"
    args = ["run", str(manifest), "-o", str(output), "--output-format", "webdataset", *SHARD_ARGS]
    assert main(args) == 0
    first = results(output)
    changed = [dict(row) for row in ROWS[:4]]
    changed[1]["seed"] = 999
    write_manifest(manifest, changed)
    assert main(args) == 0
    assert shard_rows(output) == collections.Counter({row["id"]: 1 for row in ROWS[:4]})
    second = results(output)
    assert second["row.1"]["seed"] == 999 and second["row.1"]["fingerprint"] != first["row.1"]["fingerprint"]
    assert second["row.0"]["shard"] == first["row.0"]["shard"], "unchanged rows stay where they were"
    published = published_rows(Folder(str(output)), "webdataset")
    assert published["row.1"].fingerprint == second["row.1"]["fingerprint"]


def test_fan_out_shards_write_disjoint_shard_numbers_and_the_merge_lists_every_row(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "rows.parquet", ROWS)
    output = tmp_path / "out"
    base = ["run", str(manifest), "-o", str(output), "--output-format", "webdataset", *SHARD_ARGS]
    for shard in ("0/2", "1/2"):
        assert main([*base, "--shard", shard]) == 0
    numbers = sorted(int(path.stem) for path in (output / "shards").glob("*.tar"))
    assert len(numbers) == len(set(numbers))
    assert main(base) == 0  # the unsharded run merges every row; nothing is generated again
    assert shard_rows(output) == collections.Counter({row["id"]: 1 for row in ROWS})
    assert {row["status"] for row in results(output).values()} == {"ok"}


# 2. Readers ----------------------------------------------------------------------------------------------------


def test_webdataset_shards_read_back_with_the_webdataset_library(tmp_path, tiny_model, capsys):
    import webdataset as wds

    manifest = write_manifest(tmp_path / "rows.parquet", ROWS[:5])
    output = tmp_path / "out"
    args = ["run", str(manifest), "-o", str(output), "--output-format", "webdataset", "--image-format", "webp"]
    assert main([*args, "--device", "cpu", "--batch-size", "2", "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"shards +3 published, 0\.00 GiB, 2 images per shard", printed), printed
    assert re.search(r"output +webdataset, webp images", printed) and f"{output}/shards/" in printed
    rows = results(output)
    urls = [str(path) for path in sorted((output / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 5
    for sample in samples:
        record = json.loads(sample["json"])
        assert record["key"] == sample["__key__"] and rows[record["id"]]["key"] == sample["__key__"]
        assert sample["txt"].decode() == record["prompt"]
        image = Image.open(io.BytesIO(sample["webp"]))
        assert image.format == "WEBP" and image.size == (record["width"], record["height"])
        assert read_image_metadata(sample["webp"])["seed"] == record["seed"]
        assert read_source_type(read_xmp(sample["webp"])) == TRAINED_ALGORITHMIC_MEDIA
    index = pq.read_table(output / "shards" / "00000.parquet").to_pylist()
    assert [row["id"] for row in index] == [json.loads(sample["json"])["id"] for sample in samples[:2]]
    stats = json.loads((output / "shards" / "00000_stats.json").read_text())
    assert stats["rows"] == 2


def test_parquet_shards_read_back_as_a_hugging_face_dataset_of_images(tmp_path, tiny_model):
    import datasets

    manifest = write_manifest(tmp_path / "rows.parquet", ROWS[:3])
    output = tmp_path / "out"
    args = ["run", str(manifest), "-o", str(output), "--output-format", "parquet", "--image-format", "jpeg"]
    assert main([*args, *SHARD_ARGS]) == 0
    dataset = datasets.load_dataset("parquet", data_files=str(output / "data" / "*.parquet"), split="train")
    assert len(dataset) == 3 and isinstance(dataset.features["image"], datasets.Image)
    by_id = {row["id"]: row for row in dataset}
    for row in ROWS[:3]:
        image = by_id[row["id"]]["image"]
        assert image.format == "JPEG" and image.size == (row["width"], row["height"])
    assert "configs:" in (output / "README.md").read_text()


# 3. Image formats and marks ------------------------------------------------------------------------------------


def test_every_image_is_marked_by_what_made_it_in_every_format(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(picture_png((64, 64), 1))
    rows = [
        small_row("text", "a red fox"),
        small_row("redo", "the fox in winter", init_image="in/photo.png", strength=0.6),
    ]
    manifest = write_manifest(tmp_path / "rows.parquet", rows)
    for image_format, extension in (("png", "png"), ("webp", "webp"), ("jpeg", "jpg")):
        output = tmp_path / image_format
        assert main(["run", str(manifest), "-o", str(output), "--image-format", image_format, "--device", "cpu"]) == 0
        for row_id, source_type in (
            ("text", TRAINED_ALGORITHMIC_MEDIA),
            ("redo", COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA),
        ):
            data = (output / "images" / f"{row_id}.{extension}").read_bytes()
            xmp = read_xmp(data)
            assert read_source_type(xmp) == source_type, (image_format, row_id)
            assert "qwen-batch" in xmp and read_image_metadata(data)["id"] == row_id
        assert results(output)["text"]["image"].endswith(f"text.{extension}")


def test_c2pa_signs_every_image_and_the_key_is_never_written(tmp_path, tiny_model, capsys, caplog):
    import c2pa

    cert, key = chain_files(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(picture_png((64, 64), 2))
    redo = small_row("redo", "the lighthouse at night", init_image="in/photo.png", strength=0.7)
    manifest = write_manifest(tmp_path / "rows.parquet", [*ROWS[:2], redo])
    output = tmp_path / "out"
    args = ["run", str(manifest), "-o", str(output), "--c2pa-cert", str(cert), "--c2pa-key", str(key)]
    assert main([*args, "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "IPTC XMP + C2PA (signed)" in printed.out
    key_text = key.read_text()
    secret_lines = [line for line in key_text.splitlines() if line and "-----" not in line]
    for row in ROWS[:2]:
        data = (output / "images" / f"{row['id']}.png").read_bytes()
        report = json.loads(c2pa.Reader("image/png", io.BytesIO(data)).json())
        codes = {status["code"] for status in report.get("validation_status", [])}
        assert codes <= {"signingCredential.untrusted"}, codes
        active = report["manifests"][report["active_manifest"]]
        actions = next(a for a in active["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
        assert actions[0]["action"] == "c2pa.created"
        assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    # A row that starts from a person's image: an edit of it, the image its parent ingredient.
    report = json.loads(c2pa.Reader("image/png", io.BytesIO((output / "images" / "redo.png").read_bytes())).json())
    active = report["manifests"][report["active_manifest"]]
    actions = next(a for a in active["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert [action["action"] for action in actions][-1] == "c2pa.edited"
    assert actions[-1]["digitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert [ingredient["relationship"] for ingredient in active["ingredients"]] == ["parentOf"]
    assert active["ingredients"][0]["title"] == "photo.png"
    written = [path.read_bytes() for path in output.rglob("*") if path.is_file()]
    for line in secret_lines:
        assert not any(line.encode() in data for data in written)
        assert line not in printed.out + printed.err + caplog.text


def test_wrong_or_unusable_outputs_are_refused_before_any_model_loads(tmp_path, tiny_model, capsys, monkeypatch):
    from qwen_batch.run import engine

    monkeypatch.setattr(engine, "generator_for", lambda *a: pytest.fail("a model was loaded"))
    cert, key = chain_files(tmp_path)
    other_cert, _ = chain_files(tmp_path / "other")
    manifest = write_manifest(tmp_path / "rows.parquet", ROWS[:1])
    base = ["run", str(manifest), "-o", str(tmp_path / "out"), "--device", "cpu"]

    assert main([*base, "--c2pa-cert", str(other_cert), "--c2pa-key", str(key)]) == 2
    assert "does not match" in capsys.readouterr().err
    (tmp_path / "garbage.pem").write_text("not a certificate")
    assert main([*base, "--c2pa-cert", str(tmp_path / "garbage.pem"), "--c2pa-key", str(key)]) == 2
    assert "--c2pa-cert" in capsys.readouterr().err
    assert main([*base, "--c2pa-cert", str(cert)]) == 2
    assert "--c2pa-cert and --c2pa-key go together" in capsys.readouterr().err
    assert main([*base, "--model", "tiny-2.1", "--image-format", "jpeg"]) == 2
    error = capsys.readouterr().err
    assert "jpeg cannot keep the alpha channel" in error and "use png or webp" in error
    assert not (tmp_path / "out" / "images").exists()


def test_the_fan_outs_parent_takes_changed_rows_out_of_their_shards_before_any_shard_starts(tmp_path, tiny_model):
    """So two shard runs never rewrite one shard file at the same moment: each then finds nothing to take out."""
    from prefect.logging import disable_run_logger

    from flows.parameters import FanoutParameters
    from flows.qwen_image_fanout import check_manifest

    manifest = write_manifest(tmp_path / "rows.parquet", ROWS[:4])
    output = tmp_path / "out"
    assert main(["run", str(manifest), "-o", str(output), "--output-format", "webdataset", *SHARD_ARGS]) == 0
    changed = [dict(row) for row in ROWS[:4]]
    changed[2]["prompt"] = "a lighthouse in fog"
    write_manifest(manifest, changed)
    params = FanoutParameters(
        manifest=str(manifest), output=str(output), model="tiny", output_format="webdataset", shard_size=2, shards=2
    )
    with disable_run_logger():
        check_manifest.fn(params)
    assert shard_rows(output) == collections.Counter({row["id"]: 1 for row in ROWS[:4] if row["id"] != "row.2"})
