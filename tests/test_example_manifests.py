"""The example manifests in prompts/: each `.parquet` is what its `.jsonl` builds, and the build scripts import
one another without a loop (`python prompts/build.py` rebuilds them all)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
SOURCES = sorted(PROMPTS.glob("*.jsonl"))


def sibling_imports(script: Path) -> set[str]:
    """The prompts/ scripts `script` imports, wherever the import is (module level, a function, __main__)."""
    siblings = {path.stem for path in PROMPTS.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & siblings - {script.stem}


def test_the_build_scripts_import_no_loop():
    graph = {script.stem: sibling_imports(script) for script in PROMPTS.glob("*.py")}
    assert graph["build"] >= {"build_edit", "jsonl_to_parquet"}  # the graph is really read

    def reaches(start: str, target: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            name == target or (name not in seen and reaches(name, target, seen | {name})) for name in graph[start]
        )

    assert not [name for name in graph if reaches(name, name)]


@pytest.mark.parametrize("source", SOURCES, ids=[source.stem for source in SOURCES])
def test_each_example_parquet_is_what_its_jsonl_builds(source, tmp_path):
    spec = importlib.util.spec_from_file_location("jsonl_to_parquet", PROMPTS / "jsonl_to_parquet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(Path(shutil.copy(source, tmp_path)))
    committed = pq.read_table(source.with_suffix(".parquet"))
    assert pq.read_table(built).equals(committed, check_metadata=True)
    assert committed.num_rows > 0


def test_the_qwen_image21_example_is_valid_with_21s_rules(capsys):
    """prompts/qwen_image21_example.parquet (`make demo-2.1`): every row valid for tiny-2.1 (sizes multiple of 32,
    few steps, guidance with a negative prompt), text-only rows of different lengths and rows with small condition
    images, one of them RGBA with transparency."""
    from PIL import Image

    from qwen_batch.cli import main

    example = PROMPTS / "qwen_image21_example.parquet"
    assert main(["validate", str(example), "--model", "tiny-2.1"]) == 0
    assert "6 rows, 6 valid, 0 invalid" in capsys.readouterr().out
    rows = pq.read_table(example).to_pylist()
    assert len({len(row["prompt"]) for row in rows if not row["images"]}) >= 3, "text-only prompts of several lengths"
    assert any(row["negative_prompt"] and row["true_cfg_scale"] == 3.0 for row in rows)
    assert all(row["num_inference_steps"] <= 8 and row["width"] in (256, 512) for row in rows)
    images = {PROMPTS / path for row in rows for path in row["images"] or ()}
    assert len(images) == 2 and max(len(row["images"] or ()) for row in rows) == 2
    modes = set()
    for path in images:
        assert path.stat().st_size < 10_000
        with Image.open(path) as image:
            assert image.size == (64, 64)
            modes.add(image.mode)
            if image.mode == "RGBA":
                assert image.getextrema()[3][0] == 0, "transparent somewhere"
    assert modes == {"RGB", "RGBA"}
