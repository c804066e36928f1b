"""A run's options, declared once: the engine's `RunConfig`, the CLI's `run` flags and the flows' parameters.

Each option is a field of `RunConfig` whose metadata (`option(...)`) holds its help text, bounds, choices
and CLI spelling. `qwen_batch.cli` builds `qwen-batch run`'s flags from it and `flows/parameters.py` the
flows' parameters (their types, limits and the descriptions the Prefect UI shows); the engine reads the
config itself. So adding an option is one field here, and a test (tests/test_run_options.py) fails when a
flag or a flow parameter stops matching its field.

Values are what a user writes (a shard is `K/N`, S3 settings are four options); what the engine needs
from them (`shard_index`, `storage_options`) is derived below, never declared a second time.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from qwen_batch.adapters.loras import MAX_LORAS_PER_ROW, LoraRef, parse_lora_option
from qwen_batch.errors import ConfigError
from qwen_batch.families import EDIT, GENERATE
from qwen_batch.io.input_images import DEFAULT_MAX_PIXELS
from qwen_batch.io.storage import StorageOptions, s3_storage_options
from qwen_batch.manifest import MAX_SCHEDULER_SHIFT, MIN_SCHEDULER_SHIFT, RowDefaults
from qwen_batch.memory.device import DTYPES
from qwen_batch.memory.modes import AUTO, MEMORY_MODES
from qwen_batch.outputs.images import IMAGE_FORMATS
from qwen_batch.outputs.shards import DEFAULT_ROWS_PER_SHARD, FILES, OUTPUT_FORMATS
from qwen_batch.pipeline.step_cache.spec import normalized as normalized_step_cache
from qwen_batch.weights.model_source import TINY_MODEL_NAME

DEFAULT_MODEL = TINY_MODEL_NAME
# The flows' defaults where the engine has none: the demo (eight rows that show the features in under a minute
# on a laptop CPU; prompts/example.parquet is the one for real use).
DEMO_MANIFEST = "prompts/demo.parquet"
DEMO_OUTPUT = "out/demo"
TASKS = (AUTO, GENERATE, EDIT)  # auto: edit when the manifest has an 'image' or 'images' column
COMPILE_CHOICES = (AUTO, "on", "off")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
SHARD_PATTERN = r"^\d+/\d+$"
MAX_BATCH_SIZE = 64
MAX_ENCODE_BATCH_SIZE = 256

# Argument groups of `qwen-batch run --help`, in this order after the ungrouped options.
SAMPLING = "Adapters and sampling"
MEMORY = "GPU memory and speed"
S3 = "S3 and S3-compatible storage"
OUTPUTS = "Output format and marks"
GROUP_HELP = {
    OUTPUTS: "How images are stored (files or WebDataset / Parquet shards, PNG / WebP / JPEG) and marked as "
    "AI-generated (IPTC XMP always; C2PA content credentials when given a certificate). docs/outputs.md.",
    SAMPLING: "Run-wide values for the rows whose 'loras', 'scheduler_shift' or 'step_cache' column is empty "
    "(docs/manifest.md).",
    MEMORY: "See `qwen-batch plan` and docs/memory.md.",
    S3: "Unset options come from AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION and ~/.aws, as for the AWS CLI. "
    "Credentials are never printed, written to results or stored as flow parameters.",
}
OPTION = "qwen_batch.option"  # the metadata key of a field that is a run option


@dataclass(frozen=True)
class Option:
    """How one run option is shown and checked, wherever it is set."""

    help: str  # the CLI's help and the flow parameter's description
    flag: str | None = None  # the CLI's flag; default --name-with-dashes; "" for a positional argument
    short: str | None = None  # e.g. "-o"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive minimum
    pattern: str | None = None  # a full match, for strings
    max_items: int | None = None  # for repeatable options
    group: str | None = None  # the CLI's argument group
    parse: Callable[[str], Any] | None = None  # the CLI's text to the value (one item of a repeatable option)
    check: Callable[[Any], Any] | None = None  # normalizes the value or raises ValueError with the fix
    flow: bool = True  # a flow parameter too (False: the CLI only)
    flow_default: Any = None  # the flow's default where the engine has none (manifest, output)

    def cli_flag(self, name: str) -> str:
        return self.flag if self.flag is not None else "--" + name.replace("_", "-")


def option(default: Any = MISSING, help: str = "", **how: Any) -> Any:
    """A `RunConfig` field that is a run option: its default and how it is shown and checked."""
    metadata = {OPTION: Option(help=" ".join(help.split()), **how)}
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything a run is told: the options, checked as they are set (a `ConfigError` names the fix)."""

    manifest: str = option(
        help="Parquet manifest of prompts, one row per image: a path or a URL such as s3://bucket/prompts.parquet "
        "(any fsspec URL). Columns: docs/manifest.md.",
        flag="",
        metavar="MANIFEST",
        pattern=r".+",
        flow_default=DEMO_MANIFEST,
    )
    output: str = option(
        help="Output folder, a path or URL: the images (images/ID.png) and results.parquet go here. Running again "
        "over the same folder resumes: finished rows are skipped, changed rows generated again.",
        short="-o",
        metavar="OUT",
        pattern=r".+",
        flow_default=DEMO_OUTPUT,
    )
    model: str = option(
        DEFAULT_MODEL,
        help="A hub id (Qwen/Qwen-Image, downloaded once), a local diffusers folder, or a tiny model: random weights "
        "for trying the pipeline (its images are noise): 'tiny' (Qwen-Image; tiny-edit, tiny-edit-plus), 'tiny-2.1' "
        "or 'tiny-2.1-turbo' (Qwen-Image-2.1). Its family and checkpoint decide the rows' rules.",
        metavar="M",
        pattern=r".+",
    )
    transformer: str | None = option(
        None,
        help="Take the transformer from one file (a path or URL) instead of the model's own: safetensors in bf16 "
        "or fp8 e4m3fn (ComfyUI's qwen_image_fp8_e4m3fn.safetensors) or GGUF (Q8_0 ... Q3_K_M); the text "
        "encoder, VAE and the transformer's config still come from the model (docs/memory.md).",
        metavar="FILE",
    )
    controlnet: str | None = option(
        None,
        help="The ControlNet of rows with a control_image column: a hub id (InstantX/Qwen-Image-ControlNet-Union), a "
        "folder, or 'tiny' (random weights, for the tiny model); checked against the transformer before anything "
        "loads. Without it, rows with control images are reported invalid and the others run (docs/conditions.md).",
        metavar="MODEL",
    )
    batch_size: int | None = option(
        None,
        help="Images per transformer batch; default: the memory plan's for this GPU (4 when the model is resident, "
        "more when weights stream from host RAM, so each copy serves more images).",
        metavar="N",
        minimum=1,
        maximum=MAX_BATCH_SIZE,
    )
    encode_batch_size: int = option(
        16, help="Prompts per text-encoder batch.", metavar="N", minimum=1, maximum=MAX_ENCODE_BATCH_SIZE
    )
    device: str = option(
        AUTO,
        help="auto (the GPU when there is one), cuda, cuda:N or cpu. Give each worker its GPU with "
        "CUDA_VISIBLE_DEVICES rather than choosing one here.",
        pattern=DEVICE_PATTERN,
    )
    dtype: str = option(
        AUTO, help="auto: bf16 on a GPU, fp32 on the CPU (fp16 overflows in Qwen-Image).", choices=DTYPES
    )
    cache: str | None = option(
        None,
        help="Embedding cache folder (path or URL) to share between runs and manifests; default: OUT/cache.",
        metavar="URI",
    )
    shard: str = option(
        "0/1",
        help="Generate only shard K of N ('K/N'): the rows dealt to K by predicted GPU time, so shards finish "
        "together (e.g. one per GPU). A shard leaves its results as part files; a run with 0/1 (or the fan-out) "
        "merges them.",
        metavar="K/N",
        pattern=SHARD_PATTERN,
    )
    task: str = option(
        AUTO,
        help="generate (text to image) or edit (an input image per row, Qwen-Image-Edit); auto: edit when the "
        "manifest has an 'image' or 'images' column.",
        choices=TASKS,
    )
    allow_inputs: tuple[str, ...] = option(
        (),
        help="Also read input images (edits, init, mask and control images) under these folders or URL prefixes "
        "(s3://bucket/inputs/); by default only the manifest's own folder is allowed.",
        metavar="PREFIX",
    )
    max_input_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="Input images with more pixels than this are refused (decompression bombs).",
        metavar="N",
        minimum=1,
    )
    loras: tuple[LoraRef, ...] = option(
        (),
        help="LoRA adapters fused for the rows whose 'loras' column is empty: PATH[:SCALE] on the command line "
        "(repeatable), {path, scale} in a flow; a .safetensors path or URL with diffusers, kohya, ComfyUI or "
        "DiffSynth keys, scale 1.0 by default. E.g. a Lightning LoRA with scheduler_shift 3 for 8-step rows.",
        flag="--lora",
        metavar="PATH[:SCALE]",
        max_items=MAX_LORAS_PER_ROW,
        parse=parse_lora_option,
        group=SAMPLING,
    )
    scheduler_shift: float | None = option(
        None,
        help="Sample with this fixed shift instead of the model's size-dependent one, for the rows whose "
        "'scheduler_shift' column is empty; 3 for the Lightning LoRAs (with true_cfg_scale 1 and 8 or 4 steps).",
        metavar="S",
        above=MIN_SCHEDULER_SHIFT,
        maximum=MAX_SCHEDULER_SHIFT,
        group=SAMPLING,
    )
    step_cache: str | None = option(
        None,
        help="Step caching for the rows whose 'step_cache' column is empty, decided row by row: none (default), "
        "first-block:T[,warmup=N] (diffusers' FirstBlockCache, e.g. first-block:0.1: 0.05-0.2 is what users of the "
        "real model report; warmup=N: the first N steps always compute) or taylorseer[:interval=5,warmup=3,order=1]. "
        "Faster 50-step rows, lossy: judge the images (docs/step-cache.md).",
        metavar="SPEC",
        check=normalized_step_cache,
        group=SAMPLING,
    )
    memory_mode: str = option(
        AUTO,
        help="auto: the plan for this GPU and host RAM (qwen-batch plan); bf16 resident; fp8: linears in float8; "
        "gguf: a GGUF transformer file resident; offload: weights streamed from host RAM in large batches (pinned as "
        "far as the RAM allows, the rest read from disk); fp8-offload: the same with fp8 weights, half the bytes; "
        "sequential: last resort (docs/memory.md).",
        choices=MEMORY_MODES,
        group=MEMORY,
    )
    fp8_every_linear: bool = option(
        False,
        help="When the mode is fp8: the image MLP's last linear in fp8 too, which fp8 otherwise keeps in bf16 for "
        "quality (1.94x the diffusers recipe on an H200 against 1.76x). Check the images first (docs/memory.md).",
        group=MEMORY,
    )
    compile: str = option(
        AUTO,
        help="torch.compile the transformer blocks: auto when resident on a GPU with 8 or more images to make, "
        "on, or off.",
        choices=COMPILE_CHOICES,
        group=MEMORY,
    )
    compile_cache: str | None = option(
        None,
        help="Compiled kernels are kept here for the next run; default: $TORCHINDUCTOR_CACHE_DIR, else "
        "$QWEN_BATCH_HOME/compile-cache.",
        metavar="DIR",
        group=MEMORY,
    )
    output_format: str = option(
        FILES,
        help="files: one image file per row under images/. webdataset: shards/NNNNN.tar (KEY.png|webp|jpg, KEY.json, "
        "KEY.txt per row) with a Parquet index and stats beside each. parquet: data/NNNNN.parquet with the image in "
        "the Hugging Face datasets Image layout, and a dataset card. A shard is published whole, never partly.",
        choices=OUTPUT_FORMATS,
        group=OUTPUTS,
    )
    shard_size: int = option(
        DEFAULT_ROWS_PER_SHARD,
        help="Rows per shard (webdataset, parquet); a shard also closes before 500 MB, the size the Hub and datasets "
        "use. A run (or a flow's denoise chunk) publishes its last shard partly filled.",
        metavar="N",
        minimum=1,
        maximum=100_000,
        group=OUTPUTS,
    )
    image_format: str = option(
        "png",
        help="png (lossless), webp or jpeg. The generation parameters go into each format's metadata; jpeg cannot "
        "keep the alpha channel of RGBA models (Qwen-Image-2.1) and is refused for them.",
        choices=IMAGE_FORMATS,
        group=OUTPUTS,
    )
    image_quality: int | None = option(
        None,
        help="Quality of webp and jpeg, 1-100; default 90 for webp, 95 for jpeg. png ignores it.",
        metavar="Q",
        minimum=1,
        maximum=100,
        group=OUTPUTS,
    )
    c2pa_cert: str | None = option(
        None,
        help="Sign every image with C2PA content credentials: a PEM file with the signing certificate first, then "
        "the CA certificates that issued it. Needs --c2pa-key. Checked before any model loads.",
        metavar="PEM",
        group=OUTPUTS,
    )
    c2pa_key: str | None = option(
        None,
        help="The private key (PEM file) of --c2pa-cert's certificate. Only its path is kept: the key never appears "
        "in results, logs, image metadata or Prefect artifacts.",
        metavar="PEM",
        group=OUTPUTS,
    )
    s3_endpoint_url: str | None = option(
        None,
        help="An S3-compatible endpoint, e.g. http://minio:9000 or an R2 endpoint; default: AWS_ENDPOINT_URL, else AWS.",
        metavar="URL",
        group=S3,
    )
    s3_region: str | None = option(
        None, help="The S3 region; default: AWS_REGION or the profile's.", metavar="REGION", group=S3
    )
    s3_profile: str | None = option(
        None, help="A profile of ~/.aws/config; default: AWS_PROFILE.", metavar="NAME", group=S3
    )
    s3_anonymous: bool = option(False, help="Use S3 without credentials (public buckets).", group=S3)
    # Not an option: fsspec's options by protocol, from the s3_* options unless given (tests pass credentials
    # for a local S3 server). Never a flow parameter: the server would store and show the credentials.
    storage_options: StorageOptions | None = None
    # Not an option: C2PA credentials made by the caller (the flow, from Prefect Secret blocks) instead of files.
    content_credentials: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, how in run_options():
            setattr(self, name, checked(name, how, getattr(self, name)))
        if self.storage_options is None:
            self.storage_options = s3_storage_options(
                self.s3_endpoint_url, self.s3_region, self.s3_profile, self.s3_anonymous
            )
        index, count = self.shard_numbers
        if not 0 <= index < count:
            raise ConfigError(f"--shard {self.shard}: K must be from 0 to N - 1 (e.g. 0/2 and 1/2)")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ConfigError("--c2pa-cert and --c2pa-key go together: give both, or neither to write no C2PA")
        self.row_defaults = RowDefaults(self.loras, self.scheduler_shift, self.step_cache)  # checks them

    @property
    def shard_numbers(self) -> tuple[int, int]:
        index, count = self.shard.split("/")
        return int(index), int(count)

    @property
    def shard_index(self) -> int:
        return self.shard_numbers[0]

    @property
    def shard_count(self) -> int:
        return self.shard_numbers[1]

    @property
    def is_shard(self) -> bool:
        return self.shard_count > 1

    @property
    def manifest_task(self) -> str | None:
        """The task the manifest is read as; None: from its columns."""
        return None if self.task == AUTO else self.task


