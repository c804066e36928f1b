"""The diffusers recipe against qwen-batch's engine, in one process on one GPU: the pair every speed ratio
of docs/benchmarks.md comes from.

`Comparison.versus(labels)` runs (a) the recipe: the task's diffusers pipeline, every component resident,
one `pipe()` per row with the model card's call; then (b) each engine variant (`VARIANTS`: memory mode,
compile, batch size, speed levers) running its stages as `qwen-batch run` does (plan_run, encode_stage,
denoise_stage, finalize) over a manifest of the same rows and seeds, on the full-size random model
(bench/full_size.py); then (a) once more. Each run is one line; each variant's speed is given as a ratio to
the recipe run before it and to the mean of both (a GPU that slows as it warms up would otherwise flatter
the recipe), and its images' differences from the recipe's and from the first variant's.

Fewer steps than 50 may run: every transformer forward is timed with CUDA events (no host sync), and the
per-image figures at 50 steps are extrapolated from the median steady forward plus the measured rest of
each image (labelled `extrapolated`). A task (text-to-image, edit, ControlNet, inpainting) is a subclass
that says how the recipe is built and called and its per-image figure reckoned, and what the engine's
manifest and stage 1 are.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from pathlib import Path

import torch

from bench.full_size import EmulatedGpu, full_size_source
from bench.harness import Runner, environment
from bench.measure import (
    FULL_STEPS,
    BatchTimer,
    ForwardTimer,
    GpuUtilization,
    RssPeak,
    forward_figures,
    free_gpu,
    gpu_gaps,
    gpu_peak_gib,
    image_differences,
    matmul_tflops,
    timing,
)


class Comparison:
    """One kind of row run both ways, over `rows` (dicts with `id`, `prompt`, `seed` and the task's inputs)
    at `steps` steps. Subclasses fill in the recipe's pipeline, call and per-image figures, and the engine's
    manifest, stage 1 and per-image figures; the skeleton of both sides is here, once."""

    task: str | None = None  # the lines' "task" (text-to-image lines have none); task lines name the pipeline
    timed_models: tuple[str, ...] = ("transformer",)  # the recipe pipeline's models whose forwards are timed

    def __init__(self, runner: Runner, rows: list[dict], steps: int):
        self.runner, self.rows, self.steps = runner, rows, steps
        self.tiny, self.device = runner.tiny, runner.device
        self.compile_cache = runner.compile_cache

    def header(self, run: str) -> dict:
        return {"run": run, **({"task": self.task} if self.task else {})}

    # --- (a) the recipe -------------------------------------------------------------------------------------

    def recipe_fields(self) -> dict:
        """The recipe line's fields after `steps_run`: sizes, row counts."""
        return {}

    def before_load(self, result: dict) -> None:
        """Measured before the pipeline loads (text-to-image: the host-to-GPU copy rate)."""

    def recipe_pipeline(self):
        raise NotImplementedError

    def after_load(self, pipe, result: dict) -> None:
        """Measured once the pipeline is loaded, before the rows (text-to-image: the encoder's throughput)."""

    def recipe_call(self, pipe, row: dict, seed: int, steps: int):
        """One `pipe()` call for `row`: its image."""
        raise NotImplementedError

    def recipe_spies(self, pipe) -> list[tuple[object, str]]:
        """Methods of the pipeline whose calls are timed too (edit: the VL encode, the VAE encode)."""
        return []

    def recipe_figures(self, result: dict, walls: list[float], timers: dict, image, spies: list) -> None:
        """The per-image figures, from each call's wall time, the timed models' forwards and the last image."""
        raise NotImplementedError

    def recipe_result(self, images: Path | None) -> dict:
        """The recipe over the rows, after one warm-up call: one line. Its images go to `images` when given."""
        result = {**self.header("recipe"), **environment(), "steps_run": self.steps, **self.recipe_fields()}
        result["matmul_tflops"] = matmul_tflops()
        self.before_load(result)
        started = time.perf_counter()
        pipe = self.recipe_pipeline()
        if self.task:
            result["pipeline"] = type(pipe).__name__
        result["load_s"] = round(time.perf_counter() - started, 1)
        self.after_load(pipe, result)
        call = functools.partial(self.recipe_call, pipe)
        call(self.rows[0], 0, 2)  # warm-up: cuBLAS handles, cuDNN autotuning
        with timing(*self.recipe_spies(pipe)) as spies:
            walls, timers, image = timed_recipe_rows(pipe, call, self.rows, self.steps, images, self.timed_models)
        self.recipe_figures(result, walls, timers, image, spies)
        result["peak_gpu_gib"] = gpu_peak_gib()
        for timer in timers.values():
            timer.remove()
        pipe = None  # the engine variants that follow in this process need the GPU
        free_gpu()
        return result

    # --- (b) qwen-batch's engine ----------------------------------------------------------------------------

    def write_manifest(self, path: Path) -> Path:
        raise NotImplementedError

    def model_source(self, on_host, timings: dict[str, float], gpu: EmulatedGpu | None):
        """The full-size random model (the tiny one in a dry run), registered for the engine to load."""
        return full_size_source(gpu, on_host=on_host, device=self.device, timings=timings, tiny=self.tiny)

    def run_config(self) -> dict:
        """The task's own `RunConfig` fields (the folders its inputs may come from, a ControlNet)."""
        return {}

    def engine_fields(self) -> dict:
        """The engine line's fields after `steps_run`."""
        return {}

    def encode(self, plan, timings: dict[str, float], result: dict):
        """Stage 1, timed as the task needs (`result["encode"]`); its return value is `encode_stage`'s."""
        raise NotImplementedError

    def engine_figures(self, result: dict) -> dict:
        """The per-image figures at 50 steps, from the stages' (text-to-image: the denoise stage's alone)."""
        return with_encode_stage(result, self.steps)

    def engine_result(
        self,
        label: str,
        mode: str,
        compile_: str,
        batch_size: int | None,
        work: Path,
        output: Path | None = None,
        gpu: EmulatedGpu | None = None,
        trace: str | None = None,
    ) -> dict:
        """qwen-batch's stages over the rows' manifest, as `qwen-batch run` drives them, timed apart: one line.
        Memory modes other than bf16 place the weights themselves, so the model is handed over in host RAM."""
        from qwen_batch.run.engine import RunConfig

        timings: dict[str, float] = {}
        plan_holder = {}

        def on_host(stage: str) -> bool:
            memory = plan_holder["plan"].memory
            return (memory.encoder_mode if stage == "encode" else memory.denoiser.mode) != "bf16"

        source = self.model_source(on_host, timings, gpu)
        work.mkdir(parents=True, exist_ok=True)
        config = RunConfig(
            manifest=str(self.write_manifest(work / "manifest.parquet")),
            output=str(output or work / "out"),
            model=source.name,
            batch_size=batch_size,
            device=self.device,
            memory_mode=mode,
            compile="off" if self.tiny else compile_,  # a dry run does not compile on the CPU
            compile_cache=self.compile_cache,
            cache=str(work / "cache"),
            **self.run_config(),
        )
        result = {**self.header("engine"), "label": label, **environment(), "steps_run": self.steps}
        result.update(self.engine_fields())
        plan = planned(config, result)
        if plan is None:
            return result
        plan_holder["plan"] = plan
        encode = self.encode(plan, timings, result)
        # Stage 2: load (build + placement) then denoise, timed apart.
        result.update(timed_denoise(plan, encode, timings, self.steps, trace=trace))
        return self.engine_figures(result)

    # --- (a) and (b) in one process -------------------------------------------------------------------------

    def summary_fields(self) -> dict:
        """What the closing `versus-summary` line says the comparison was."""
        return {}

    def versus(self, labels: list[str] | tuple[str, ...]) -> None:
        """The recipe, then each engine variant (`VARIANTS`), then the recipe again, in this one process: each
        variant's speed as a ratio to the recipe before it and to the mean of both recipe runs, and its
        images against the recipe's (`work/recipe`) and the first variant's (`work/LABEL/out/images`)."""
        for label in labels:
            if label not in VARIANTS:
                raise SystemExit(f"unknown variant {label!r}: use {', '.join(VARIANTS)}")
        write, work = self.runner.write, self.runner.work
        recipe_images = work / "recipe"
        recipe = self.recipe_result(recipe_images)
        recipe["label"] = "recipe"
        write(recipe)
        first_images, seconds = None, {}
        for label in labels:
            mode, compile_, batch_size, settings = VARIANTS[label]
            with levers(**settings):
                result = self.engine_result(label, mode, compile_, batch_size, work / label)
            if "seconds_per_image_at_50_steps" in result:
                result["vs_recipe_same_process"] = round(
                    recipe["seconds_per_image_at_50_steps"] / result["seconds_per_image_at_50_steps"], 3
                )
            images = work / label / "out" / "images"
            result["vs_recipe_images"] = image_differences(recipe_images, images)
            if first_images is not None:
                result["vs_first_variant_images"] = image_differences(first_images, images)
            first_images = first_images or images
            write(result)
            seconds[label] = result.get("seconds_per_image_at_50_steps")
        # The recipe once more at the end: a GPU that slows as it warms up would otherwise flatter the
        # recipe, which ran first. Each variant's ratio is also given against the mean of both recipe runs.
        after = self.recipe_result(None)
        after["label"] = "recipe-after"
        write(after)
        before_and_after = [recipe["seconds_per_image_at_50_steps"], after["seconds_per_image_at_50_steps"]]
        recipe_seconds = statistics.mean(before_and_after)
        write(
            {
                "run": "versus-summary",
                **self.summary_fields(),
                **environment(),
                "recipe_seconds_per_image_at_50": before_and_after,
                "recipe_peak_gpu_gib": recipe.get("peak_gpu_gib"),
                "seconds_per_image_at_50": seconds,
                "vs_recipe_mean_of_both": {
                    label: round(recipe_seconds / value, 3) for label, value in seconds.items() if value
                },
            }
        )


# Autotuning among cuBLAS's own choices only: `addmm` as Inductor lowers it, or with the bias as
# cuBLASLt's epilogue (`bias_addmm`), which the full autotune picked for the MLP's down projection (3.05
# against 3.26 ms on an H200). No Triton GEMMs.
ATEN_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN", "coordinate_descent_tuning": True}

# Engine variants `versus` can run after the recipe: memory mode, compile, batch size, and the levers
# left at the engine's defaults unless named (see `levers`).
VARIANTS = {
    "bf16-eager": ("bf16", "off", 4, {}),
    "bf16-compile": ("bf16", "on", 4, {}),
    "bf16-compile-b8": ("bf16", "on", 8, {}),
    "bf16-compile-sdpa": ("bf16", "on", 4, {"attention": "sdpa"}),
    "bf16-compile-fa4": ("bf16", "on", 4, {"attention": "fa4"}),
    "bf16-compile-nogelu": ("bf16", "on", 4, {"gelu_epilogue": False}),
    "bf16-compile-split": ("bf16", "on", 4, {"cfg_layout": "split"}),
    # Inductor's coordinate-descent tuning of its own kernels: the default since it was measured (torchao
    # turns it on for fp8 anyway); -nocdt is the engine without it.
    "bf16-compile-cdt": ("bf16", "on", 4, {"compile_options": {"coordinate_descent_tuning": True}}),
    "bf16-compile-nocdt": ("bf16", "on", 4, {"compile_options": {}}),
    # Triton GEMM templates autotuned against cuBLAS, with elementwise epilogues fused into the winners.
    "bf16-compile-autotune": (
        "bf16",
        "on",
        4,
        {"compile_options": {"max_autotune": True, "coordinate_descent_tuning": True}},
    ),
    # cuBLAS-only autotune (ATEN_AUTOTUNE), with the text stream packed (the default).
    "bf16-compile-aten-autotune": ("bf16", "on", 4, {"compile_options": ATEN_AUTOTUNE}),
    "bf16-compile-bucket16": ("bf16", "on", 4, {"text_bucket": 16}),
    # The text stream padded, as before packing (qwen_batch.families.qwen_image.packed_text) became the default;
    # -pack is the default, named.
    "bf16-compile-nopack": ("bf16", "on", 4, {"pack_text": False}),
    "bf16-compile-pack": ("bf16", "on", 4, {"pack_text": True}),
    # RoPE as diffusers' complex multiply, which Inductor leaves to eager kernels
    # (qwen_batch/families/qwen_image/rotary.py): the default before RoPE in real arithmetic.
    "bf16-compile-complex-rotary": ("bf16", "on", 4, {"real_rotary": False}),
    # The engine as it was before issue 17's levers: SDPA with the mask, GELU a kernel of its own.
    "bf16-compile-before": (
        "bf16",
        "on",
        4,
        {"attention": "sdpa", "gelu_epilogue": False, "cfg_layout": "joint", "compile_options": {}, "pack_text": False},
    ),
    "fp8-compile-b1": ("fp8", "on", 1, {}),
    "fp8-compile-b2": ("fp8", "on", 2, {}),
    "fp8-compile-b4": ("fp8", "on", 4, {}),
    "fp8-compile-b8": ("fp8", "on", 8, {}),
    "fp8-compile-b4-nopack": ("fp8", "on", 4, {"pack_text": False}),
    # Every block linear in fp8, the image MLP's last one too (FP8_KEPT_BF16 emptied, which is what
    # `--fp8-every-linear` does through Placement.fp8_kept_bf16): a third of the image stream's GEMM FLOPs
    # that the fp8 mode keeps in bf16 for quality by default (qwen_batch/memory/placement.py).
    "fp8-compile-b4-all": ("fp8", "on", 4, {"fp8_kept_bf16": ()}),
    "fp8-compile-b8-all": ("fp8", "on", 8, {"fp8_kept_bf16": ()}),
    "fp8-compile-b4-all-complex-rotary": ("fp8", "on", 4, {"fp8_kept_bf16": (), "real_rotary": False}),
    "fp8-compile-b4-sdpa": ("fp8", "on", 4, {"attention": "sdpa"}),
    "fp8-compile-b4-tensor": ("fp8", "on", 4, {"fp8_granularity": "tensor"}),
    "fp8-compile-b8-tensor": ("fp8", "on", 8, {"fp8_granularity": "tensor"}),
}


@contextlib.contextmanager
def levers(
    attention: str | None = None,
    gelu_epilogue: bool | None = None,
    cfg_layout: str | None = None,
    compile_options: dict | None = None,
    text_bucket: int | None = None,
    fp8_granularity: str | None = None,
    pack_text: bool | None = None,
    fp8_kept_bf16: tuple | None = None,
    real_rotary: bool | None = None,
):
    """Set the engine's speed levers for one run (None keeps its default): the attention kernel for
    padded batches (`sdpa`, `fa4`), GELU in its GEMM's epilogue, the CFG layout (`joint`, `split`),
    Inductor options for the compiled blocks, the text-length bucket, fp8 scales per `row` or `tensor`,
    the text stream packed to its real tokens (under FlashAttention-4), the block linears fp8 keeps in bf16,
    RoPE in real arithmetic (False: diffusers' complex multiply)."""
    import qwen_batch.families.qwen_image.attention as attention_module
    import qwen_batch.memory.placement as memory_modes
    import qwen_batch.pipeline.denoise.text as denoise_module

    settings = [
        (attention_module, "ATTENTION_KERNEL", attention),
        (memory_modes, "GELU_EPILOGUE", gelu_epilogue),
        (denoise_module, "CFG_LAYOUT", cfg_layout),
        (memory_modes, "COMPILE_OPTIONS", compile_options),
        (denoise_module, "TEXT_BUCKET", text_bucket),
        (memory_modes, "FP8_GRANULARITY", fp8_granularity),
        (denoise_module, "PACK_TEXT", pack_text),
        (memory_modes, "FP8_KEPT_BF16", fp8_kept_bf16),
        (attention_module, "REAL_ROTARY", real_rotary),
    ]
    originals = [getattr(module, name) for module, name, _ in settings]
    for module, name, value in settings:
        if value is not None:
            setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), original in zip(settings, originals, strict=True):
            setattr(module, name, original)


