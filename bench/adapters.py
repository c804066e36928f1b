"""How fast do LoRA adapters run, with Lightning's few steps, and what does switching adapter sets cost?

    python -m bench.adapters --only lightning-bf16,switching-bf16 --json out.jsonl
    python -m bench.adapters --model tiny --only lightning-bf16          # the same code on the CPU, tiny model

Full-size random weights (bench/full_size.py) and random rank-64 adapters on every linear layer of the
transformer blocks (qwen_batch.tiny.lora, diffusers layout, bf16: 1.2 GB each, as large as a real rank-64
Qwen-Image LoRA), written once to the work root. Speed transfers to the released weights; pictures do not.

`lightning-*`, 1024x1024, the Lightning recipe (8 steps, true_cfg_scale 1, fixed shift 3), one adapter:
1. diffusers' recipe: `QwenImagePipeline` resident, the adapter through `load_lora_weights` (unfused, as
   the Lightning model card loads it), the scheduler built with `base_shift = max_shift = ln 3` and
   `shift_terminal = None`, one `pipe()` per prompt; wall time per image, measured at 8 steps;
2. the common 50-step recipe (true CFG 4, negative " ", no adapter) on the same pipeline: its forwards
   timed at a few steps and extrapolated to 50;
3. qwen-batch in the scenario's memory mode (regional compile, batches of 4, a compile cache of its own)
   through its stages on a manifest of the same prompts and seeds: a first pass over one batch compiles and
   fuses (timed and reported apart), then a second pass over the other rows is the steady state.
Ratios are against (1) and (2) of this process.

`switching-*`: 64 rows over 4 adapter sets in shuffled order (512x512, 2 steps, true CFG 1): how many fuses,
how long switching took, whether a switch recompiled a block (dynamo's graph count after the first batch;
`TORCH_LOGS=recompiles` gives the reasons on stderr), and diffusers' in-place `fuse_lora`/`unfuse_lora`
against qwen-batch's restore from a copy: time and exactness.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from pathlib import Path

import torch

from bench.full_size import FULL_SIZE_MODEL, TRANSFORMER_CONFIG, full_size_source, resident_pipeline
from bench.harness import Scenario, environment, main, scenarios
from bench.measure import FULL_STEPS, ForwardTimer, free_gpu, gpu_peak_gib, matmul_tflops, peak_rss_gib, synchronize
from bench.rows import prompts

LIGHTNING = {"steps": 8, "true_cfg_scale": 1.0, "shift": 3.0}
CFG_STEPS_RUN = 4


def adapter_folder(runner, rank: int) -> Path:
    """Where the adapters are kept between scenarios: per model and rank (a tiny model's do not fit the full one)."""
    return runner.root / f"adapters-{runner.args.model}-rank{rank}"


def make_adapters(folder: Path, count: int, rank: int, tiny: bool) -> list[Path]:
    """Random adapters in the diffusers layout: made on the GPU, saved as bf16 safetensors."""
    from qwen_batch.adapters.loras import layout_of_config
    from qwen_batch.tiny.lora import lora_state_dict, random_factors, write_lora

    if tiny:
        from qwen_batch.adapters.loras import transformer_layout
        from qwen_batch.weights.model_source import resolve_model

        layout, device, dtype = transformer_layout(resolve_model("tiny")), "cpu", torch.float32
    else:
        layout, device, dtype = layout_of_config(TRANSFORMER_CONFIG), "cuda", torch.bfloat16
    paths = []
    for index in range(count):
        path = folder / f"adapter{index}.safetensors"
        if not path.exists():
            factors = random_factors(layout, rank, seed=index, dtype=dtype, device=device)
            tensors = {key: value.cpu() for key, value in lora_state_dict(factors, "diffusers").items()}
            write_lora(tensors, path)
        paths.append(path)
    return paths


def write_manifest(path: Path, count: int, size: int, steps: int, cfg: float, shift: float | None, loras, texts=None):
    """`loras(i)`: the adapters of row i, as [{path, scale}]; `texts`: the prompts (default: varied)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen_batch.manifest import MANIFEST_SCHEMA

    texts = texts or prompts(count)
    rows = [
        {
            "id": f"p{i:03d}",
            "prompt": texts[i],
            "width": size,
            "height": size,
            "seed": 1000 + i,
            "num_inference_steps": steps,
            "true_cfg_scale": cfg,
            "scheduler_shift": shift,
            "loras": loras(i),
        }
        for i in range(count)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    return path


def recipes(tiny: bool, adapter: Path, count: int, size: int) -> dict:
    """(1) diffusers' Lightning recipe and (2) the 50-step CFG recipe, on one resident pipeline."""
    from qwen_batch.pipeline.denoise import fixed_shift_scheduler

    started = time.perf_counter()
    pipe = resident_pipeline(tiny)
    result = {"run": "recipes", **environment(), "size": size, "load_s": round(time.perf_counter() - started, 1)}
    texts = prompts(count)
    base_scheduler = pipe.scheduler

    def call(prompt: str, seed: int, steps: int, cfg: float):
        return pipe(
            prompt=prompt,
            negative_prompt=" ",
            true_cfg_scale=cfg,
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    # (1) Lightning: adapter loaded (not fused), fixed shift 3, 8 steps, one forward a step.
    started = time.perf_counter()
    pipe.load_lora_weights(str(adapter), adapter_name="lightning")
    synchronize()
    result["lightning_lora_load_s"] = round(time.perf_counter() - started, 2)
    pipe.scheduler = fixed_shift_scheduler(base_scheduler, LIGHTNING["shift"])
    call(texts[0], 0, 2, 1.0)  # warm-up
    timer = ForwardTimer(pipe.transformer)
    walls = []
    for index, prompt in enumerate(texts):
        synchronize()
        started = time.perf_counter()
        call(prompt, 1000 + index, LIGHTNING["steps"], LIGHTNING["true_cfg_scale"])
        synchronize()
        walls.append(time.perf_counter() - started)
    forwards = timer.seconds()
    timer.remove()
    result["lightning"] = {
        "seconds_per_image": round(statistics.median(walls), 3),
        "walls": [round(wall, 3) for wall in walls],
        "forward_s": round(statistics.median(forwards), 4),
        "images_per_hour": round(3600 / statistics.median(walls), 1),
    }

    # (2) The 50-step CFG recipe, no adapter: forwards timed over a few steps, extrapolated to 50.
    pipe.unload_lora_weights()
    pipe.scheduler = base_scheduler
    call(texts[0], 0, 2, 4.0)  # warm-up without the adapter
    timer = ForwardTimer(pipe.transformer)
    walls = []
    for index, prompt in enumerate(texts[:2]):
        synchronize()
        started = time.perf_counter()
        call(prompt, 1000 + index, CFG_STEPS_RUN, 4.0)
        synchronize()
        walls.append(time.perf_counter() - started)
    forward = statistics.median(timer.seconds())
    timer.remove()
    rest = statistics.median(walls) - forward * 2 * CFG_STEPS_RUN
    per_image = forward * 2 * FULL_STEPS + rest
    result["cfg50"] = {
        "seconds_per_image": round(per_image, 2),
        "extrapolated_from_steps": CFG_STEPS_RUN,
        "forward_s": round(forward, 4),
        "images_per_hour": round(3600 / per_image, 1),
    }
    result["peak_gpu_gib"] = gpu_peak_gib()
    pipe = None
    free_gpu()
    return result


def engine(runner, adapter: Path, mode: str, count: int, size: int, batch_size: int) -> dict:
    """qwen-batch's stages on the Lightning manifest: a warm-up pass (compile, fuse), then the steady pass."""
    from qwen_batch.run.engine import (
        RunConfig,
        denoise_stage,
        encode_stage,
        generator_for,
        plan_run,
        release_generator,
    )

    device, tiny, work = runner.device, runner.tiny, runner.work
    plan_holder = {}
    full_size_source(
        on_host=lambda stage: plan_holder["plan"].memory.denoiser.mode != "bf16" and stage == "denoise",
        device=device,
        tiny=tiny,
    )
    count = count + batch_size
    manifest = write_manifest(
        work / "lightning.parquet",
        count,
        size,
        LIGHTNING["steps"],
        LIGHTNING["true_cfg_scale"],
        LIGHTNING["shift"],
        lambda i: [{"path": str(adapter), "scale": 1.0}],
    )
    config = RunConfig(
        manifest=str(manifest),
        output=str(work / f"out-{mode}"),
        model=FULL_SIZE_MODEL,
        batch_size=batch_size,
        device=device,
        memory_mode=mode,
        compile="off" if tiny else "on",
        compile_cache=str(work / f"compile-{mode}"),  # its own: the first pass's compile is cold
        cache=str(work / "cache"),
        allow_inputs=(str(adapter.parent),),  # the adapters are kept beside the work folders, for every scenario
    )
    result = {"run": "qwen-batch", "variant": mode, **environment(), "size": size, "batch_size": batch_size}
    started = time.perf_counter()
    plan = plan_run(config)
    plan_holder["plan"] = plan
    result["plan_s (adapter read, hash, check)"] = round(time.perf_counter() - started, 2)
    encode_stage(plan)
    started = time.perf_counter()
    generator = generator_for(plan)
    synchronize()
    result["load_s"] = round(time.perf_counter() - started, 1)
    result["placed"] = generator.memory_mode
    warm, steady = plan.todo[:batch_size], plan.todo[batch_size:]
    first = denoise_stage(plan, warm)
    result["first_pass"] = {
        "images": first.generated,
        "seconds (compile + fuse + one batch)": round(first.seconds, 1),
        "fuse_seconds": round(first.adapter_seconds, 2),
        "adapter_fuses": first.adapter_fuses,
    }
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = ForwardTimer(generator.pipe.transformer)
    second = denoise_stage(plan, steady)
    forwards = timer.seconds()
    timer.remove()
    per_image = second.seconds / max(second.generated, 1)
    result["steady"] = {
        "images": second.generated,
        "failed": second.failed,
        "seconds": round(second.seconds, 2),
        "seconds_per_image": round(per_image, 3),
        "images_per_hour": round(3600 / per_image, 1),
        "forward_s (batch)": round(statistics.median(forwards), 4) if forwards else None,
        "adapter_fuses": second.adapter_fuses,
        "peak_gpu_gib": second.peak_gpu_gib,
    }
    release_generator()
    free_gpu()
    return result


def lightning(runner, mode: str, prompts: int = 8, size: int = 1024, batch_size: int = 4, rank: int = 64) -> None:
    """Diffusers' Lightning recipe and the 50-step CFG recipe, then qwen-batch in `mode`, in one process:
    three lines (`recipes`, `qwen-batch`, `lightning-summary`)."""
    rank = 4 if runner.tiny else rank
    (adapter,) = make_adapters(adapter_folder(runner, rank), 1, rank, runner.tiny)
    summary = {"run": "lightning-summary", **environment(), "matmul_tflops": matmul_tflops(), "rank": rank}
    recipe = recipes(runner.tiny, adapter, prompts, size)
    runner.write(recipe)
    summary["diffusers_lightning_s"] = recipe["lightning"]["seconds_per_image"]
    summary["diffusers_cfg50_s"] = recipe["cfg50"]["seconds_per_image"]
    result = engine(runner, adapter, mode, prompts, size, batch_size)
    seconds = result["steady"]["seconds_per_image"]
    result["vs_diffusers_lightning"] = round(summary["diffusers_lightning_s"] / seconds, 3)
    result["vs_cfg50_recipe"] = round(summary["diffusers_cfg50_s"] / seconds, 2)
    runner.write(result)
    summary[f"qwen_batch_{mode}_s"] = seconds
    summary[f"vs_diffusers_lightning_{mode}"] = result.get("vs_diffusers_lightning")
    summary[f"vs_cfg50_recipe_{mode}"] = result.get("vs_cfg50_recipe")
    runner.write(summary)


def switching(
    runner,
    mode: str = "bf16",
    compile: str = "on",
    rows: int = 64,
    steps: int = 2,
    size: int = 512,
    batch_size: int = 4,
    rank: int = 64,
    checkpoint: bool = False,
) -> None:
    """`rows` rows over 4 adapter sets in shuffled order, true CFG 1: fuses, switching time and its parts,
    recompiles after the first batch (dynamo's graph count), peak RSS; and, where diffusers can fuse into the
    weights (not fp8), its in-place fuse/unfuse against qwen-batch's restore from a copy. `checkpoint`: the
    full-size checkpoint on disk (`--checkpoint`, as a user's run reads it) instead of one built in memory."""
    import torch._dynamo.utils

    from qwen_batch.run.engine import (
        RunConfig,
        denoise_stage,
        encode_stage,
        generator_for,
        make_batches,
        plan_run,
        release_generator,
    )

    work, device, tiny = runner.work, runner.device, runner.tiny
    rank = 4 if tiny else rank
    adapters = make_adapters(adapter_folder(runner, rank), 4, rank, tiny)
    model = checkpoint_model(runner) if checkpoint else FULL_SIZE_MODEL
    if not checkpoint:  # built in memory; else the checkpoint on disk, as a user's run reads it
        full_size_source(device=device, tiny=tiny)
    assignment = [index % 4 for index in range(rows)]
    random.Random(0).shuffle(assignment)
    manifest = write_manifest(
        work / "switching.parquet",
        rows,
        size,
        steps,
        1.0,
        None,
        lambda i: [{"path": str(adapters[assignment[i]]), "scale": 1.0}],
        # One prompt for every row: every batch has the same shapes, so a new graph can only be a recompile.
        texts=prompts(1) * rows,
    )
    config = RunConfig(
        manifest=str(manifest),
        output=str(work / f"out-switching-{mode}"),  # each mode generates every row (no resume)
        model=model,
        batch_size=batch_size,
        device=device,
        memory_mode=mode,
        compile="off" if tiny else compile,
        cache=str(work / "cache"),
        allow_inputs=(str(adapters[0].parent),),
    )
    result = {"run": "switching", **environment(), "rows": rows, "sets": 4, "size": size, "mode": mode}
    result["compile"] = config.compile
    result["model"] = "disk" if model else "built in memory"
    result["order"] = "".join(str(index) for index in assignment)
    started = time.perf_counter()
    plan = plan_run(config)
    result["plan_s (4 adapters read, hashed, checked)"] = round(time.perf_counter() - started, 2)
    encode_stage(plan)
    generator = generator_for(plan)
    batches = make_batches(plan.todo, plan.batch_size)  # the run's order: each set's batches together
    first_batch = denoise_stage(plan, batches[0])  # compiles
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rest = denoise_stage(plan, [row for batch in batches[1:] for row in batch])
    graphs_after = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    stats = generator.fusion.stats
    result.update(
        batches=-(-rows // batch_size),
        adapter_fuses=first_batch.adapter_fuses + rest.adapter_fuses,
        switching_seconds=round(first_batch.adapter_seconds + rest.adapter_seconds, 2),
        seconds_per_switch=round(stats.seconds / max(stats.switches, 1), 2),
        switching_parts_seconds={
            "read, hash-check, convert": round(stats.read_seconds, 2),
            "restore originals": round(stats.restore_seconds, 2),
            "diffusers load, set_adapters, fuse, unload": round(stats.fuse_seconds, 2),
            "fp8: install bf16, quantize again": round(stats.requantize_seconds, 2),
        },
        new_graphs_after_first_batch=graphs_after - graphs_before,
        images=first_batch.generated + rest.generated,
        failed=first_batch.failed + rest.failed,
        denoise_seconds=round(first_batch.seconds + rest.seconds, 2),
        vm_hwm_gib=peak_rss_gib(),
    )
    if generator.fusion.quantized is None:  # diffusers cannot fuse into fp8 weights: nothing to compare
        result["fuse_in_place_vs_restore"] = compare_unfuse(generator, adapters[0])
    runner.write(result)
    release_generator()
    free_gpu()


def compare_unfuse(generator, adapter: Path) -> dict:
    """diffusers' own round trip (load, fuse_lora, unfuse_lora: subtracts the delta again) against
    qwen-batch's (fuse, then restore the copy): seconds, and how far each leaves the weights."""
    from qwen_batch.adapters.loras import LoraRef

    pipe, transformer = generator.pipe, generator.pipe.transformer
    generator.fusion.use(())
    names = [name for name in generator.fusion.layout if name.startswith("transformer_blocks.")]
    before = {
        name: transformer.get_submodule(name).weight.detach().clone() for name in names[:: max(len(names) // 64, 1)]
    }

    def drift() -> dict:
        worst = max(
            (transformer.get_submodule(name).weight - weight).abs().max().item() for name, weight in before.items()
        )
        changed = sum(
            not torch.equal(transformer.get_submodule(name).weight, weight) for name, weight in before.items()
        )
        return {"max_abs_weight_change": worst, "layers_changed": f"{changed} of {len(before)} sampled"}

    with torch.no_grad():
        pipe.load_lora_weights(str(adapter), adapter_name="round_trip")
        synchronize()
        started = time.perf_counter()
        pipe.fuse_lora(components=["transformer"], adapter_names=["round_trip"])
        synchronize()
        fuse = time.perf_counter() - started
        started = time.perf_counter()
        pipe.unfuse_lora(components=["transformer"])
        synchronize()
        unfuse = time.perf_counter() - started
        pipe.unload_lora_weights()
        diffusers_round_trip = {"fuse_s": round(fuse, 3), "unfuse_s": round(unfuse, 3), **drift()}
        for weight, name in zip(before.values(), before, strict=True):
            transformer.get_submodule(name).weight.copy_(weight)
    ref = LoraRef(str(adapter), 1.0, hashlib.sha256(adapter.read_bytes()).hexdigest())
    started = time.perf_counter()
    generator.fusion.use((ref,))
    synchronize()
    fuse = time.perf_counter() - started
    started = time.perf_counter()
    generator.fusion.use(())
    synchronize()
    restore = time.perf_counter() - started
    ours = {"switch_in_s (read, load, fuse)": round(fuse, 3), "restore_s": round(restore, 3), **drift()}
    return {"diffusers_fuse_unfuse": diffusers_round_trip, "qwen_batch_fuse_restore": ours}


def checkpoint_model(runner) -> str:
    """The full-size checkpoint on disk (bench/memory_tiers.py writes it, `--checkpoint`); the tiny model in a
    dry run."""
    if runner.tiny:
        return "tiny"
    from bench.memory_tiers import checkpoint_path

    return str(checkpoint_path(runner))


SCENARIOS = scenarios(
    Scenario("lightning-bf16", lightning, {"mode": "bf16"}, "Lightning with an adapter, bf16, against both recipes", 4),
    Scenario("lightning-fp8", lightning, {"mode": "fp8"}, "Lightning with an adapter, fp8, against both recipes", 6),
    Scenario(
        "switching-bf16",
        switching,
        {"mode": "bf16"},
        "64 rows over 4 adapter sets, compiled: fuses, switch time, recompiles",
        4,
        env={"TORCH_LOGS": "recompiles"},
    ),
    Scenario(
        "switching-fp8",
        switching,
        {"mode": "fp8", "compile": "off"},
        "64 rows over 4 adapter sets in fp8, eager: what quantizing again costs",
        5,
    ),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
