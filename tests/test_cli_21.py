"""The CLI with Qwen-Image-2.1: `validate --model` checks a manifest with the model's family and checkpoint rules
(reading no weights, building no tiny model), `tiny-model --model` writes the tiny 2.1 models, and the 2.1 demo
(`make demo-2.1`) runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwen_batch.cli import build_parser, main
from qwen_batch.families.qwen_image21.tiny import TURBO_SIGMAS
from qwen_batch.manifest import read_manifest
from tests.support import small_row, write_manifest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "prompts" / "qwen_image21_example.parquet"


@pytest.fixture
def manifest21(tmp_path):
    """A 2.1 manifest: text-only rows and condition images, with one problem of 2.1's rules per row but the first."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "img" / "photo.png")
    rows = [
        row("ok", "a red fox", images=["img/photo.png"]),
        row("odd-size", "x", width=272),
        row("too-many", "x", images=["img/photo.png"] * 5),
        row("cfg-without-negative", "x", true_cfg_scale=4.0),
        row("forty-steps", "x", num_inference_steps=40),
        row("init", "x", init_image="img/photo.png"),
    ]
    return write_manifest(tmp_path / "m21.parquet", rows)


def row(row_id: str, prompt: str, **overrides) -> dict:
    """A 256x256 row with the model's own steps (Turbo takes no other count than its 8)."""
    return {"id": row_id, "prompt": prompt, "width": 256, "height": 256, **overrides}


def reported(capsys) -> dict[str, str]:
    """The invalid rows of the report just printed: id -> reason."""
    lines = capsys.readouterr().out.splitlines()
    return {line.split("'")[1]: line.split("): ", 1)[1] for line in lines if line.startswith("  row ")}


def test_validate_model_checks_a_21_manifest_with_21s_rules(manifest21, capsys):
    assert main(["validate", str(manifest21), "--model", "tiny-2.1"]) == 1  # as for any invalid row
    reasons = reported(capsys)
    assert set(reasons) == {"odd-size", "too-many", "cfg-without-negative", "init"}
    assert "width 272 is not a multiple of 32: use 256 or 288" in reasons["odd-size"]
    assert "images has 5 images; use at most 4 condition images" in reasons["too-many"]
    assert "true_cfg_scale 4.0 needs a negative_prompt" in reasons["cfg-without-negative"]
    assert "with Qwen-Image-2.1 give the image in `images`" in reasons["init"]  # the family's `unsupported`

    assert main(["validate", str(manifest21), "--model", "tiny-2.1-turbo"]) == 1
    reasons = reported(capsys)
    assert set(reasons) == {"odd-size", "too-many", "cfg-without-negative", "forty-steps", "init"}
    assert (
        "num_inference_steps 40 cannot be used: this checkpoint samples a fixed grid of 8 sigmas"
        in reasons["forty-steps"]
    )


def test_validate_model_agrees_with_what_the_run_decides(manifest21, tmp_path, capsys):
    from qwen_batch.run.engine import RunConfig, plan_run

    for model in ("tiny-2.1", "tiny-2.1-turbo"):
        main(["validate", str(manifest21), "--model", model])
        plan = plan_run(RunConfig(str(manifest21), str(tmp_path / model), model=model, device="cpu"))
        assert reported(capsys) == {row.id: row.reason for row in plan.manifest.invalid}, model


def test_validate_without_model_checks_qwen_images_rules_as_before(tmp_path, capsys):
    rows = [small_row("ok", "a cat"), small_row("odd-21", "x", width=272), small_row("bad", "x", width=1000)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    for args in ([], ["--model", "tiny"]):
        assert main(["validate", str(manifest), *args]) == 1
        printed = capsys.readouterr().out
        assert printed == read_manifest(str(manifest)).report() + "\n", "Qwen-Image's rules, the same report"
        assert "3 rows, 2 valid, 1 invalid" in printed and "width 1000 is not a multiple of 16" in printed
    good = write_manifest(tmp_path / "good.parquet", [small_row("a", "x", num_inference_steps=40)])
    assert main(["validate", str(good)]) == 0


def test_validate_model_reads_only_a_folders_model_index(manifest21, tmp_path, capsys):
    folder = tmp_path / "turbo"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "QwenImage21Pipeline", "sample_sigmas": TURBO_SIGMAS})
    )
    assert main(["validate", str(manifest21), "--model", str(folder)]) == 1
    assert "fixed grid of 8 sigmas" in reported(capsys)["forty-steps"]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert main(["validate", str(manifest21), "--model", str(folder)]) == 2
    assert "is a FluxPipeline; qwen-batch runs" in capsys.readouterr().err
    assert main(["validate", str(manifest21), "--model", str(tmp_path / "nowhere" / "m")]) == 2