def run_options() -> Iterator[tuple[str, Option]]:
    """Every run option, in declaration order: its name (the field's, the flow parameter's) and how."""
    for declared in fields(RunConfig):
        if OPTION in declared.metadata:
            yield declared.name, declared.metadata[OPTION]


def option_types() -> dict[str, Any]:
    """Each option's type, resolved from its annotation (the module uses postponed annotations)."""
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name, _ in run_options()}


def option_default(name: str) -> Any:
    """The engine's default of option `name` (MISSING for the required ones)."""
    return next(declared.default for declared in fields(RunConfig) if declared.name == name)


def checked(name: str, how: Option, value: Any) -> Any:
    """`value` of option `name` within its bounds, normalized; a ConfigError that names the flag and the fix."""
    if value is None:
        return None
    flag = how.cli_flag(name) or name.upper()
    if isinstance(value, list):
        value = tuple(value)
    if how.choices is not None and value not in how.choices:
        raise ConfigError(f"{flag} {value!r}: use one of {', '.join(how.choices)} ({how.help})")
    if how.pattern is not None and not (isinstance(value, str) and re.fullmatch(how.pattern, value)):
        raise ConfigError(f"{flag} {value!r}: {_pattern_hint(how)}")
    if how.minimum is not None and value < how.minimum:
        raise ConfigError(f"{flag} {value} is out of range: use {how.minimum:g} or more")
    if how.maximum is not None and value > how.maximum:
        raise ConfigError(f"{flag} {value} is out of range: use {how.maximum:g} or less")
    if how.above is not None and value <= how.above:
        raise ConfigError(f"{flag} {value} is out of range: use more than {how.above:g}")
    if how.max_items is not None and len(value) > how.max_items:
        raise ConfigError(f"{flag}: {len(value)} given, at most {how.max_items}")
    if how.check is not None:
        try:
            value = how.check(value)
        except ValueError as error:
            raise ConfigError(f"{flag} {error}") from None
    return value


def _pattern_hint(how: Option) -> str:
    if how.metavar:
        return f"write it as {how.metavar}"
    return f"it must match {how.pattern}"
