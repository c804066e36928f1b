"""Manifest validation: manifest-level problems stop the run; row-level problems mark just that row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen_batch.errors import ManifestError
from qwen_batch.manifest import DEFAULT_NEGATIVE_PROMPT, derive_seed, read_manifest
from tests.support import write_manifest

EXAMPLE = Path(__file__).parents[1] / "prompts" / "example.parquet"


def test_defaults_fill_missing_optional_columns(tmp_path):
    manifest = read_manifest(str(write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat"}])))
    (request,) = manifest.requests
    assert (request.width, request.height) == (1024, 1024)
    assert request.num_inference_steps == 50
    assert request.true_cfg_scale == 4.0
    assert request.negative_prompt == DEFAULT_NEGATIVE_PROMPT == " "
    assert request.uses_cfg
    assert request.seed == derive_seed("a")


def test_derived_seed_is_stable_and_depends_on_the_id():
    assert derive_seed("row-1") == derive_seed("row-1")
    assert derive_seed("row-1") != derive_seed("row-2")
    assert 0 <= derive_seed("row-1") < 2**63


def test_given_values_are_used_and_null_means_default(tmp_path):
    rows = [
        {"id": "a", "prompt": "p", "seed": 5, "width": 512, "height": 768, "num_inference_steps": 20},
        {"id": "b", "prompt": "p", "seed": None, "width": None, "height": None, "num_inference_steps": None},
    ]
    a, b = read_manifest(str(write_manifest(tmp_path / "m.parquet", rows))).requests
    assert (a.seed, a.width, a.height, a.num_inference_steps) == (5, 512, 768, 20)
    assert (b.seed, b.width, b.height, b.num_inference_steps) == (derive_seed("b"), 1024, 1024, 50)


def test_cfg_is_off_at_scale_one_and_then_the_negative_prompt_is_not_encoded(tmp_path):
    rows = [{"id": "a", "prompt": "p", "negative_prompt": "ugly", "true_cfg_scale": 1.0}]
    (request,) = read_manifest(str(write_manifest(tmp_path / "m.parquet", rows))).requests
    assert not request.uses_cfg
    assert request.texts == ("p",)


def test_file_url_and_unicode_prompts_and_extra_columns(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": "zh", "prompt": "一只猫", "category": "animals"}])
    manifest = read_manifest(path.as_uri())
    assert manifest.requests[0].prompt == "一只猫"
    assert manifest.extra_columns == ["category"]


def test_integer_columns_written_as_floats_by_pandas_are_accepted_when_whole(tmp_path):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.float64())])
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "width": 512.0}], schema=schema)
    assert read_manifest(str(path)).requests[0].width == 512


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": None}, "prompt is empty"),
        ({"width": 100}, "width 100 is out of range: use 256 to 2048"),
        ({"height": 4096}, "height 4096 is out of range"),
        ({"width": 1000}, "width 1000 is not a multiple of 16: use 992 or 1008"),
        ({"width": -512}, "width -512 is out of range"),
        ({"num_inference_steps": 0}, "num_inference_steps 0 is out of range: use 2 to 200"),
        ({"num_inference_steps": 1}, "one step gives a NaN image"),
        ({"num_inference_steps": 201}, "num_inference_steps 201 is out of range"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale nan is out of range"),
        ({"true_cfg_scale": -1.0}, "true_cfg_scale -1.0 is out of range"),
        ({"id": "a/b"}, "id 'a/b' is not allowed"),
        ({"id": ".."}, "id '..' is not allowed"),
        ({"id": "x" * 129}, "is not allowed"),
        ({"id": None}, "id is missing"),
    ],
)
def test_row_level_problems_mark_only_that_row_invalid(tmp_path, row, expected):
    rows = [{"id": "good", "prompt": "fine"}, {"id": "bad", "prompt": "p", **row}]
    manifest = read_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    assert [request.id for request in manifest.requests] == ["good"]
    (invalid,) = manifest.invalid
    assert invalid.index == 1
    assert expected in invalid.reason
    assert "row 1 " in manifest.report() and expected in manifest.report()


def test_all_problems_of_a_row_are_reported_together(tmp_path):
    rows = [{"id": "a", "prompt": "", "width": 100, "num_inference_steps": 0}]
    (invalid,) = read_manifest(str(write_manifest(tmp_path / "m.parquet", rows))).invalid
    assert "prompt is empty" in invalid.reason
    assert "width 100" in invalid.reason
    assert "num_inference_steps 0" in invalid.reason


def test_missing_file_is_a_manifest_error_naming_it(tmp_path):
    with pytest.raises(ManifestError, match=r"no-such\.parquet: no such file"):
        read_manifest(str(tmp_path / "no-such.parquet"))


def test_a_file_that_is_not_parquet_is_a_manifest_error(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt\na,cat\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(str(path))


def test_a_truncated_parquet_file_is_a_manifest_error(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(str(path))


def test_missing_required_column_names_it(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["a cat"]}), path)
    with pytest.raises(ManifestError, match=r"missing required column\(s\) 'prompt'; found \['id', 'text'\]"):
        read_manifest(str(path))


def test_wrong_column_type_names_column_and_expected_type(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "width": ["1024"]}), path)
    with pytest.raises(ManifestError, match="column 'width' has type string; it must be integer"):
        read_manifest(str(path))
    pq.write_table(pa.table({"id": [1], "prompt": ["p"]}), path)
    with pytest.raises(ManifestError, match="column 'id' has type int64; it must be string"):
        read_manifest(str(path))


def test_duplicate_ids_name_the_ids_and_rows(tmp_path):
    rows = [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}]
    with pytest.raises(ManifestError, match=r"duplicated value\(s\): 'a' at rows 0, 2"):
        read_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))


def test_columns_reserved_for_results_are_refused(tmp_path):
    rows = [{"id": "a", "prompt": "p", "status": "done"}]
    with pytest.raises(ManifestError, match=r"\['status'\] are written by qwen-batch"):
        read_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))


def test_example_manifest_is_valid_and_varied():
    manifest = read_manifest(str(EXAMPLE))
    assert manifest.num_rows >= 20 and not manifest.invalid
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in r.prompt) for r in manifest.requests)
    assert len({(r.width, r.height) for r in manifest.requests}) >= 4
    assert any(r.negative_prompt != " " for r in manifest.requests)
    assert pq.read_table(EXAMPLE).column("seed").null_count < manifest.num_rows