def timed_recipe_rows(pipe, call, rows: list[dict], steps: int, out: Path | None, timed=("transformer",)):
    """diffusers' pipeline over `rows` as every recipe here runs it, after the caller's warm-up call: the peak
    memory reset, then `call(row, seed, steps)` for each row with its own seed, one at a time. Returns each
    call's wall time, a forward timer for each of the pipeline's `timed` models (to `.remove()`), and the last
    image (an edit's size is the pipeline's choice); the images go to `out` as `{id}.png` when given."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timers = {name: ForwardTimer(getattr(pipe, name)) for name in timed}
    walls = []
    for row in rows:
        started = time.perf_counter()
        image = call(row, row["seed"], steps)
        walls.append(time.perf_counter() - started)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"{row['id']}.png")
    return walls, timers, image


def planned(config, result: dict):
    """`plan_run(config)` with what it decided added to `result`; None, with the error in `result`, when
    it refuses the run (a refusal is a result too)."""
    from qwen_batch.run.engine import plan_run

    started = time.perf_counter()
    try:
        plan = plan_run(config)
    except Exception as error:
        result.update(error=f"{type(error).__name__}: {error}", plan_seconds=round(time.perf_counter() - started, 2))
        return None
    memory = plan.memory
    if memory.plan is not None:
        result["plan"] = {
            stage.stage: {
                "mode": stage.mode,
                "batch_size": stage.batch_size,
                "predicted_peak_gpu_gib": stage.peak_gpu_gib,
                "predicted_host_gib": stage.host_gib,
                "predicted_seconds_per_image": stage.seconds_per_image,
                "predicted_seconds_per_image_pcie4": stage.seconds_per_image_pcie4,
                "vae_tiling": stage.vae_tiling,
            }
            for stage in (memory.plan.encode, memory.plan.denoise)
        }
    result["mode"], result["compile"] = memory.denoiser.mode, memory.denoiser.compile
    result["batch_size"], result["encoder_mode"] = memory.batch_size, memory.encoder_mode
    result["encode_batch_size"] = memory.encode_batch_size
    return plan


def timed_denoise(plan, encode, timings: dict[str, float], steps: int, trace: str | None = None) -> dict:
    """Stage 2 exactly as `qwen-batch run` drives it (load, then denoise, then finalize), timed apart:
    the fields of a result line. `denoise.seconds_per_image_at_50_steps` is the denoise stage alone,
    extrapolated from `steps` (the median forward times the forwards of 50 steps, plus the measured
    per-batch rest: noise, scheduler, VAE decode, PNG writes). Frees the generator afterwards.
    `trace`: profile the denoise stage (torch.profiler), write its Chrome trace there and add where
    the GPU sat idle (`gpu_gaps`) to the result; timings are then the profiler's, not the plain run's."""
    from qwen_batch.run.engine import denoise_stage, finalize, generator_for, release_generator

    memory = plan.memory
    rss = RssPeak()
    timings.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    generator = generator_for(plan)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    result = {
        "denoise_load": {
            "seconds": round(load_seconds, 2),
            "build_seconds": round(timings.get("build_seconds", 0.0), 2),
            "placement_seconds": round(load_seconds - timings.get("build_seconds", 0.0), 2),
            "peak_gpu_gib": gpu_peak_gib(),
            "placed": generator.memory_mode,
        }
    }
    timer = ForwardTimer(generator.pipe.transformer)
    # A ControlNet runs once per step beside the transformer: its forwards scale with the steps too.
    control_timer = ForwardTimer(generator.controlnet) if generator.controlnet is not None else None
    batches_timer = BatchTimer()
    utilization = GpuUtilization()
    error = None
    profiler = None
    if trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.start()
    try:
        denoise = denoise_stage(plan)
    except Exception as failure:  # an out-of-memory is a result too
        error = f"{type(failure).__name__}: {failure}"
        denoise = None
    finally:
        batches_timer.remove()
        utilization.stop()
        if profiler is not None:
            profiler.stop()
            profiler.export_chrome_trace(trace)
            result["gpu_gaps"] = gpu_gaps(profiler)
    summary = finalize(plan, encode, denoise) if denoise else None
    result["peak_host_gib_denoise"] = rss.stop()
    if error or not denoise or denoise.failed:
        errors = [record.error for record in (denoise.records if denoise else []) if record.error]
        result["error"] = error or (errors[0] if errors else "no image generated")
    if denoise and denoise.generated:
        figures = forward_figures(timer, skip=2)
        batches = -(-denoise.generated // memory.batch_size)
        in_forwards = figures["total_forward_s"]
        # Two forwards per step when CFG's halves run apart (CFG_LAYOUT "split"); their median is then
        # about the mean of the two kinds, as both come equally often.
        figures["forwards_per_step"] = round(figures["forwards"] / (steps * batches))
        forwards = figures["forward_s"] * figures["forwards_per_step"] * FULL_STEPS
        if control_timer is not None and control_timer.spans:
            control = forward_figures(control_timer, skip=2)
            in_forwards += control["total_forward_s"]
            per_step = control["forwards"] / (steps * batches)
            forwards += control["forward_s"] * per_step * FULL_STEPS
            result["controlnet"] = {"forward_s": control["forward_s"], "first_forward_s": control["first_forward_s"],
                                    "forwards": control["forwards"], "forwards_per_step": round(per_step, 2)}  # fmt: skip
        overhead = (denoise.seconds - in_forwards) / batches  # noise, scheduler, decode, writes
        result.update(figures)
        result["dit_image_tokens"] = timer.shapes[0][1]
        result["denoise"] = {
            "images": denoise.generated,
            "seconds": round(denoise.seconds, 2),
            "peak_gpu_gib": denoise.peak_gpu_gib,
            "overhead_per_batch_s": round(overhead, 2),
            "storage_wait_s": round(denoise.storage_wait_seconds, 2),
            # Of the wall time after the first forward (which carries compilation), the share spent
            # inside transformer forwards: the GPU's busy time, with no host sync in the loop.
            "transformer_busy_fraction": round(
                (figures["total_forward_s"] - figures["first_forward_s"])
                / max(denoise.seconds - figures["first_forward_s"], 1e-9),
                3,
            ),
            "seconds_per_image_at_50_steps": round((forwards + overhead) / (denoise.generated / batches), 2),
        }
        result["gpu_busy"] = {**batches_timer.figures(), **utilization.figures(*batches_timer.host_window())}
        if memory.plan is not None:
            result["planner_holds"] = bool(
                denoise.peak_gpu_gib is not None
                and denoise.peak_gpu_gib <= memory.plan.denoise.peak_gpu_gib
                and (encode.peak_gpu_gib or 0) <= memory.plan.encode.peak_gpu_gib
            )
    result["exit_code"] = summary.exit_code if summary else None
    timer.remove()
    if control_timer is not None:
        control_timer.remove()
    release_generator()
    free_gpu()
    return result


def with_encode_stage(result: dict, steps: int) -> dict:
    """A result line's per-image figures at 50 steps as the denoise stage's plus its encode stage's work per
    image (`result["encode"]["seconds_per_image"]`, without loading and freeing the encoder): for rows whose
    stage 1 does per-image work of its own (VL-encoding edit inputs, VAE-encoding control and init images)."""
    result.pop("forward_s_per_row_at_64_text_tokens", None)  # normalised to 4096 image tokens: misleading here
    denoise_per_image = result.get("denoise", {}).get("seconds_per_image_at_50_steps")
    if denoise_per_image:
        per_image = denoise_per_image + result["encode"]["seconds_per_image"]
        result["seconds_per_image_at_50_steps"] = round(per_image, 2)  # denoise + encode stage
        result["extrapolated"] = steps != FULL_STEPS
        result["images_per_hour_at_50_steps"] = round(3600 / per_image, 1)
    return result
