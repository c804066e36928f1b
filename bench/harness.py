"""One harness for every benchmark here: scenarios as data, one runner.

A benchmark module lists its `Scenario`s and hands them to `main`; every module takes the same options:

    python -m bench.throughput --list                          # its scenarios, what each answers, which are done
    python -m bench.throughput --only bf16,fp8 --json R.jsonl  # some of them (default: all but the parts)
    python -m bench.throughput --budget 540 --json R.jsonl     # start none past 540 s; the same command again
                                                               # runs what is left
    python -m bench.throughput --model tiny --only bf16        # a dry run: the same code on the CPU, tiny model

Each result is one JSON line appended to the results file (`--json`, default `out/bench/<module>.jsonl`),
carrying the scenario's name, the GPU and the library versions. A scenario that ran to its end is closed by
a `scenario-done` line; a scenario done on this GPU with this model is skipped (`--rerun` runs it again), so a
suite longer than one device command (10 minutes) runs to its end by repeating the command on a warm
machine. A scenario that fails writes its error as a line and the next one runs; it is not done.

`--model tiny` makes every scenario a dry run: the tiny random-weight model on the CPU, at 256x256, with at
most 2 steps and 2 rows (`DRY_RUN`), in no cgroup. It checks the code, not the figures.

Kept free of torch at import: a module's `--help` and `--list` load no model.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
IN_CGROUP = BENCH / "scripts" / "in_cgroup.sh"
DONE = "scenario-done"  # the `run` of the line that closes a finished scenario

# A dry run's caps on a scenario's parameters: sizes become 256, counts at most these.
DRY_RUN = {"size": 256, "steps": 2, "prompts": 2, "images": 2, "rows": 4}


@dataclass(frozen=True)
class Scenario:
    """One measurement, named by what it holds. `measure(runner, **params)` runs it and writes its lines
    with `runner.write`.

    `minutes`: about how long it takes on the reference GPU, compiles cold included: with `--budget`, a
    scenario is not started when it would end past the budget. `process`: run it in a process of its own
    (a fresh CUDA context, its own peaks and caches), also implied by `host_gib` (that process inside a
    cgroup v2 memory limit of that many GiB, bench/scripts/in_cgroup.sh: going over is an OOM kill, not a
    number) and `env` (that process's extra environment). `prepare(runner)` runs first, in this process
    (write a checkpoint, drop the page cache). `part_of`: a step another scenario runs (it is listed, and
    runs only when `--only` names it)."""

    name: str
    measure: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    about: str = ""
    minutes: float | None = None
    process: bool = False
    host_gib: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    prepare: Callable[[Runner], None] | None = None
    part_of: str | None = None

    @property
    def own_process(self) -> bool:
        return self.process or self.host_gib is not None or bool(self.env)


def scenarios(*items: Scenario) -> list[Scenario]:
    """The list, its names checked unique."""
    names = [item.name for item in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"scenario names must be unique: {', '.join(repeated)}")
    return list(items)


# --- The environment every line carries ---------------------------------------------------------------------

_ENVIRONMENT: dict[str, Any] = {}


def gpu_name() -> str:
    """The GPU this process measures on, without starting CUDA in a process that has not (a parent that only
    launches its scenarios' processes must hold no GPU memory): torch's name once CUDA runs, else nvidia-smi's."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        command = ["nvidia-smi", "-i", index, "--query-gpu=name", "--format=csv,noheader"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    return torch.cuda.get_device_name()


def environment() -> dict[str, Any]:
    """The GPU and the versions of what is measured: torch, diffusers, transformers, CUDA, torchao when
    installed. Computed once per process."""
    if not _ENVIRONMENT:
        import diffusers
        import torch
        import transformers

        _ENVIRONMENT.update(
            gpu=gpu_name(),
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
            cuda=torch.version.cuda,
        )
        with contextlib.suppress(ImportError):
            import torchao

            _ENVIRONMENT["torchao"] = torchao.__version__
    return dict(_ENVIRONMENT)


def read_lines(path: Path) -> list[dict]:
    """The results file's lines (none when it does not exist); a line cut off by a kill is left out."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(text))
    return lines


def done_scenarios(path: Path, gpu: str, model: str) -> set[str]:
    """The scenarios the results file says finished on this GPU with this model."""
    return {
        line["scenario"]
        for line in read_lines(path)
        if line.get("run") == DONE and line.get("gpu") == gpu and line.get("model") == model
    }


# --- The runner -----------------------------------------------------------------------------------------------


class Runner:
    """What a scenario's `measure` is given: the command's options (`args`), the model (`tiny`, `device`), its
    own empty work folder (`work`), the compile cache the scenarios share, `write` for its lines and `shared`
    for what several scenarios use (a loaded model)."""

    def __init__(self, module: str, args: argparse.Namespace, started: float | None = None):
        self.module, self.args = module, args
        self.started = started if started is not None else time.perf_counter()
        self.tiny = args.model == "tiny"
        self.device = "cpu" if self.tiny else "cuda"
        self.results = Path(args.json)
        self.root = Path(args.work)
        self.compile_cache = args.compile_cache or str(self.root / "compile-cache")
        self.scenario: Scenario | None = None
        self._shared: tuple[object, Any] | None = None

    @property
    def work(self) -> Path:
        """The running scenario's work folder, emptied before it starts (a run left there would be resumed)."""
        assert self.scenario is not None
        return self.root / "scenarios" / self.scenario.name

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def progress(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", file=sys.stderr, flush=True)

    def write(self, line: dict) -> dict:
        """Append one result line: the scenario's name first, the environment's fields where the line has none."""
        name = self.scenario.name if self.scenario else None
        environment_ = environment()
        full = {"scenario": name, **line, **{key: value for key, value in environment_.items() if key not in line}}
        text = json.dumps(full)
        print(text, flush=True)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as handle:
            handle.write(text + "\n")
        return full

    def shared(self, key: object, build: Callable[[], Any]) -> Any:
        """What `build()` returns, kept for the next scenarios that ask with the same key. One at a time: asking
        with another key closes the one held first (its `close()`), so two full-size models never coexist."""
        if self._shared is None or self._shared[0] != key:
            self.close_shared()
            self._shared = (key, build())
        return self._shared[1]

    def close_shared(self) -> None:
        if self._shared is not None:
            value, self._shared = self._shared[1], None
            close = getattr(value, "close", None)
            if close is not None:
                close()

    def child_command(self, name: str) -> list[str]:
        """The command that runs scenario `name` in a process of its own, with this command's options."""
        options = {key: value for key, value in vars(self.args).items() if key not in _SELECTION}
        return [sys.executable, "-m", self.module, "--child", name, "--child-options", json.dumps(options)]

    def in_cgroup(self, gib: float | None, command: list[str]) -> list[str]:
        """`command` inside a cgroup memory limit of `gib` GiB; as is in a dry run or without a limit."""
        if gib is None or self.tiny:
            return command
        return ["bash", str(IN_CGROUP), str(gib), *command]

    def prepare(self, scenario: Scenario) -> bool:
        """Run the scenario's `prepare` here; False, with its error as the scenario's line, when it fails."""
        if scenario.prepare is None:
            return True
        try:
            scenario.prepare(self)
        except Exception as error:
            traceback.print_exc()
            self.scenario = scenario
            try:
                self.write({"run": "error", "error": f"preparing it: {type(error).__name__}: {error}"})
            finally:
                self.scenario = None
            return False
        return True

    def run_here(self, scenario: Scenario) -> bool:
        """Run `scenario` in this process; True when it ran to its end (its `scenario-done` line written)."""
        self.scenario = scenario
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        started = time.perf_counter()
        params = dry_run(scenario.measure, scenario.params) if self.tiny else dict(scenario.params)
        try:
            scenario.measure(self, **params)
        except Exception as error:  # a failure is a result: recorded, shown whole, and the next scenario runs
            traceback.print_exc()
            self.write({"run": "error", "error": f"{type(error).__name__}: {error}"})
            return False
        else:
            seconds = round(time.perf_counter() - started, 1)
            self.write({"run": DONE, "model": self.args.model, "seconds": seconds})
            return True
        finally:
            self.scenario = None

    def run_apart(self, scenario: Scenario) -> bool:
        """Run `scenario` in a process of its own (in its cgroup, with its environment), which writes its lines;
        a process that dies (an OOM kill) leaves an error line here."""
        self.close_shared()  # that process needs the GPU
        command = self.in_cgroup(scenario.host_gib, self.child_command(scenario.name))
        code = subprocess.run(command, env={**os.environ, **scenario.env}).returncode
        if code not in (0, 1):  # 1: the scenario failed and said so in its own line
            self.scenario = scenario
            try:
                self.write({"run": "error", "error": f"its process exited with status {code}"})
            finally:
                self.scenario = None
        return code == 0


_SELECTION = ("only", "budget", "rerun", "list", "child", "child_options")


def dry_run(measure: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A scenario's parameters made small for the tiny model on the CPU (`DRY_RUN`), its measure's defaults
    included: a size becomes 256, a count at most its cap."""
    small = dict(params)
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(measure).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    for key, cap in DRY_RUN.items():
        value = small.get(key, defaults.get(key))
        if key == "size" and key in {*small, *defaults}:
            small[key] = cap
        elif isinstance(value, int) and not isinstance(value, bool):
            small[key] = min(value, cap)
    return small


def parser_for(description: str | None, options: Callable[[argparse.ArgumentParser], None] | None, module: str):
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="the scenarios to run, comma-separated, shell patterns too (bf16-*); "
                        "default: all but the parts")  # fmt: skip
    parser.add_argument("--budget", type=float, help="start no scenario past this many seconds (nor one that "
                        "would end past them, by its estimate); the same command again runs the rest")  # fmt: skip
    parser.add_argument("--json", help="the results file, JSON lines, appended to (default out/bench/MODULE.jsonl)")
    parser.add_argument("--rerun", action="store_true", help="run scenarios already done in the results file too")
    parser.add_argument("--list", action="store_true", help="list the scenarios and which are done, run nothing")
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="full: full-size random weights on the GPU; tiny: a dry run on the CPU")  # fmt: skip
    parser.add_argument("--work", default=os.environ.get("QWEN_BENCH_WORK", "/tmp/qwen-bench"),
                        help="work folder: manifests, images, checkpoints; kept between commands (default "
                        "$QWEN_BENCH_WORK or /tmp/qwen-bench)")  # fmt: skip
    parser.add_argument("--compile-cache", help="the Inductor cache the scenarios share (default WORK/compile-cache)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-options", help=argparse.SUPPRESS)
    if options is not None:
        options(parser)
    return parser


def select(all_: Sequence[Scenario], only: str | None) -> list[Scenario]:
    """The scenarios `--only` names (shell patterns too: `bf16-*`), in the module's order; without it, all but
    the parts."""
    if not only:
        return [scenario for scenario in all_ if scenario.part_of is None]
    patterns = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(s.name, pattern) for s in all_)]
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)}: use {', '.join(s.name for s in all_)}")
    return [scenario for scenario in all_ if any(fnmatch.fnmatchcase(scenario.name, p) for p in patterns)]


def main(
    all_: Sequence[Scenario],
    module: str,
    description: str | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    report: Callable[[Runner], dict | list[dict] | None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run a module's scenarios as its command line says; the exit status is 1 when one failed.

    `options` adds the module's own options; `report(runner)`, after any scenario ran, returns the line or
    lines that sum up the results file (written after the scenarios')."""
    started = time.perf_counter()
    parser = parser_for(description, options, module)
    args = parser.parse_args(argv)
    if args.child:  # one scenario, in the process its parent started for it, with the parent's options
        options_ = json.loads(args.child_options)
        runner = Runner(module, argparse.Namespace(**{**vars(args), **options_}))
        scenario = next(item for item in all_ if item.name == args.child)
        try:
            return 0 if runner.run_here(scenario) else 1
        finally:
            runner.close_shared()
    args.json = args.json or str(Path("out") / "bench" / f"{module.rsplit('.', 1)[-1]}.jsonl")
    runner = Runner(module, args, started)
    chosen = select(all_, args.only)
    done = set() if args.rerun else done_scenarios(runner.results, environment()["gpu"] if chosen else "", args.model)
    if args.list:
        for scenario in all_:
            state = "done" if scenario.name in done else ""
            minutes = f"~{scenario.minutes:g} min" if scenario.minutes else ""
            part = f"(part of {scenario.part_of})" if scenario.part_of else ""
            print(f"{scenario.name:34} {state:5} {minutes:9} {scenario.about} {part}".rstrip())
        return 0
    failed = ran = 0
    try:
        for scenario in chosen:
            if scenario.name in done:
                runner.progress(f"SKIP {scenario.name}: done in {runner.results}")
                continue
            if not within_budget(scenario, runner.elapsed(), args.budget, runner.tiny):
                runner.progress(f"SKIP {scenario.name}: past --budget {args.budget:g} s (the same command runs it)")
                continue
            runner.progress(f"=== {scenario.name}: {scenario.about}")
            ran += 1
            if not runner.prepare(scenario):
                failed += 1
                continue
            ok = runner.run_apart(scenario) if scenario.own_process else runner.run_here(scenario)
            failed += not ok
        if ran and report is not None:
            lines = report(runner) or []
            for line in [lines] if isinstance(lines, dict) else lines:
                runner.write(line)
    finally:
        runner.close_shared()
    return 1 if failed else 0


def within_budget(scenario: Scenario, elapsed: float, budget: float | None, tiny: bool = False) -> bool:
    """Whether `scenario` may start: the budget not spent, nor overrun by the scenario's estimate (a GPU's, so
    not counted in a dry run)."""
    if budget is None:
        return True
    expected = 0 if tiny else (scenario.minutes or 0) * 60
    return elapsed + expected <= budget
