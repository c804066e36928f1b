"""The benchmark harness (bench/harness.py) on the CPU, so that bench/ cannot rot where there is no GPU.

The selection (`--only`), the time budget and the skipping of scenarios the results file says are done, on
scenarios of the test's own; one real scenario of bench/throughput.py on the tiny model, run as its command
line runs it; every benchmark module importing and parsing its options; and the results the tests read
marked as test data.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness
from bench.harness import DONE, Scenario, main, scenarios

REPOSITORY = Path(__file__).resolve().parents[1]
MODULES = sorted(
    path.stem
    for path in (REPOSITORY / "bench").glob("*.py")
    if path.stem not in {"__init__", "harness", "full_size", "full_size21", "measure", "rows", "versus"}
)
CALLS: list[tuple[str, dict]] = []


def record(runner, **params) -> None:
    CALLS.append((runner.scenario.name, params))
    runner.write({"run": "record", **params})


def slow(runner, seconds: float) -> None:
    CALLS.append((runner.scenario.name, {}))
    time.sleep(seconds)


def fails(runner) -> None:
    CALLS.append((runner.scenario.name, {}))
    raise RuntimeError("out of memory, say")


OWN = scenarios(
    Scenario("bf16-a", record, {"value": 1}, "a"),
    Scenario("bf16-b", record, {"value": 2, "size": 1024}, "b"),
    Scenario("fp8-a", record, {"value": 3}, "c", minutes=10),
    Scenario("step", record, {}, "a part", part_of="bf16-a"),
)


def run(results: Path, *options: str, of=OWN) -> list[str]:
    """The harness over `of` with `options`; the scenarios whose `measure` ran, in order."""
    CALLS.clear()
    code = main(of, "bench.test_harness", argv=["--json", str(results), "--work", str(results.parent), *options])
    assert code in (0, 1)
    return [name for name, _ in CALLS]


def lines(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()]


def test_only_picks_scenarios_by_name_or_pattern_and_refuses_unknown_ones(tmp_path):
    results = tmp_path / "r.jsonl"
    assert run(results, "--only", "bf16-b") == ["bf16-b"]
    assert run(results, "--only", "fp8-*,step") == ["fp8-a", "step"]
    assert run(tmp_path / "all.jsonl") == ["bf16-a", "bf16-b", "fp8-a"]  # without --only: all but the parts
    with pytest.raises(SystemExit, match="unknown scenario nope"):
        run(results, "--only", "nope")


def test_every_line_names_its_scenario_gpu_and_versions_and_a_done_line_closes_it(tmp_path):
    results = tmp_path / "r.jsonl"
    run(results, "--only", "bf16-a")
    measured, done = lines(results)
    assert measured["scenario"] == "bf16-a" and measured["run"] == "record" and measured["value"] == 1
    for line in (measured, done):
        assert {"gpu", "torch", "diffusers", "transformers"} <= set(line)
    assert done["run"] == DONE and done["scenario"] == "bf16-a" and done["model"] == "full"


def test_scenarios_done_are_skipped_until_rerun_and_failed_ones_run_again(tmp_path):
    results = tmp_path / "r.jsonl"
    assert run(results, "--only", "bf16-*") == ["bf16-a", "bf16-b"]
    assert run(results) == ["fp8-a"]  # the same command again: only what is not done
    assert run(results) == []
    assert run(results, "--only", "bf16-a", "--rerun") == ["bf16-a"]
    assert run(results, "--only", "bf16-a", "--model", "tiny") == ["bf16-a"]  # done with the full model only

    failing = scenarios(Scenario("flaky", fails, {}, "fails"))
    assert run(results, of=failing) == ["flaky"]
    assert lines(results)[-1]["run"] == "error" and "out of memory" in lines(results)[-1]["error"]
    assert run(results, of=failing) == ["flaky"]  # not done: the next command tries it again


def test_the_budget_starts_no_scenario_past_it_nor_one_its_estimate_would_overrun(tmp_path):
    harness.environment()  # imported once, so that the budget below counts the scenarios alone
    timed = scenarios(
        Scenario("first", slow, {"seconds": 0.5}, "first"),
        Scenario("second", record, {}, "second"),
    )
    assert run(tmp_path / "a.jsonl", "--budget", "0.3", of=timed) == ["first"]
    assert run(tmp_path / "a.jsonl", "--budget", "0.3", of=timed) == ["second"]  # the same command: the rest
    # fp8-a says 10 minutes on a GPU: not started with 5 left; a dry run does not count GPU estimates.
    assert run(tmp_path / "b.jsonl", "--budget", "300") == ["bf16-a", "bf16-b"]
    assert run(tmp_path / "c.jsonl", "--budget", "300", "--model", "tiny") == ["bf16-a", "bf16-b", "fp8-a"]


def test_a_dry_run_makes_sizes_and_counts_small():
    assert harness.dry_run(record, {"size": 1024, "steps": 50, "prompts": 200, "value": 7}) == {
        "size": 256,
        "steps": 2,
        "prompts": 2,
        "value": 7,
    }

    def measure(runner, size: int = 1024, images: int = 4, compile: bool = True) -> None: ...

    assert harness.dry_run(measure, {}) == {"size": 256, "images": 2}


def test_a_throughput_scenario_runs_on_the_tiny_model_and_is_skipped_once_done(tmp_path, tiny_model):
    """`python -m bench.throughput --model tiny --only busy-200`: the engine alone as `qwen-batch run` drives
    it (2 prompts, 2 steps, 256x256 in a dry run); then the same command skips it."""
    results, work = tmp_path / "results.jsonl", tmp_path / "work"
    command = ["--model", "tiny", "--only", "busy-200", "--json", str(results), "--work", str(work)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.throughput", *command], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured, closing = lines(results)
    assert measured["scenario"] == "busy-200" and measured["run"] == "engine" and measured["label"] == "busy-200"
    assert (measured["steps_run"], measured["width"], measured["prompts"]) == (2, 256, 2)
    assert measured["denoise"]["images"] == 2 and measured["exit_code"] == 0 and "error" not in measured
    assert measured["seconds_per_image_at_50_steps"] > 0 and measured["encode"]["texts"] >= 2
    assert closing["run"] == DONE and closing["model"] == "tiny" and closing["gpu"] == measured["gpu"]

    from bench.throughput import SCENARIOS

    CALLS.clear()
    assert main(SCENARIOS, "bench.throughput", argv=command) == 0
    assert len(lines(results)) == 2  # done: nothing ran, nothing written


@pytest.mark.parametrize("module", MODULES)
def test_every_benchmark_module_imports_and_parses_its_options(module, capsys):
    """GPU benchmarks cannot run here; they must still import, list their scenarios and parse `--help`."""
    imported = importlib.import_module(f"bench.{module}")
    assert imported.SCENARIOS and all(scenario.about for scenario in imported.SCENARIOS)
    entry = getattr(imported, "entry", None)
    with pytest.raises(SystemExit) as exit_:
        if entry is not None:
            entry(["--help"])
        else:
            main(imported.SCENARIOS, imported.__name__, imported.__doc__, argv=["--help"])
    assert exit_.value.code == 0
    assert "--only" in capsys.readouterr().out


def test_the_results_tests_read_are_marked_as_test_data():
    """A results file a test reads is listed under "Test data" in bench/results/README.md, and exists."""
    read = set()
    for test in (REPOSITORY / "tests").glob("*.py"):
        if test.name == Path(__file__).name:
            continue
        text = test.read_text()
        read |= set(re.findall(r'"bench"\s*/\s*"results"\s*/\s*"([^"]+)"', text))
        read |= set(re.findall(r"open\(.*bench/results/([\w.-]+)", text))
    readme = (REPOSITORY / "bench" / "results" / "README.md").read_text()
    test_data = readme.split("## Test data", 1)[1].split("\n## ", 1)[0]
    assert read, "no test reads bench/results: drop the Test data section instead"
    for name in read:
        assert f"`{name}`" in test_data, f"{name} is read by a test but not marked as test data"
        assert (REPOSITORY / "bench" / "results" / name).exists()


def test_what_the_benchmarks_import_from_the_library_exists():
    """Most of bench/ runs only on a GPU, and imports inside its functions: every `from qwen_batch... import`
    and `import qwen_batch...` in it must still resolve, and every speed lever still be an attribute."""
    import ast

    from bench.versus import levers

    for path in sorted((REPOSITORY / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qwen_batch"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{path.name}: {node.module}.{alias.name} is gone"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("qwen_batch"):
                        importlib.import_module(alias.name)
    with levers():  # reads each lever's current value: fails when one moved
        pass
