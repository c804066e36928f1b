"""What does step caching per row cost and save, at full size, with what random weights can show?

    python -m bench.step_cache --only bf16-cfg-none,bf16-cfg-row-40% --json out.jsonl
    python -m bench.step_cache --budget 540 --json out.jsonl   # again on the same warm machine for the rest
    python -m bench.step_cache --model tiny --only bf16-cfg-row-60%   # the same code on the CPU, tiny model

Random weights do not show how often a real model's residuals stay under a threshold, nor what caching does
to a picture, so the per-row decisions of `first-block` are **forced** (`qwen_batch.pipeline.step_cache.
first_block.FORCED`: the residual test still runs and still costs its copy, its answer is replaced) to a
fraction of the steps. What that measures is real: the cost of a reused step against a full one, and of the
per-row machinery. One `ImageGenerator` per memory mode (full-size random transformer and VAE,
`bench/full_size.py`, regional compile, FlashAttention-4 where it imports, as `qwen-batch run` sets it up),
shared by that mode's scenarios, runs batches of 4 rows at 1024x1024 from random text embeddings of
prompt-like lengths (the text encoder plays no part in the denoise stage's speed). Scenarios `MODE-LABEL`:

(a) `cfg-none`, `cfg-row-F`: 50-step rows, true CFG 4: seconds per image at 100%, 60% and 40% of the steps
    computed in full (every row the same steps), the plain loop (no step cache) beside; and a reused forward
    against a full one (block 0, the embeddings and the output layers against all 60 blocks: 1/60 is the floor);
(b) `cfg-batch-F`, `cfg-staggered-F`: the per-row machinery against a per-batch decision (diffusers': one mean
    over the forward's rows, then `.item()`; `PerBatchFirstBlock`) at the same fractions and steps (target:
    within 3%), and rows that compute on different steps at the same fraction each (`staggered`): what
    sub-batches and their padding cost;
(c) `lightning-*`: Lightning rows (8 steps, true CFG 1, shift 3; their adapter, fused, costs nothing per step)
    the same way at 100%, 75% and 50%;
plus `cfg-taylorseer`: TaylorSeer's default schedule at 50 steps (13 full steps, nothing run on the others).

50-step configurations run 10 steps of their schedule, which repeats every 10 steps, and are extrapolated to
50 from the transformer's forwards (CUDA events, no host sync added) plus the rest of the batch (noise,
scheduler, VAE decode): labelled `extrapolated`. A configuration whose first batch compiled something (a new
sub-batch size; dynamo's graph count says so) runs again, and the batch after the compile is the one measured
(`compiled_first_s` in its line). The configurations that need only the whole forward's graph come first, those
with smaller sub-batches (`staggered`) last: fp8's cold compiles (about 200 s for the blocks, about 100 s for
each further sub-batch size on an H200) then cost a cut-off command its tail, not its head. After the
scenarios, a `step_cache_summary` line per mode puts the results file's lines side by side.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch._dynamo

from bench.full_size import full_size_source
from bench.harness import Scenario, environment, main, read_lines, scenarios
from bench.measure import ForwardTimer, free_gpu, gpu_peak_gib
from qwen_batch.pipeline.step_cache import first_block
from qwen_batch.pipeline.step_cache.first_block import FirstBlockRows

FULL_STEPS, ROWS = 50, 4
CFG = {"steps": FULL_STEPS, "true_cfg_scale": 4.0, "shift": None, "fractions": (1.0, 0.6, 0.4)}
LIGHTNING = {"steps": 8, "true_cfg_scale": 1.0, "shift": 3.0, "fractions": (1.0, 0.75, 0.5)}
SPEC = "first-block:0.1"  # its threshold never decides here: the schedule does
PROMPT_TOKENS, NEGATIVE_TOKENS = (24, 57, 88, 41), 6  # prompts of 8-60 words; the negative " "


class PerBatchFirstBlock(FirstBlockRows):
    """The per-batch decision the per-row machinery is compared with: diffusers' statistic, one mean over the
    forward's rows and `.item()`, and one decision for them all (from the same forced schedule), so the forward
    runs whole or reuses whole, as diffusers' FirstBlockCache does."""

    def decide(self, rows, residual, forward, step):
        if rows.head is None:
            computes = True
            rows.head = residual
        else:
            previous = rows.head
            change = ((residual - previous).abs().mean() / previous.abs().mean()).item()
            computes = change > self.threshold
            if self.forced is not None:
                computes = bool(self.forced(step, forward.first, forward.rows)[0])
            if computes:
                rows.head = residual
        for row in range(forward.rows):
            self.computed[forward.first + row] += computes
        return [computes] * forward.rows


