"""The `qwen-batch` command end to end on the tiny model: outputs, results, exit codes, resume."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwen_batch.cli import main
from qwen_batch.outputs.png import read_png_metadata
from tests.support import small_row, write_manifest

RESULT_COLUMNS = [
    "id",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "seed",
    "num_inference_steps",
    "true_cfg_scale",
    "loras",  # null: no adapter
    "scheduler_shift",  # null: the model's own schedule
    "category",  # carried from the manifest
    "status",
    "image",
    "error",
    "warning",
    "model",
    "transformer",
    "transformer_sha256",
    "sha256",
    "fingerprint",
    "seconds",
    "finished_at",
]


def run_cli(*args: str) -> int:
    return main(list(args))


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest(tmp_path):
    rows = [
        small_row("cat", "a cat on a sofa", category="animals"),
        small_row("zh", "一只在月光下奔跑的狐狸", category="animals", seed=7),
        small_row("bad-size", "a house", width=1000, category="buildings"),
        small_row("wide", "a beach", width=384, category="places", negative_prompt="people"),
    ]
    return write_manifest(tmp_path / "manifest.parquet", rows)


def results(output: Path) -> list[dict]:
    return pq.read_table(output / "results.parquet").to_pylist()


def test_run_writes_images_results_and_exits_1_when_a_row_is_invalid(tmp_path, manifest, capsys, tiny_model):
    output = tmp_path / "out"
    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 1

    printed = capsys.readouterr().out
    assert "generated  3" in printed and "invalid    1" in printed
    assert "row 2 id='bad-size' invalid: width 1000 is not a multiple of 16: use 992 or 1008" in printed

    table = pq.read_table(output / "results.parquet")
    assert table.column_names == RESULT_COLUMNS
    rows = table.to_pylist()
    assert [row["id"] for row in rows] == ["cat", "zh", "bad-size", "wide"]  # one per manifest row, in order
    assert [row["status"] for row in rows] == ["ok", "ok", "invalid", "ok"]
    assert [row["category"] for row in rows] == ["animals", "animals", "buildings", "places"]
    invalid = rows[2]
    assert invalid["image"] is None and "width 1000" in invalid["error"]

    for row in (rows[0], rows[1], rows[3]):
        image = Path(row["image"])
        assert image == output / "images" / f"{row['id']}.png"
        assert hashlib.sha256(image.read_bytes()).hexdigest() == row["sha256"]
        assert row["error"] == "" and row["model"] == "tiny" and row["seconds"] > 0
        with Image.open(image) as png:
            assert png.size == (row["width"], row["height"])
    assert rows[1]["seed"] == 7
    assert rows[0]["negative_prompt"] == " " and rows[3]["negative_prompt"] == "people"
    assert not list((output / "_parts").glob("*.parquet")), "part files are folded into results.parquet"


def test_png_metadata_carries_the_generation_parameters(tmp_path, manifest, tiny_model):
    output = tmp_path / "out"
    run_cli("run", str(manifest), "--output", str(output), "--device", "cpu")
    row = next(row for row in results(output) if row["id"] == "zh")
    data = Path(row["image"]).read_bytes()
    metadata = read_png_metadata(data)
    assert metadata["prompt"] == "一只在月光下奔跑的狐狸"
    assert metadata["seed"] == 7 and metadata["num_inference_steps"] == 2 and metadata["true_cfg_scale"] == 4.0
    with Image.open(Path(row["image"])) as png:
        text = png.text["parameters"]
    assert text.startswith("一只在月光下奔跑的狐狸\nNegative prompt:  \n")
    assert "Steps: 2" in text and "Seed: 7" in text and "Size: 256x256" in text and "CFG scale: 4.0" in text


def test_all_ok_exits_0(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("one", "a red apple")])
    assert run_cli("run", str(manifest), "--output", str(tmp_path / "out"), "--device", "cpu") == 0
    assert "generated  1" in capsys.readouterr().out


def test_manifest_error_exits_2_and_writes_nothing(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "x"), small_row("a", "y")])
    output = tmp_path / "out"
    assert run_cli("run", str(manifest), "--output", str(output)) == 2
    assert "column 'id' has 1 duplicated value(s): 'a' at rows 0, 1" in capsys.readouterr().err
    assert not output.exists()


def test_usage_errors_exit_2(tmp_path, manifest, capsys):
    assert run_cli("run", str(manifest), "--output", str(tmp_path / "o"), "--batch-size", "0") == 2
    assert "--batch-size 0" in capsys.readouterr().err
    assert run_cli("run", str(manifest), "--output", str(tmp_path / "o"), "--dtype", "fp16") == 2
    assert "fp16 overflows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(manifest)])  # --output is required
    assert exit_info.value.code == 2


def test_resume_skips_done_rows_and_regenerates_changed_ones(tmp_path, tiny_model, capsys):
    rows = [small_row("a", "a cat"), small_row("b", "a dog"), small_row("c", "a bird")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 0
    first = {row["id"]: row for row in results(output)}
    capsys.readouterr()

    # Same command again: nothing to do.
    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "generated  0" in printed and "skipped    3" in printed
    assert {row["id"]: row for row in results(output)} == first

    # One prompt and one seed change: only those two rows run again.
    rows[1]["prompt"] = "a dog in the rain"
    rows[2]["seed"] = 99
    write_manifest(tmp_path / "m.parquet", rows)
    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "generated  2" in printed and "skipped    1" in printed
    third = {row["id"]: row for row in results(output)}
    assert third["a"] == first["a"]
    assert third["b"]["prompt"] == "a dog in the rain" and third["b"]["sha256"] != first["b"]["sha256"]
    assert third["c"]["seed"] == 99 and third["c"]["finished_at"] > first["c"]["finished_at"]


def test_a_deleted_image_is_regenerated(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    output = tmp_path / "out"
    run_cli("run", str(manifest), "--output", str(output), "--device", "cpu")
    (output / "images" / "b.png").unlink()
    capsys.readouterr()
    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 0
    assert "generated  1" in capsys.readouterr().out
    assert (output / "images" / "b.png").exists()


def test_second_run_with_a_shared_cache_encodes_nothing(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    cache = tmp_path / "cache"
    run_cli("run", str(manifest), "--output", str(tmp_path / "one"), "--cache", str(cache), "--device", "cpu")
    assert "3 texts encoded, 0 from cache" in capsys.readouterr().out  # two prompts and the shared " "
    stored = sorted(cache.rglob("*.safetensors"))
    assert len(stored) == 3

    run_cli("run", str(manifest), "--output", str(tmp_path / "two"), "--cache", str(cache), "--device", "cpu")
    assert "0 texts encoded, 3 from cache" in capsys.readouterr().out
    assert sorted(cache.rglob("*.safetensors")) == stored
    assert not (tmp_path / "one" / "cache").exists(), "--cache replaces the default location"


def test_a_failing_row_does_not_stop_the_others(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    cache = tmp_path / "cache"
    run_cli("run", str(manifest), "--output", str(tmp_path / "one"), "--cache", str(cache), "--device", "cpu")
    # Corrupt the cached embedding of "a dog": its row fails in stage 2, the other still runs.
    from qwen_batch.pipeline.embedding_cache import text_key

    key = text_key("a dog")
    (entry,) = cache.rglob(f"{key}.safetensors")
    entry.write_bytes(b"not a safetensors file")
    capsys.readouterr()

    output = tmp_path / "two"
    code = run_cli("run", str(manifest), "--output", str(output), "--cache", str(cache), "--device", "cpu", "-q")
    assert code == 1
    printed = capsys.readouterr().out
    assert "generated  1" in printed and "failed     1" in printed
    assert "row 1 id='b' failed:" in printed and "corrupt cache entry" in printed
    statuses = {row["id"]: (row["status"], row["error"]) for row in results(output)}
    assert statuses["a"] == ("ok", "")
    assert statuses["b"][0] == "failed" and "corrupt cache entry" in statuses["b"][1]


def test_validate_prints_the_report_without_loading_models(manifest, capsys):
    assert main(["validate", str(manifest)]) == 1
    printed = capsys.readouterr().out
    assert "4 rows, 3 valid, 1 invalid" in printed
    assert "row 2 (id 'bad-size'): width 1000 is not a multiple of 16" in printed
    assert "extra columns carried into results: category" in printed


def test_validate_exit_codes_for_good_and_unreadable_manifests(tmp_path, capsys):
    good = write_manifest(tmp_path / "good.parquet", [small_row("a", "x")])
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(tmp_path / "missing.parquet")]) == 2
    assert "missing.parquet: no such file" in capsys.readouterr().err


def test_tiny_model_command_writes_a_diffusers_folder(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert (tmp_path / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("task", "pipeline"), [("edit", "QwenImageEditPipeline"), ("edit-plus", "QwenImageEditPlusPipeline")]
)
def test_tiny_model_command_writes_an_edit_pipeline_that_from_pretrained_loads(tmp_path, capsys, task, pipeline):
    import diffusers

    folder = tmp_path / task
    assert main(["tiny-model", "--task", task, str(folder)]) == 0
    assert "Qwen-Image-Edit" in capsys.readouterr().out
    loaded = getattr(diffusers, pipeline).from_pretrained(str(folder))
    assert type(loaded).__name__ == pipeline and loaded.processor is not None
    # A model folder an edit manifest runs on with --model, like a downloaded Qwen/Qwen-Image-Edit.
    manifest = REPO / "prompts" / ("edit_example.parquet" if task == "edit" else "edit_plus_example.parquet")
    assert main(["validate", str(manifest)]) == 0


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from qwen_batch.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    done = subprocess.run([sys.executable, "-m", "qwen_batch.cli", "run", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--batch-size" in done.stdout and "--cache" in done.stdout


def test_a_model_that_cannot_be_loaded_exits_2_with_the_fix(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat")])
    output = str(tmp_path / "out")
    # Offline (conftest sets HF_HUB_OFFLINE): a hub id that was never downloaded cannot load.
    assert run_cli("run", str(manifest), "--output", output, "--model", "Nobody/no-such-model", "--device", "cpu") == 2
    error = capsys.readouterr().err
    assert "cannot load model 'Nobody/no-such-model'" in error and "hf download Nobody/no-such-model" in error
    assert run_cli("run", str(manifest), "--output", output, "--model", str(tmp_path / "nowhere" / "m")) == 2
    assert "neither a local folder nor a hub id" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli("run", str(manifest), "--output", output, "--model", str(tmp_path / "empty")) == 2
    assert "not a diffusers model folder (no model_index.json)" in capsys.readouterr().err


def test_shards_split_the_rows_and_an_unsharded_run_merges_them(tmp_path, tiny_model, capsys):
    from qwen_batch.manifest import read_manifest
    from qwen_batch.run.sharding import assign_shards

    rows = [small_row(f"row-{n}", f"prompt number {n}") for n in range(6)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    assignment = assign_shards(read_manifest(str(manifest)).requests, 2)
    expected = {shard: sum(assignment[row["id"]] == shard for row in rows) for shard in (0, 1)}
    assert expected == {0: 3, 1: 3}, "equal rows: equal shares"

    for shard in (0, 1):
        args = ("run", str(manifest), "--output", str(output), "--device", "cpu", "--shard", f"{shard}/2")
        assert run_cli(*args) == 0
        assert f"generated  {expected[shard]}" in capsys.readouterr().out
        assert not (output / "results.parquet").exists(), "a shard leaves part files; it never merges"
    assert len(list((output / "images").glob("*.png"))) == 6

    assert run_cli("run", str(manifest), "--output", str(output), "--device", "cpu") == 0
    assert "generated  0" in capsys.readouterr().out
    merged = results(output)
    assert sorted(row["id"] for row in merged) == sorted(row["id"] for row in rows)
    assert all(row["status"] == "ok" for row in merged)


def test_bad_shard_is_a_usage_error(tmp_path, manifest, capsys):
    assert run_cli("run", str(manifest), "--output", str(tmp_path / "o"), "--shard", "2/2") == 2
    assert "shard 2/2" in capsys.readouterr().err
    assert run_cli("run", str(manifest), "--output", str(tmp_path / "o"), "--shard", "half") == 2
    assert "--shard 'half': write it as K/N" in capsys.readouterr().err
