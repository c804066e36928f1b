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
from qwen_batch.families import EDIT, EDIT_PLUS, GENERATE
from qwen_batch.memory.modes import AUTO, MEMORY_MODES

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2
MAX_PROBLEMS_SHOWN = 20
# The run options `validate` takes too: what reading and checking a manifest depends on (the model: its rules).
VALIDATE_OPTIONS = (
    "manifest",
    "model",
    "task",
    "allow_inputs",
    "s3_endpoint_url",
    "s3_region",
    "s3_profile",
    "s3_anonymous",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-batch",
        description="Turn a Parquet manifest of prompts into images with Qwen-Image, in two stages: "
        "every prompt is encoded first, then the transformer runs over the cached embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"qwen-batch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="generate the images of a manifest", description=_run_description())
    add_run_options(run)
    _add_output_flags(run)

    validate = commands.add_parser(
        "validate",
        help="check a manifest without loading models",
        description="Print the validation report: every row checked as `run` checks it, against the rules of "
        "--model's family and checkpoint (sizes, steps, guidance, condition images; the rows the family cannot "
        "run). Loads no model and builds no tiny model: a model's model_index.json is all that is read (a hub "
        "model not on this machine: that file alone is fetched). Exit code 1 when some rows are invalid, 2 for a "
        "manifest-level problem.",
    )
    add_run_options(validate, VALIDATE_OPTIONS)
    _add_output_flags(validate)

    plan = commands.add_parser(
        "plan",
        help="which memory mode and batch size fit this GPU, with predicted memory and speed",
        description="Print, for each stage (encode, denoise), the memory mode, batch size, predicted peak GPU "
        "memory, host RAM and seconds per image, for this machine's GPU and RAM (or those given). Loads no "
        "model. Exit code 2 when nothing fits, with the reason.",
    )
    plan.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="plan for this model's family (its sizes and costs): a hub id, a local diffusers folder or a tiny model's "
        "name such as tiny-2.1; no weights are read (a hub id not downloaded: its model_index.json only). Default: "
        "Qwen-Image",
    )
    plan.add_argument("--gpu-memory", type=float, metavar="GiB", help="plan for a GPU of this size (default: detected)")
    plan.add_argument(
        "--host-memory", type=float, metavar="GiB", help="plan for this much host RAM (default: detected)"
    )
    plan.add_argument("--width", type=int, default=1024, metavar="W", help="image width (default 1024)")
    plan.add_argument("--height", type=int, default=1024, metavar="H", help="image height (default 1024)")
    plan.add_argument(
        "--steps", type=int, default=None, metavar="N", help="denoising steps (default: the model's, 50 for Qwen-Image)"
    )
    plan.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per batch (default: chosen)")
    plan.add_argument("--task", choices=(GENERATE, EDIT), default=GENERATE)
    plan.add_argument(
        "--condition-images",
        type=int,
        default=0,
        metavar="N",
        help="condition images per row (Qwen-Image-2.1: each adds its tokens to the row's cached prefix; default 0)",
    )
    plan.add_argument("--memory-mode", default=AUTO, choices=MEMORY_MODES, help="default auto")
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
        help="write a tiny random-weight model (diffusers format): Qwen-Image's, or with --model another family's",
        description="Write a tiny random-weight model, loadable with its pipeline class's from_pretrained, built "
        "offline: Qwen-Image's QwenImagePipeline by default, another with --model (tiny-2.1: a QwenImage21Pipeline).",
    )
    tiny.add_argument("directory", metavar="DIR", help="the model folder (with --format: the one file to write)")
    tiny.add_argument(
        "--format",
        choices=("diffusers", *_single_file_formats()),
        default="diffusers",
        help="diffusers: the whole model as a folder (default); bf16, fp8 (ComfyUI's layout), gguf-q8_0, gguf-q4_0: "
        "its transformer as one file, for --transformer (the rest comes from --model tiny)",
    )
    which = tiny.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        choices=_tiny_model_names(),
        default=None,
        metavar="NAME",
        help="the tiny model that --model NAME runs elsewhere, written to DIR: "
        f"{', '.join(_tiny_model_names())} (tiny-2.1: QwenImage21Pipeline; tiny-2.1-turbo: the same with Turbo's "
        "8 sample_sigmas in its model_index.json). Default: tiny, or what --task says",
    )
    which.add_argument(
        "--task",
        choices=(GENERATE, EDIT, EDIT_PLUS, "controlnet", "controlnet-inpaint"),
        default=None,
        help="for Qwen-Image: generate: QwenImagePipeline (default); edit: QwenImageEditPipeline; "
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
        "model",
        metavar="MODEL",
        help=f"a diffusers model folder, or a tiny model's name: {' / '.join(_tiny_model_names())}",
    )
    tiny_lora.add_argument("output", metavar="OUT.safetensors")
    tiny_lora.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    tiny_lora.add_argument(
        "--format",
        choices=_lora_formats(),
        default="diffusers",
        help="key layout (default diffusers; not kohya for Qwen-Image-2.1, whose layer names kohya's cannot spell)",
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


def add_run_options(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """The flags of the run options (`qwen_batch.run.config`), or of those named, grouped as declared."""
    from qwen_batch.run.config import GROUP_HELP, option_default, option_types, run_options

    types, groups = option_types(), {}
    for name, how in run_options():
        if names is not None and name not in names:
            continue
        if how.group is None:
            target = parser
        elif how.group not in groups:
            target = groups[how.group] = parser.add_argument_group(how.group, GROUP_HELP[how.group])
        else:
            target = groups[how.group]
        flags, settings = _argparse_settings(name, how, types[name], option_default(name))
        target.add_argument(*flags, **settings)


def _argparse_settings(name: str, how, kind, default) -> tuple[list[str], dict]:
    """argparse's spelling of one run option: flags and keyword arguments."""
    import typing

    from qwen_batch.run.config import MISSING

    settings: dict = {"help": how.help.replace("%", "%%"), "metavar": how.metavar}
    if how.flag == "":
        return [name], settings
    flags = [how.cli_flag(name), *([how.short] if how.short else [])]
    settings["dest"] = name
    optional = type(None) in typing.get_args(kind)  # X | None
    base = next(arg for arg in typing.get_args(kind) if arg is not type(None)) if optional else kind
    if base is bool:
        return flags, {"help": settings["help"], "dest": name, "action": "store_true"}
    if typing.get_origin(base) is tuple:  # repeatable: the raw texts, parsed in _option_value
        return flags, {**settings, "action": "append", "default": []}
    if default is MISSING:
        settings["required"] = True
    else:
        settings["default"] = default
    if how.choices is not None:  # checked by RunConfig, whose message says why (e.g. fp16 overflows)
        settings["metavar"] = "{" + ",".join(how.choices) + "}"
    elif how.parse is None and base in (int, float):
        settings["type"] = base
    return flags, settings


def _option_value(how, value):
    """A flag's value as the run option takes it: `how.parse` applied (its errors are usage errors, exit 2)."""
    if how.parse is None or value is None:
        return value
    if isinstance(value, list):
        return tuple(how.parse(item) for item in value)
    return how.parse(value)


def _single_file_formats() -> tuple[str, ...]:
    from qwen_batch.weights.single_file import FORMATS

    return FORMATS


def _tiny_model_names() -> list[str]:
    """The tiny models' names, every family's (`--model tiny-2.1`...)."""
    from qwen_batch.families import _families

    return [name for family in _families() for name in family.tiny_models]


def _lora_formats() -> tuple[str, ...]:
    from qwen_batch.tiny.lora import FORMATS

    return FORMATS


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
    from qwen_batch.progress import ProgressBars, show_library_progress_bars
    from qwen_batch.run.config import RunConfig, run_options
    from qwen_batch.run.engine import run

    config = RunConfig(**{name: _option_value(how, getattr(args, name)) for name, how in run_options()})
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
    from qwen_batch.run.summary import summary_rows

    rows = summary_rows(summary.to_dict())
    from qwen_batch.outputs.shards import FOLDERS

    folder = FOLDERS.get(summary.outputs.get("output_format"), "images")
    rows += [("images", f"{summary.output.rstrip('/')}/{folder}/"), ("results", summary.results)]
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
    from qwen_batch.io.storage import s3_storage_options
    from qwen_batch.manifest import read_manifest

    storage = s3_storage_options(args.s3_endpoint_url, args.s3_region, args.s3_profile, args.s3_anonymous)
    task = None if args.task == AUTO else args.task
    family, rules = _named_model(args.model)
    manifest = read_manifest(args.manifest, storage, task, tuple(args.allow_inputs), family_rules=rules)
    manifest = manifest.invalidated(family.refused(manifest.requests))  # as the run makes them
    print(manifest.report())
    return EXIT_OK if not manifest.invalid else EXIT_ROWS_FAILED


def _plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from qwen_batch.errors import ConfigError
    from qwen_batch.memory.planner import (
        DISK_GBPS,
        DISK_SPEED_ENV,
        Machine,
        WeightsSummary,
        Workload,
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
    family, rules = _named_model(args.model)
    if args.task not in family.pipelines.values():
        raise ConfigError(f"--task {args.task}: {family.name} models do not {args.task}")
    most = family.rows.max_condition_images
    if not 0 <= args.condition_images <= most:
        takes = f"0 to {most} condition images" if most else "no condition images"
        raise ConfigError(f"--condition-images {args.condition_images}: {family.name} rows take {takes}")
    costs = family.cost_constants()
    weights = WeightsSummary.published(costs) if not args.transformer else _planned_weights(args.transformer)
    job = Workload(
        width=args.width,
        height=args.height,
        steps=args.steps if args.steps is not None else rules.default_steps,  # 2.1-Turbo's: its 8 sigmas
        true_cfg=family.rows.default_true_cfg_scale > 1,
        task=args.task,
        batch_size=args.batch_size,
        weights=weights,
        condition_images=args.condition_images,
        family=family.name,
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


def _named_model(model: str | None):
    """The family `--model` names (for `plan` and `validate`) and its checkpoint's row rules (2.1-Turbo's fixed
    steps), without reading weights or building a tiny model: a tiny model's by its name (`tiny_model_index`: what
    its model_index.json will say), any other's from its model_index.json (a hub model not on this machine: that
    file alone is fetched). A published model named in a family's examples (Qwen/Qwen-Image-2.1) is that
    family's, with the family's rules, when its model_index.json cannot be read (offline)."""
    from qwen_batch.errors import ModelError
    from qwen_batch.families import _families, default_family, family_of_pipeline, tiny_model

    if model is None:
        return default_family(), default_family().rows
    registered = tiny_model(model)
    if registered is not None:
        family, task = registered
        return family, family.checkpoint_rules(family.rows, family.tiny_model_index(task))
    from qwen_batch.weights.model_source import model_index, resolve_model

    try:
        source = resolve_model(model)
        index = model_index(source)
        family = family_of_pipeline(index.get("_class_name"), source.name)
    except ModelError as error:
        known = [family for family in _families() if model in family.example_models.values()]
        if not known:
            raise
        logging.getLogger(__name__).warning(
            "%s; using the rules of %s, whose published model it is", error, known[0].name
        )
        return known[0], known[0].rows
    return family, family.checkpoint_rules(family.rows, index)


def _planned_weights(location: str):
    """A --transformer file as the planner sees it: kind and sizes from its header (nothing loaded)."""
    from qwen_batch.memory.planner import WeightsSummary
    from qwen_batch.weights.transformer_file import TransformerWeights, file_tensors, open_transformer_file

    file = open_transformer_file(location)
    return WeightsSummary.of(TransformerWeights(config={}, tensors=file_tensors(file)[0], file=file))


def _tiny_model(args: argparse.Namespace) -> int:
    from qwen_batch.families import default_family, tiny_model

    family, task = tiny_model(args.model) if args.model else (default_family(), args.task or GENERATE)
    if family is not default_family():
        return _tiny_model_of(family, task, args)
    from qwen_batch.tiny.model import write_tiny_model

    if args.format != "diffusers":
        from qwen_batch.weights.model_source import ensure_tiny_model
        from qwen_batch.weights.single_file import write_model_transformer_file

        path = write_model_transformer_file(ensure_tiny_model(task), args.directory, args.format)
        print(f"wrote the tiny model's transformer as one {args.format} file to {path} (use it with --model tiny)")
        return EXIT_OK
    if task.startswith("controlnet"):
        from qwen_batch.tiny.controlnet import write_tiny_controlnet

        kind = "inpaint" if task == "controlnet-inpaint" else "union"
        folder = write_tiny_controlnet(args.directory, kind, seed=args.seed)
        print(f"wrote a tiny random-weight {kind} ControlNet for --model tiny to {folder} (use it with --controlnet)")
        return EXIT_OK
    folder = write_tiny_model(args.directory, seed=args.seed, task=task)
    pipeline = {GENERATE: "Qwen-Image", EDIT: "Qwen-Image-Edit", EDIT_PLUS: "Qwen-Image-Edit-Plus"}[task]
    print(f"wrote a tiny random-weight {pipeline} pipeline to {folder}")
    return EXIT_OK


def _tiny_model_of(family, flavour: str, args: argparse.Namespace) -> int:
    """`tiny-model --model NAME` for another family than Qwen-Image (tiny-2.1, tiny-2.1-turbo): its folder."""
    import json
    from pathlib import Path

    from qwen_batch.errors import ConfigError

    if args.format != "diffusers":
        raise ConfigError(
            f"--format {args.format}: only Qwen-Image's tiny transformer is written as one file; leave --format out "
            f"to write {args.model} as a diffusers folder"
        )
    folder = Path(family.write_tiny_model(Path(args.directory), args.seed, flavour))
    pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
    print(f"wrote the tiny random-weight {args.model} model ({pipeline}) to {folder} (use it with --model {folder})")
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