def full_steps(fraction: float, steps: int, shift: int = 0) -> set[int]:
    """The steps of a schedule computed in full for `fraction`, spread evenly, step 0 among them (there is
    nothing to reuse yet); `shift` moves the others along steps 1..steps-1 (a staggered row's)."""
    count = max(1, round(fraction * steps))
    spread = {index * steps // count for index in range(count)}
    return {0} | {(step - 1 + shift) % (steps - 1) + 1 for step in spread - {0}}


def schedule(fraction: float, steps: int, staggered: bool):
    """The forced decisions: every row on the same steps, or (`staggered`) image i's steps shifted by i, so rows
    compute on different steps at the same fraction each (a row's two passes alike)."""
    by_image = [full_steps(fraction, steps, image if staggered else 0) for image in range(ROWS)]

    def forced(step: int, first: int, rows: int) -> list[bool]:
        return [(step % steps) in by_image[(first + row) % ROWS] for row in range(rows)]

    return forced


@contextlib.contextmanager
def forced_decisions(forced, per_batch: bool):
    original = first_block.FirstBlockRows
    first_block.FORCED = forced
    if per_batch:
        first_block.FirstBlockRows = PerBatchFirstBlock  # step_cache.for_batch imports it when it builds one
    try:
        yield
    finally:
        first_block.FORCED = None
        first_block.FirstBlockRows = original


class LoadedModel:
    """One `ImageGenerator` (full-size random transformer and VAE, regional compile unless a dry run), as
    `qwen-batch run` sets it up, and the random text embeddings its batches run from; shared by a mode's
    configurations (`Runner.shared`)."""

    def __init__(self, runner, mode: str, size: int, compile: str):
        from qwen_batch.manifest import Request
        from qwen_batch.memory.placement import Placement
        from qwen_batch.pipeline.denoise import ImageGenerator

        self.runner, self.size = runner, size
        self.device = runner.device
        self.dtype = torch.float32 if runner.tiny else torch.bfloat16
        source = full_size_source(on_host=lambda stage: mode != "bf16", device=self.device, tiny=runner.tiny)
        compiled = compile == "on" or (compile == "auto" and not runner.tiny)
        placement = Placement(mode, compile=compiled, compile_cache=runner.compile_cache)
        runner.progress(f"building the {'tiny' if runner.tiny else 'full-size'} model ({mode}, compile {compiled})")
        self.generator = ImageGenerator(source, self.device, self.dtype, placement)
        runner.progress(f"loaded: {self.generator.memory_mode}")
        self.request = Request
        hidden = self.generator.pipe.transformer.config.joint_attention_dim
        generator = torch.Generator().manual_seed(0)
        self.prompts = [torch.randn(tokens, hidden, generator=generator) for tokens in PROMPT_TOKENS[:ROWS]]
        self.negatives = [torch.randn(NEGATIVE_TOKENS, hidden, generator=generator) for _ in range(ROWS)]
        self.base = {"run": "step_cache", **environment(), "mode": mode, "size": size, "rows": ROWS}
        self.base["placed"] = self.generator.memory_mode

    def close(self) -> None:
        self.generator.close()
        free_gpu()

    def requests(self, recipe: dict, steps: int, spec: str | None):
        return [
            self.request(index, f"p{index}", "p", " ", self.size, self.size, 1000 + index, steps,
                         recipe["true_cfg_scale"], scheduler_shift=recipe["shift"], step_cache=spec)
            for index in range(ROWS)
        ]  # fmt: skip

    def generate(self, recipe: dict, steps: int, spec: str | None, forced=None, per_batch: bool = False) -> dict:
        """One batch, timed: wall clock to the images on the host, and each transformer forward."""
        requests = self.requests(recipe, steps, spec)
        negatives = self.negatives if recipe["true_cfg_scale"] > 1 else None
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        timer = ForwardTimer(self.generator.pipe.transformer)
        try:
            with forced_decisions(forced, per_batch):
                started = time.perf_counter()
                images = self.generator.generate(requests, self.prompts, negatives)
                list(images)  # waits for the decode and the copy to the host
                wall = time.perf_counter() - started
            forwards = timer.seconds()
        finally:
            timer.remove()
        return {
            "wall_s": wall,
            "forwards": forwards,
            "steps_computed": images.steps_computed,
            "new_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
            "peak_gpu_gib": gpu_peak_gib(),
        }

    def configuration(
        self, name: str, recipe: dict, steps: int, spec, fraction=None, staggered=False, per_batch=False, repeats=1
    ) -> dict:
        """One configuration's line: a batch (again when the first compiled something), the median kept."""
        line = {**self.base, "label": name, "steps_run": steps, "steps": recipe["steps"]}
        line.update(true_cfg_scale=recipe["true_cfg_scale"], step_cache=spec, fraction_forced=fraction)
        line.update(schedule=None if fraction is None else "staggered" if staggered else "uniform")
        line["decision"] = "per-batch" if per_batch else "per-row"
        self.runner.progress(f"{name}: {steps} steps")
        try:
            forced = schedule(fraction, steps, staggered) if fraction is not None else None
            first = self.generate(recipe, steps, spec, forced, per_batch)
            if first["new_graphs"]:  # it compiled: that batch's time is the compiler's, the next one is measured
                line["compiled_first_s"] = round(first["wall_s"], 1)
                self.runner.progress(f"{name}: compiled {first['new_graphs']} graphs in its first batch; again")
                first = None
            runs = [first] if first else []
            runs += [self.generate(recipe, steps, spec, forced, per_batch) for _ in range(repeats - len(runs))]
            measured = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]  # the median batch
        except Exception:
            release_memory()  # not the compiled graphs: the next configurations use them
            raise
        line.update(figures(measured, recipe, steps, fraction if not staggered else None))
        return line