def test_validate_model_imports_no_torch_and_builds_no_tiny_model(manifest21, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys; from qwen_batch.cli import main; "
        f"codes = [main(['validate', {str(manifest21)!r}, '--model', m, '-q']) for m in ('tiny-2.1', 'tiny-2.1-turbo')]; "
        "print(codes, sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    env = {"QWEN_BATCH_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip().endswith("[1, 1] []")
    assert not any(home.iterdir()), "no tiny model was built"


def test_tiny_model_command_writes_the_tiny_21_models(manifest21, tmp_path, capsys):
    import diffusers

    base, turbo = tmp_path / "tiny-2.1", tmp_path / "tiny-2.1-turbo"
    assert main(["tiny-model", "--model", "tiny-2.1", str(base)]) == 0
    assert "tiny-2.1 model (QwenImage21Pipeline)" in capsys.readouterr().out
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline" and not index.get("sample_sigmas")
    assert type(diffusers.QwenImage21Pipeline.from_pretrained(str(base))).__name__ == "QwenImage21Pipeline"

    assert main(["tiny-model", "--model", "tiny-2.1-turbo", str(turbo)]) == 0
    assert json.loads((turbo / "model_index.json").read_text())["sample_sigmas"] == TURBO_SIGMAS
    # The rules validate reads from a tiny model's name are those of the folder it is built into.
    for name, folder in (("tiny-2.1", base), ("tiny-2.1-turbo", turbo)):
        capsys.readouterr()
        main(["validate", str(manifest21), "--model", name])
        by_name = reported(capsys)
        main(["validate", str(manifest21), "--model", str(folder)])
        assert reported(capsys) == by_name, name


def test_tiny_model_command_refuses_what_does_not_go_with_a_21_model(tmp_path, capsys):
    assert main(["tiny-model", "--model", "tiny-2.1", "--format", "fp8", str(tmp_path / "t.safetensors")]) == 2
    assert "--format fp8: only Qwen-Image's tiny transformer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--model", "tiny-2.1", "--task", "edit", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "not allowed with argument --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiny-model", "--model", "Qwen/Qwen-Image", str(tmp_path / "x")])  # tiny models only
    assert not list(tmp_path.iterdir())


def test_the_help_names_the_21_tiny_models():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for command in ("tiny-model", "tiny-lora"):
        shown = " ".join(commands[command].format_help().split())
        assert "tiny-edit-plus" in shown and "tiny-2.1" in shown and "tiny-2.1-turbo" in shown, command


def test_plan_for_turbo_plans_its_8_steps(capsys):
    assert main(["plan", "--model", "tiny-2.1-turbo", "--gpu-memory", "24", "--host-memory", "64", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["steps"] == 8
    assert main(["plan", "--model", "tiny-2.1", "--gpu-memory", "24", "--host-memory", "64", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["steps"] == 40


def test_the_21_demo_runs_every_row(tmp_path, capsys):
    """`make demo-2.1`: the example manifest on the tiny 2.1 model, every row an RGBA image."""
    output = tmp_path / "demo-2.1"
    args = ["run", str(EXAMPLE), "--output", str(output), "--model", "tiny-2.1", "--device", "cpu", "-q"]
    assert main(args) == 0
    assert "generated  6" in capsys.readouterr().out
    results = pq.read_table(output / "results.parquet").to_pylist()
    assert [row["status"] for row in results] == ["ok"] * 6
    for row in results:
        with Image.open(row["image"]) as image:
            assert image.mode == "RGBA" and image.size == (row["width"], row["height"])
    assert main(args) == 0 and "skipped    6" in capsys.readouterr().out
