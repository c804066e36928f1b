"""`qwen-batch`: run, validate, plan, tiny-model and tiny-lora, without a server.

Exit codes: 0 every row ok or skipped; 1 some rows invalid or failed (the summary lists them);
2 usage or manifest-level errors (nothing was generated). Heavy imports happen inside the commands,
so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from qwen_batch import __version__
from qwen_batch.errors import QwenBatchError

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
MAX_PROBLEMS_SHOWN = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-batch",
        description="Turn a Parquet manifest of prompts into images with Qwen-Image, in two stages: "
        "every prompt is encoded first, then the transformer runs over the cached embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"qwen-batch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="generate the images of a manifest", description=_run_description())
    run.add_argument("manifest", metavar="MANIFEST", help="Parquet manifest: a path or fsspec URL (file://, s3://...)")
    run.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder (path or fsspec URL)")
    run.add_argument(
        "--model",
        default="tiny",
        metavar="M",
        help="hub id (Qwen/Qwen-Image), local diffusers folder, or 'tiny' (random weights, the default: "
        "for trying the pipeline, its images are noise)",
    )
    run.add_argument(
        "--transformer",
        metavar="FILE",
        help="take the transformer from one file (path or URL): a safetensors file in bf16 or fp8 e4m3fn "
        "(ComfyUI's qwen_image_fp8_e4m3fn.safetensors) or a GGUF file (Q8_0 ... Q3_K_M); the text encoder, VAE "
        "and the transformer's config still come from --model (docs/memory.md)",
    )
    run.add_argument(
        "--controlnet",
        metavar="MODEL",
        help="the ControlNet of rows with control_image: a hub id (InstantX/Qwen-Image-ControlNet-Union), a "
        "folder, or 'tiny' (random weights, for --model tiny); checked against the transformer before anything "
        "loads (docs/conditions.md)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="images per transformer batch (default: the memory plan's; 4 when the transformer is resident)",
    )
    run.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    run.add_argument("--dtype", default="auto", help="auto (default: bf16 on GPU, fp32 on CPU), bf16 or fp32")
    run.add_argument("--cache", metavar="URI", help="embedding cache folder (default: OUT/cache)")
    run.add_argument(
        "--encode-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="prompts per text-encoder batch (default 16)",
    )
    run.add_argument(
        "--shard",
        metavar="K/N",
        type=_shard,
        default=(0, 1),
        help="generate only shard K of N (rows dealt out by predicted GPU time, so shards finish together), e.g. one per GPU; "
        "then run again without --shard to merge the results",
    )
    _add_input_flags(run)
    run.add_argument(
        "--max-input-pixels",
        type=int,
        default=None,
        metavar="N",
        help="edit manifests: refuse input images of more pixels than this (decompression bombs; default 50 MP)",
    )
    _add_sampling_flags(run)
    _add_memory_flags(run)
    _add_storage_flags(run)
    _add_output_flags(run)

    validate = commands.add_parser(
        "validate", help="check a manifest without loading models", description="Print the validation report."
    )
    validate.add_argument("manifest", metavar="MANIFEST")
    _add_input_flags(validate)
    _add_storage_flags(validate)
    _add_output_flags(validate)

    plan = commands.add_parser(
        "plan",
        help="which memory mode and batch size fit this GPU, with predicted memory and speed",
        description="Print, for each stage (encode, denoise), the memory mode, batch size, predicted peak GPU "
        "memory, host RAM and seconds per image, for this machine's GPU and RAM (or those given). Loads no "
        "model. Exit code 2 when nothing fits, with the reason.",
    )
    plan.add_argument("--gpu-memory", type=float, metavar="GiB", help="plan for a GPU of this size (default: detected)")
    plan.add_argument(
        "--host-memory", type=float, metavar="GiB", help="plan for this much host RAM (default: detected)"
    )
    plan.add_argument("--width", type=int, default=1024, metavar="W", help="image width (default 1024)")
    plan.add_argument("--height", type=int, default=1024, metavar="H", help="image height (default 1024)")
    plan.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default 50)")
    plan.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per batch (default: chosen)")
    plan.add_argument("--task", choices=("generate", "edit"), default="generate")
    plan.add_argument("--memory-mode", default="auto", choices=_memory_mode_choices(), help="default auto")
    plan.add_argument(
        "--transformer",
        metavar="FILE",
        help="plan for the transformer in this file (safetensors fp8/bf16 or GGUF; only its header is read)",
    )
    plan.add_argument(
        "--disk-gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help="how fast weights that do not fit host RAM read back from disk at every step (default "
        "$QWEN_BATCH_DISK_GBPS, else 1; a cloud volume may be far slower)",
    )
    plan.add_argument(
        "--fp8-matmul",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the GPU has fp8 matmuls (compute capability 8.9 or newer; default: detected, else yes)",
    )
    plan.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="plan a fan-out over N such GPUs, one shard process each: the mode per GPU, the images per hour of "
        "all of them, and how the options compare (e.g. fp8 on each of 2 x 24 GiB, or bf16 with offload)",
    )
    plan.add_argument(
        "--gpus-per-host",
        type=int,
        default=None,
        metavar="K",
        help="with --gpus: how many of the GPUs share one host's RAM (default: all of them)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_output_flags(plan)

    tiny = commands.add_parser(
        "tiny-model",
        help="write the tiny random-weight Qwen-Image model (diffusers format)",
        description="Write a tiny random-weight QwenImagePipeline, loadable with from_pretrained, built offline.",
    )
    tiny.add_argument("directory", metavar="DIR", help="the model folder (with --format: the one file to write)")
    tiny.add_argument(
        "--format",
        choices=("diffusers", *_single_file_formats()),
        default="diffusers",
        help="diffusers: the whole model as a folder (default); bf16, fp8 (ComfyUI's layout), gguf-q8_0, gguf-q4_0: "
        "its transformer as one file, for --transformer (the rest comes from --model tiny)",
    )
    tiny.add_argument(
        "--task",
        choices=("generate", "edit", "edit-plus", "controlnet", "controlnet-inpaint"),
        default="generate",
        help="generate: QwenImagePipeline (default); edit: QwenImageEditPipeline; "
        "edit-plus: QwenImageEditPlusPipeline (several input images); controlnet, controlnet-inpaint: a tiny "
        "QwenImageControlNetModel for the tiny model, for --controlnet (as InstantX's Union and Inpainting)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    _add_output_flags(tiny)

    tiny_lora = commands.add_parser(
        "tiny-lora",
        help="write a random LoRA adapter for a model (to try adapters with a tiny model)",
        description="Write a random LoRA (safetensors) for every linear layer of the model's transformer blocks, "
        "in the key layout of diffusers, kohya, ComfyUI or DiffSynth. Reads the model's config only.",
    )
    tiny_lora.add_argument(
        "model", metavar="MODEL", help="a diffusers model folder, or tiny / tiny-edit / tiny-edit-plus"
    )
    tiny_lora.add_argument("output", metavar="OUT.safetensors")
    tiny_lora.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    tiny_lora.add_argument(
        "--format", choices=_lora_formats(), default="diffusers", help="key layout (default diffusers)"
    )
    tiny_lora.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_output_flags(tiny_lora)
    return parser


def _run_description() -> str:
    return (
        "Validate MANIFEST, encode every prompt into the embedding cache, free the text encoder, then "
        "generate images in batches into OUT/images/<id>.png and write OUT/results.parquet. Running the "
        "same command again skips rows already done and regenerates rows whose parameters changed."
    )


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write the shard as K/N, e.g. 0/2") from None
    return index, count


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("generate", "edit"),
        default=None,
        help="generate (text to image) or edit (an input image per row); default: edit when the manifest "
        "has an 'image' or 'images' column",
    )
    parser.add_argument(
        "--allow-inputs",
        action="append",
        default=[],
        metavar="PREFIX",
        help="edit manifests: also read input images under PREFIX (a folder path or URL such as "
        "s3://bucket/inputs/); by default only the manifest's own folder is allowed. Repeatable.",
    )


def _single_file_formats() -> tuple[str, ...]:
    from qwen_batch.weights.single_file import FORMATS

    return FORMATS


def _lora_formats() -> tuple[str, ...]:
    from qwen_batch.tiny.lora import FORMATS

    return FORMATS


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Adapters and sampling",
        "Run-wide values for the rows whose 'loras', 'scheduler_shift' or 'step_cache' column is empty "
        "(docs/manifest.md).",
    )
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA adapter (.safetensors path or URL; diffusers, kohya, ComfyUI or DiffSynth keys) fused for "
        "those rows, at SCALE (default 1.0). Repeatable.",
    )
    group.add_argument(
        "--scheduler-shift",
        type=float,
        default=None,
        metavar="S",
        help="sample with a fixed shift S instead of the model's size-dependent one; the Lightning LoRAs "
        "want 3, for rows with true_cfg_scale 1 and 8 or 4 steps",
    )
    group.add_argument(
        "--step-cache",
        default=None,
        metavar="SPEC",
        help="reuse the transformer's work across steps, decided row by row: none (default), "
        "first-block:T[,warmup=N] (diffusers' FirstBlockCache, e.g. first-block:0.1 or first-block:0.12,warmup=4: "
        "the first 4 steps always compute) or taylorseer[:interval=5,warmup=3,order=1]; faster, lossy: check the "
        "images (docs/step-cache.md)",
    )


def _memory_mode_choices() -> tuple[str, ...]:
    from qwen_batch.memory.planner import MEMORY_MODES

    return MEMORY_MODES


def _add_memory_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GPU memory and speed", "See `qwen-batch plan` and docs/memory.md.")
    group.add_argument(
        "--memory-mode",
        default="auto",
        choices=_memory_mode_choices(),
        help="auto (default: the plan for this GPU and host RAM), bf16 (resident), fp8 (float8 linears), "
        "offload (weights streamed from pinned host RAM, large batches) or sequential (last resort)",
    )
    group.add_argument(
        "--fp8-every-linear",
        action="store_true",
        help="when the mode is fp8: the image MLP's last linear in fp8 too, which fp8 otherwise keeps in bf16 for "
        "quality (8%% faster per step on an H200; check your images, docs/memory.md)",
    )
    group.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the transformer blocks: auto (default) when resident on a GPU with 8 or more images",
    )
    group.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="compiled kernels are kept here for the next run (default: $TORCHINDUCTOR_CACHE_DIR, else "
        "$QWEN_BATCH_HOME/compile-cache)",
    )


def _add_storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "S3 and S3-compatible storage",
        "Unset options come from AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION and ~/.aws, as for the AWS CLI. "
        "Credentials are never printed or written to results.",
    )
    group.add_argument("--s3-endpoint-url", metavar="URL", help="e.g. http://minio:9000 or an R2 endpoint")
    group.add_argument("--s3-region", metavar="REGION")
    group.add_argument("--s3-profile", metavar="NAME", help="a profile of ~/.aws/config")
    group.add_argument("--s3-anonymous", action="store_true", help="no credentials (public buckets)")


def _storage_options(args: argparse.Namespace):
    from qwen_batch.io.storage import s3_storage_options

    return s3_storage_options(args.s3_endpoint_url, args.s3_region, args.s3_profile, args.s3_anonymous)


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="only errors and the summary")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "tiny-lora":
            return _tiny_lora(args)
        return _tiny_model(args)
    except QwenBatchError as error:
        print(f"qwen-batch: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qwen-batch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from qwen_batch.adapters.loras import parse_lora_option
    from qwen_batch.progress import ProgressBars, show_library_progress_bars
    from qwen_batch.run.engine import RunConfig, run

    config = RunConfig(
        manifest=args.manifest,
        output=args.output,
        model=args.model,
        transformer=args.transformer,
        controlnet=args.controlnet,
        batch_size=args.batch_size,
        memory_mode=args.memory_mode,
        fp8_every_linear=args.fp8_every_linear,
        compile=args.compile,
        compile_cache=args.compile_cache,
        encode_batch_size=args.encode_batch_size,
        device=args.device,
        dtype=args.dtype,
        cache=args.cache,
        shard_index=args.shard[0],
        shard_count=args.shard[1],
        storage_options=_storage_options(args),
        task=args.task,
        allowed_inputs=tuple(args.allow_inputs),
        loras=tuple(parse_lora_option(option) for option in args.lora),
        scheduler_shift=args.scheduler_shift,
        step_cache=args.step_cache,
        **({"max_input_pixels": args.max_input_pixels} if args.max_input_pixels is not None else {}),
    )
    if args.model == "tiny" and not args.quiet:
        print(
            "qwen-batch: using the tiny random-weight model (its images are noise); "
            "pass --model Qwen/Qwen-Image (or Qwen/Qwen-Image-Edit for edits) for real images",
            file=sys.stderr,
        )
    progress = ProgressBars(enabled=args.progress)
    show_library_progress_bars(progress.enabled)
    summary = run(config, progress=progress)
    print(format_summary(summary))
    return EXIT_OK if summary.exit_code == 0 else EXIT_ROWS_FAILED


def format_summary(summary) -> str:
    def seconds(value: float) -> str:
        return f"{value:.1f} s"

    rate = summary.images_per_hour
    rows = [
        ("rows", f"{summary.rows}"),
        ("generated", f"{summary.generated}"),
        ("skipped", f"{summary.skipped}  (already done with the same parameters)"),
        ("invalid", f"{summary.invalid}"),
        ("failed", f"{summary.failed}"),
        (
            "encode",
            f"{seconds(summary.encode.seconds)}  ({summary.encode.encoded} texts encoded, "
            f"{summary.encode.cached} from cache)",
        ),
        (
            "denoise",
            f"{seconds(summary.denoise.seconds)}"
            + (
                f"  ({rate:,.0f} images/hour, {summary.denoise.storage_wait_seconds:.1f} s waiting on storage)"
                if rate
                else ""
            ),
        ),
    ]
    if summary.denoise.adapter_fuses:
        rows.append(
            ("adapters", f"{summary.denoise.adapter_fuses} sets fused, {seconds(summary.denoise.adapter_seconds)}")
        )
    if summary.denoise.cached_steps:
        from qwen_batch.pipeline.step_cache import step_cache_line

        rows.append(
            ("step cache", step_cache_line(summary.denoise.cached_steps_computed, summary.denoise.cached_steps))
        )
    for stage, stats in (("encode", summary.encode), ("denoise", summary.denoise)):
        if stats.peak_gpu_gib is not None:
            rows.append((f"peak GPU ({stage})", f"{stats.peak_gpu_gib:.1f} GiB"))
    rows += [("images", f"{summary.output.rstrip('/')}/images/"), ("results", summary.results)]
    width = max(len(name) for name, _ in rows)
    lines = ["", "qwen-batch summary", *(f"  {name:<{width}}  {value}" for name, value in rows)]
    if summary.problems:
        lines.append(f"\nrows not ok ({len(summary.problems)}):")
        for index, row_id, status, error in summary.problems[:MAX_PROBLEMS_SHOWN]:
            lines.append(f"  row {index} id={row_id!r} {status}: {error}")
        if len(summary.problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {len(summary.problems) - MAX_PROBLEMS_SHOWN} more: see {summary.results}")
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    from qwen_batch.manifest import read_manifest

    manifest = read_manifest(args.manifest, _storage_options(args), args.task, tuple(args.allow_inputs))
    print(manifest.report())
    return EXIT_OK if not manifest.invalid else EXIT_ROWS_FAILED


def _plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from qwen_batch.memory.planner import (
        DISK_GBPS,
        DISK_SPEED_ENV,
        Job,
        Machine,
        WeightsSummary,
        detect_machine,
        env_number,
        host_memory_gib,
        plan_memory,
    )

    if args.gpu_memory is None:
        machine = detect_machine("cuda", host_gib=args.host_memory, disk_gbps=args.disk_gbps)
    else:
        disk = args.disk_gbps or env_number(DISK_SPEED_ENV, "GB/s") or DISK_GBPS
        machine = Machine(gpu_gib=args.gpu_memory, host_gib=args.host_memory or host_memory_gib(), disk_gbps=disk)
    if args.fp8_matmul is not None:
        machine = dataclasses.replace(machine, fp8_compute=args.fp8_matmul)
    weights = WeightsSummary.published() if not args.transformer else _planned_weights(args.transformer)
    job = Job(
        width=args.width,
        height=args.height,
        steps=args.steps,
        task=args.task,
        batch_size=args.batch_size,
        weights=weights,
    )
    plan = plan_memory(machine, job, args.memory_mode)
    if args.gpus is None:
        print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.report())
        return EXIT_OK
    from qwen_batch.memory.fleet import plan_fleet

    fleet = plan_fleet(machine, job, args.gpus, args.memory_mode, args.gpus_per_host)
    if args.json:
        print(json.dumps({"per_gpu": fleet.chosen.plan.to_dict(), "fleet": fleet.to_dict()}, indent=1))
    else:
        print(f"{fleet.chosen.plan.report()}\n{fleet.report()}")
    return EXIT_OK


def _planned_weights(location: str):
    """A --transformer file as the planner sees it: kind and sizes from its header (nothing loaded)."""
    from qwen_batch.memory.planner import WeightsSummary
    from qwen_batch.weights.transformer_file import TransformerWeights, file_tensors, open_transformer_file

    file = open_transformer_file(location)
    return WeightsSummary.of(TransformerWeights(config={}, tensors=file_tensors(file)[0], file=file))


def _tiny_model(args: argparse.Namespace) -> int:
    from qwen_batch.tiny.model import write_tiny_model

    if args.format != "diffusers":
        from qwen_batch.weights.model_source import ensure_tiny_model
        from qwen_batch.weights.single_file import write_model_transformer_file

        path = write_model_transformer_file(ensure_tiny_model(args.task), args.directory, args.format)
        print(f"wrote the tiny model's transformer as one {args.format} file to {path} (use it with --model tiny)")
        return EXIT_OK
    if args.task.startswith("controlnet"):
        from qwen_batch.tiny.controlnet import write_tiny_controlnet

        kind = "inpaint" if args.task == "controlnet-inpaint" else "union"
        folder = write_tiny_controlnet(args.directory, kind, seed=args.seed)
        print(f"wrote a tiny random-weight {kind} ControlNet for --model tiny to {folder} (use it with --controlnet)")
        return EXIT_OK
    folder = write_tiny_model(args.directory, seed=args.seed, task=args.task)
    pipeline = {"generate": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit-plus": "Qwen-Image-Edit-Plus"}[args.task]
    print(f"wrote a tiny random-weight {pipeline} pipeline to {folder}")
    return EXIT_OK


def _tiny_lora(args: argparse.Namespace) -> int:
    from qwen_batch.tiny.lora import write_tiny_lora

    path = write_tiny_lora(args.model, args.output, rank=args.rank, layout=args.format, seed=args.seed)
    print(f"wrote a random rank-{args.rank} LoRA ({args.format} keys) for {args.model} to {path}")
    return EXIT_OK


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # diffusers and transformers log per-component load chatter; they read these before first use.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