def release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def figures(measured: dict, recipe: dict, steps: int, uniform_fraction: float | None) -> dict:
    """Seconds per image at the recipe's steps (extrapolated from the forwards of `steps` when fewer ran), and
    the median full and reused forward of a uniform schedule."""
    forwards, wall = measured.pop("forwards"), measured.pop("wall_s")
    counts = measured.pop("steps_computed")
    total = sum(forwards)
    rest = wall - total  # noise, scheduler, CFG, VAE decode, the copy to the host: per batch
    per_image = (total / steps * recipe["steps"] + rest) / ROWS
    result = {
        **measured,
        "batch_wall_s": round(wall, 3),
        "forwards_timed": len(forwards),
        "forward_s_total": round(total, 3),
        "rest_per_batch_s": round(rest, 3),
        "seconds_per_image": round(per_image, 3),
        "images_per_hour": round(3600 / per_image, 1),
        "extrapolated": steps != recipe["steps"],
    }
    if counts is not None:
        conditional = [row[0] for row in counts]
        result["steps_computed"] = counts
        result["fraction_computed"] = round(statistics.mean(conditional) / steps, 3)
    if uniform_fraction is not None and forwards:
        per_step = len(forwards) // steps
        full = full_steps(uniform_fraction, steps) | {0}
        kinds = {True: [], False: []}
        for index, seconds in enumerate(forwards):
            step = index // per_step
            if step > 0:  # the first step warms the per-row state up
                kinds[step in full].append(seconds)
        if kinds[True]:
            result["full_forward_s"] = round(statistics.median(kinds[True]), 4)
        if kinds[False]:
            result["reused_forward_s"] = round(statistics.median(kinds[False]), 4)
    return result


def summary(lines: dict[str, dict]) -> dict:
    """The comparisons the issue asks for, from the lines measured."""

    def per_image(name):
        line = lines.get(name) or {}
        return line.get("seconds_per_image")

    result = {"run": "step_cache_summary"}
    for recipe, prefix in ((CFG, "cfg"), (LIGHTNING, "lightning")):
        plain = per_image(f"{prefix}-none")
        rows = {}
        for fraction in recipe["fractions"]:
            row, batch = per_image(f"{prefix}-row-{fraction:.0%}"), per_image(f"{prefix}-batch-{fraction:.0%}")
            entry = {"per_row_s": row, "per_batch_s": batch}
            if row and batch:
                entry["per_row_overhead_pct"] = round(100 * (row / batch - 1), 2)
            if row and plain:
                entry["speedup_vs_no_cache"] = round(plain / row, 3)
            staggered = per_image(f"{prefix}-staggered-{fraction:.0%}")
            if staggered and row:
                entry["staggered_s"] = staggered
                entry["staggered_vs_uniform_pct"] = round(100 * (staggered / row - 1), 2)
            rows[f"{fraction:.0%}"] = entry
        result[prefix] = {"no_cache_s": plain, "by_fraction": rows}
        uniform = lines.get(f"{prefix}-row-{min(recipe['fractions']):.0%}") or {}
        full, reused = uniform.get("full_forward_s"), uniform.get("reused_forward_s")
        if full and reused:
            result[prefix].update(full_forward_s=full, reused_forward_s=reused)
            result[prefix]["reused_over_full"] = round(reused / full, 4)
            result[prefix]["one_block_of_sixty"] = round(1 / 60, 4)
    ts = per_image("cfg-taylorseer")
    if ts:
        result["taylorseer_50_steps"] = {"seconds_per_image": ts, "full_steps": 13}
    return result


def configuration(
    runner, mode: str, label: str, recipe: str, steps: int, spec: str | None = None, size: int = 1024,
    compile: str = "auto", **kwargs
) -> None:  # fmt: skip
    """One configuration on the mode's loaded model (built by the first scenario of the mode that runs)."""
    recipe_ = RECIPES[recipe]
    model = runner.shared(("step-cache", mode, size, compile), lambda: LoadedModel(runner, mode, size, compile))
    runner.write(model.configuration(label, recipe_, min(steps, recipe_["steps"]), spec, **kwargs))


def report(runner) -> list[dict]:
    """Per mode, the comparisons the step cache's issue asks for, from the results file's lines of this GPU."""
    gpu = environment()["gpu"]
    lines: dict[str, dict[str, dict]] = {}
    for line in read_lines(runner.results):
        if line.get("run") == "step_cache" and line.get("gpu") == gpu and "seconds_per_image" in line:
            lines.setdefault(line["mode"], {})[line["label"]] = line  # the latest line of each label
    reports = []
    for by_label in lines.values():
        last = list(by_label.values())[-1]
        base = {key: last[key] for key in ("mode", "size", "rows", "placed")}
        reports.append({"scenario": "summary", **base, **summary(by_label)})
    return reports


RECIPES = {"cfg": CFG, "lightning": LIGHTNING}


def configurations(mode: str) -> list[Scenario]:
    """A mode's scenarios in the order they run best: what the whole forward's graph serves first (every row
    computes or none does), then TaylorSeer, then the staggered schedules, whose sub-batches each compile."""
    items = []

    def add(label: str, recipe: str, about: str, minutes: float, **kwargs) -> None:
        steps = 10 if recipe == "cfg" and label != "cfg-taylorseer" else RECIPES[recipe]["steps"]
        params = {"mode": mode, "label": label, "recipe": recipe, "steps": steps, **kwargs}
        items.append(Scenario(f"{mode}-{label}", configuration, params, about, minutes))

    for recipe, settings in RECIPES.items():
        name = "50 steps, CFG 4" if recipe == "cfg" else "Lightning"
        add(f"{recipe}-none", recipe, f"{name}: the plain loop, no step cache", 1)
        for fraction in settings["fractions"]:
            share = f"{fraction:.0%}"
            add(f"{recipe}-row-{share}", recipe, f"{name}: {share} of the steps computed, per row", 1,
                spec=SPEC, fraction=fraction)  # fmt: skip
            add(f"{recipe}-batch-{share}", recipe, f"{name}: the same, decided per batch (diffusers')", 1,
                spec=SPEC, fraction=fraction, per_batch=True)  # fmt: skip
    add("cfg-taylorseer", "cfg", "50 steps, CFG 4: TaylorSeer's default schedule", 2, spec="taylorseer")
    for recipe, settings in RECIPES.items():
        name = "50 steps, CFG 4" if recipe == "cfg" else "Lightning"
        for fraction in settings["fractions"][1:]:
            share = f"{fraction:.0%}"
            add(f"{recipe}-staggered-{share}", recipe, f"{name}: {share} per row, rows on different steps", 2,
                spec=SPEC, fraction=fraction, staggered=True)  # fmt: skip
    return items


SCENARIOS = scenarios(*configurations("bf16"), *configurations("fp8"))


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__, report=report))
