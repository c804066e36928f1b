"""The prompt manifest: its schema, how it is read, and how each row is validated.

Two kinds of problem, two outcomes:
- manifest-level (unreadable file, missing or mistyped column, duplicate ids): `ManifestError`, raised
  before any model loads and before anything is written;
- row-level (empty prompt, size out of range, steps out of range...): that row becomes an
  `InvalidRow` with a reason, and every other row runs.

Rows are counted from 0, as pandas and pyarrow count them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from qwen_batch.adapters.loras import DEFAULT_LORA_SCALE, MAX_LORAS_PER_ROW, LoraRef, check_scale
from qwen_batch.errors import ConfigError, ManifestError, StorageError
from qwen_batch.families import EDIT, GENERATE, RowRules, default_family
from qwen_batch.io.input_urls import InputLocationError, InputPolicy
from qwen_batch.io.parquet import read_parquet
from qwen_batch.io.storage import read_url
from qwen_batch.pipeline.step_cache.spec import StepCacheError, normalized

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_NEGATIVE_PROMPT = " "  # a blank negative prompt still turns true CFG on, as the model card does
# Sizes, steps and the default guidance are the model family's (`RowRules`); these bounds are everyone's.
MIN_TRUE_CFG_SCALE, MAX_TRUE_CFG_SCALE = 0.0, 50.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A fixed sampling shift (Lightning's recipe is 3): sigma' = s * sigma / (1 + (s - 1) * sigma).
MIN_SCHEDULER_SHIFT, MAX_SCHEDULER_SHIFT = 0.0, 100.0  # exclusive, inclusive
LORAS_COLUMN = "loras"
LORA_STRUCT = pa.struct([pa.field("path", pa.string()), pa.field("scale", pa.float64())])

# The columns qwen-batch understands; any other column is carried unchanged into the results.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("negative_prompt", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("seed", pa.int64()),
        pa.field("num_inference_steps", pa.int64()),
        pa.field("true_cfg_scale", pa.float64()),
        pa.field(LORAS_COLUMN, pa.list_(LORA_STRUCT)),  # [{path, scale}]; see docs/manifest.md
        pa.field("scheduler_shift", pa.float64()),
        pa.field("init_image", pa.string()),  # image-to-image and inpainting (INIT_IMAGE_COLUMN...)
        pa.field("mask_image", pa.string()),
        pa.field("strength", pa.float64()),
        pa.field("mask_crop_padding", pa.int64()),
        # ControlNet rows: one image may also be a plain string, one scale a plain number (CONTROL_COLUMNS).
        pa.field("control_image", pa.list_(pa.string())),
        pa.field("control_scale", pa.list_(pa.float64())),
        pa.field("control_start", pa.float64()),
        pa.field("control_end", pa.float64()),
        pa.field("control_preprocess", pa.string()),
        pa.field("step_cache", pa.string()),  # STEP_CACHE_COLUMN
    ]
)
# Edit manifests name their input image(s) in one of these columns instead (see docs/manifest.md).
IMAGE_COLUMN, IMAGES_COLUMN = "image", "images"
# Image-to-image and inpainting (text-to-image manifests): the image a row starts from, the mask of what to
# repaint (white) and how much of the schedule runs (strength, diffusers' default 0.6). See docs/conditions.md.
INIT_IMAGE_COLUMN, MASK_IMAGE_COLUMN, STRENGTH_COLUMN = "init_image", "mask_image", "strength"
DEFAULT_STRENGTH = 0.6
# ControlNet rows (the run's --controlnet): one or more control images, each with its scale, applied from
# control_start to control_end of the schedule (fractions); control_preprocess turns a photo into one.
CONTROL_IMAGE_COLUMN, CONTROL_SCALE_COLUMN = "control_image", "control_scale"
CONTROL_START_COLUMN, CONTROL_END_COLUMN, CONTROL_PREPROCESS_COLUMN = (
    "control_start",
    "control_end",
    "control_preprocess",
)
CONTROL_COLUMNS = (CONTROL_IMAGE_COLUMN, CONTROL_SCALE_COLUMN, CONTROL_START_COLUMN, CONTROL_END_COLUMN,
                   CONTROL_PREPROCESS_COLUMN)  # fmt: skip
MAX_CONTROL_IMAGES = 4
# Step caching per row (qwen_batch.pipeline.step_cache, docs/step-cache.md): none, first-block:T[,warmup=N] or
# taylorseer[:...].
STEP_CACHE_COLUMN = "step_cache"
# The columns of rows that bring more than text (image-to-image, inpainting, ControlNet).
CONDITION_COLUMNS = (INIT_IMAGE_COLUMN, MASK_IMAGE_COLUMN, STRENGTH_COLUMN, "mask_crop_padding", *CONTROL_COLUMNS)
MAX_INPUT_IMAGES = 8
TASKS = (GENERATE, EDIT)  # what a manifest is; edit-plus is a kind of edit model, not of manifest
REQUIRED_COLUMNS = ("id", "prompt")
TEXT_COLUMNS = (
    "id",
    "prompt",
    "negative_prompt",
    INIT_IMAGE_COLUMN,
    MASK_IMAGE_COLUMN,
    "control_preprocess",
    STEP_CACHE_COLUMN,
)
INTEGER_COLUMNS = ("width", "height", "seed", "num_inference_steps", "mask_crop_padding")
FLOAT_COLUMNS = ("true_cfg_scale", "scheduler_shift", STRENGTH_COLUMN, "control_start", "control_end")
# Columns the results add; a manifest may not bring its own, or the two would be confused.
RESERVED_COLUMNS = (
    "status",
    "image",
    "error",
    "model",
    "sha256",
    "fingerprint",
    "seconds",
    "finished_at",
    "warning",
)


def detect_task(column_names: list[str]) -> str:
    """Edit when the manifest names input images, generate otherwise."""
    return EDIT if IMAGE_COLUMN in column_names or IMAGES_COLUMN in column_names else GENERATE


def derive_seed(row_id: str) -> int:
    """A stable seed for a row that has none: the same id always gets the same seed."""
    digest = hashlib.sha256(b"qwen-batch/seed/" + row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & INT64_MAX


@dataclass(frozen=True, slots=True)
class ControlRef:
    """One control image of a row: its canonical URL, its scale, and the preprocessing that makes it."""

    url: str
    scale: float = 1.0
    preprocess: str | None = None  # e.g. "canny": the image is a photo, turned into the control in stage 1


@dataclass(frozen=True, slots=True)
class Request:
    """One valid manifest row: everything needed to generate its image."""

    index: int
    id: str
    prompt: str
    negative_prompt: str
    # None only for an edit row that leaves the size to its input image (resolved in stage 2).
    width: int | None
    height: int | None
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    images: tuple[str, ...] = ()  # edit rows: the input images' canonical URLs
    loras: tuple[LoraRef, ...] = ()  # adapters fused for this row, with their scales (and file hashes)
    scheduler_shift: float | None = None  # a fixed sampling shift; None: the model's own schedule
    init_image: str | None = None  # image-to-image / inpainting: the canonical URL of the starting image
    mask_image: str | None = None  # inpainting: what to repaint (white), the init image's size
    strength: float | None = None  # with init_image: the part of the schedule that runs (0-1]
    # Inpainting: work on the mask's bounding box plus this margin (pixels), pasted back into the init image.
    mask_crop_padding: int | None = None
    controls: tuple[ControlRef, ...] = ()  # ControlNet rows: the control images, in order, with their scales
    control_range: tuple[float, float] = (0.0, 1.0)  # the part of the schedule the ControlNet acts on
    step_cache: str | None = None  # the normalized step-cache spec (qwen_batch.pipeline.step_cache.spec); None: none

    @property
    def starts_from_image(self) -> bool:
        return self.init_image is not None

    @property
    def task(self) -> str:
        return EDIT if self.images else GENERATE

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Rows sharing this key can share a batch: same latent shape, same schedule, same guidance, and
        the same adapters and sampling shift (what is applied to the model before the batch runs)."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.true_cfg_scale,
            self.loras,
            self.scheduler_shift,
            # A batch starts at one point of its schedule, and blends masks or not, for every row.
            self.strength,
            self.mask_image is not None,
            len(self.controls),  # the ControlNet runs once per control image and step, on every row
            # A batch's rows share their step cache: a batch without one runs the plain loop, and a TaylorSeer
            # step runs for every row or none (first-block decides row by row within its batch).
            self.step_cache,
        )

    @property
    def input_urls(self) -> tuple[str, ...]:
        """Every image the row reads: edit inputs, init image, mask, control images."""
        starts = tuple(url for url in (self.init_image, self.mask_image) if url)
        return (*self.images, *starts, *(control.url for control in self.controls))

    @property
    def texts(self) -> tuple[str, ...]:
        """The texts the encoder must see for this row."""
        return (self.prompt, self.negative_prompt) if self.uses_cfg else (self.prompt,)

    def parameters(self) -> dict[str, Any]:
        parameters = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "true_cfg_scale": self.true_cfg_scale,
        }
        # Only when used: the fingerprints of rows without them stay what they were.
        if self.images:
            parameters["images"] = list(self.images)
        if self.loras:
            parameters[LORAS_COLUMN] = [ref.parameters() for ref in self.loras]
        if self.scheduler_shift is not None:
            parameters["scheduler_shift"] = self.scheduler_shift
        if self.init_image is not None:
            parameters.update(init_image=self.init_image, strength=self.strength)
        if self.mask_image is not None:
            parameters["mask_image"] = self.mask_image
        if self.mask_crop_padding is not None:
            parameters["mask_crop_padding"] = self.mask_crop_padding
        if self.controls:
            parameters[CONTROL_IMAGE_COLUMN] = [control.url for control in self.controls]
            parameters[CONTROL_SCALE_COLUMN] = [control.scale for control in self.controls]
            parameters[CONTROL_START_COLUMN], parameters[CONTROL_END_COLUMN] = self.control_range
            preprocess = {control.preprocess for control in self.controls} - {None}
            if preprocess:
                parameters[CONTROL_PREPROCESS_COLUMN] = self.controls[0].preprocess
        if self.step_cache is not None:
            parameters[STEP_CACHE_COLUMN] = self.step_cache
        return parameters


def check_scheduler_shift(shift: float, label: str = "scheduler_shift") -> float:
    shift = float(shift)
    if not (math.isfinite(shift) and MIN_SCHEDULER_SHIFT < shift <= MAX_SCHEDULER_SHIFT):
        raise ValueError(
            f"{label} {shift} is out of range: use a number above {MIN_SCHEDULER_SHIFT:g} and at most "
            f"{MAX_SCHEDULER_SHIFT:g} (3 is the Lightning recipe's)"
        )
    return shift


@dataclass(frozen=True)
class RowDefaults:
    """Run-wide values (--lora, --scheduler-shift, --step-cache) for rows that leave those columns empty."""

    loras: tuple[LoraRef, ...] = ()
    scheduler_shift: float | None = None
    step_cache: str | None = None  # normalized by __post_init__ (None: none)

    def __post_init__(self) -> None:
        if len(self.loras) > MAX_LORAS_PER_ROW:
            raise ConfigError(f"{len(self.loras)} --lora options: use at most {MAX_LORAS_PER_ROW}")
        if self.scheduler_shift is not None:
            try:
                check_scheduler_shift(self.scheduler_shift, "--scheduler-shift")
            except ValueError as error:
                raise ConfigError(str(error)) from None
        try:
            object.__setattr__(self, "step_cache", normalized(self.step_cache))
        except StepCacheError as error:
            raise ConfigError(f"--step-cache {error}") from None


@dataclass(frozen=True, slots=True)
class InvalidRow:
    index: int
    id: str | None
    reason: str
    # What could be resolved despite the problem, so results still show it.
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    url: str
    table: pa.Table
    requests: list[Request]
    invalid: list[InvalidRow]
    task: str = GENERATE
    # Its image columns hold condition images of text-to-image rows (Qwen-Image-2.1), not an edit's inputs.
    condition_images: bool = False

    def invalidated(self, reasons: dict[str, str]) -> Manifest:
        """This manifest with the rows named in `reasons` (by id) turned invalid with their reason: what a run
        finds only once it knows the model (a family's refusals, an adapter or ControlNet that cannot be used)."""
        if not reasons:
            return self
        invalid = list(self.invalid) + [
            InvalidRow(r.index, r.id, reasons[r.id], r.parameters()) for r in self.requests if r.id in reasons
        ]
        requests = [request for request in self.requests if request.id not in reasons]
        return replace(self, requests=requests, invalid=sorted(invalid, key=lambda row: row.index))

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def extra_columns(self) -> list[str]:
        # An edit manifest's input columns reach the results as `input_images`, not as extras:
        # `image` there is the output's path.
        known = set(MANIFEST_SCHEMA.names) | ({IMAGE_COLUMN, IMAGES_COLUMN} if self.task == EDIT else set())
        return [name for name in self.table.column_names if name not in known]

    def report(self) -> str:
        """The human-readable validation report that `qwen-batch validate` prints."""
        kind = "text-to-image (with condition images)" if self.condition_images else self.task
        lines = [
            f"{self.url}: {kind} manifest, {self.num_rows} rows, {len(self.requests)} valid, {len(self.invalid)} invalid",
        ]
        if self.extra_columns:
            lines.append(f"  extra columns carried into results: {', '.join(self.extra_columns)}")
        for row in self.invalid:
            label = f"id {row.id!r}" if row.id is not None else "no id"
            lines.append(f"  row {row.index} ({label}): {row.reason}")
        return "\n".join(lines)


def read_manifest(
    url: str,
    storage_options: dict[str, Any] | None = None,
    task: str | None = None,
    allowed_inputs: tuple[str, ...] = (),
    defaults: RowDefaults | None = None,
    family_rules: RowRules | None = None,
) -> Manifest:
    """Read and validate a Parquet manifest from any fsspec URL. Raises `ManifestError`.

    `task` (generate or edit) defaults to what the columns say; `allowed_inputs` are the prefixes
    besides the manifest's folder that an edit row's input images and any row's adapters may come
    from; `defaults` fill the rows that name no adapters or sampling shift; `family_rules` are the model
    family's sizes, steps and guidance (Qwen-Image's when no model is named yet).
    """
    try:
        data = read_url(url, storage_options)
    except StorageError as error:
        raise ManifestError(f"cannot read the manifest: {error}") from error
    try:
        table = read_parquet(data)
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(
            f"{url}: not a readable Parquet file ({error}). Write the manifest with "
            "pandas.DataFrame.to_parquet or pyarrow.parquet.write_table."
        ) from error
    return validate_table(table, url, task, allowed_inputs, defaults, family_rules)


def validate_table(
    table: pa.Table,
    url: str = "<table>",
    task: str | None = None,
    allowed_inputs: tuple[str, ...] = (),
    defaults: RowDefaults | None = None,
    family_rules: RowRules | None = None,
) -> Manifest:
    task = _check_task(table, url, task)
    _check_columns(table, url, task)
    _check_encoding(table, url)
    wanted = MANIFEST_SCHEMA.names + ([IMAGE_COLUMN, IMAGES_COLUMN] if task == EDIT else [])
    columns = {name: table.column(name).to_pylist() for name in wanted if name in table.column_names}
    _check_unique_ids(columns["id"], url)
    try:
        policy = InputPolicy.for_manifest(url, allowed_inputs)
    except InputLocationError as error:
        raise ManifestError(f"--allow-inputs: {error}") from error
    rules = _RowRules(policy, task == EDIT, defaults or RowDefaults(), family_rules or default_family().rows)

    requests: list[Request] = []
    invalid: list[InvalidRow] = []
    for index in range(table.num_rows):
        values = {name: column[index] for name, column in columns.items()}
        outcome = _validate_row(index, values, rules)
        (requests if isinstance(outcome, Request) else invalid).append(outcome)
    conditions = task == EDIT and rules.family.max_condition_images > 0
    return Manifest(url=url, table=table, requests=requests, invalid=invalid, task=task, condition_images=conditions)


def _check_task(table: pa.Table, url: str, task: str | None) -> str:
    names = table.column_names
    detected = detect_task(names)
    if task is None:
        task = detected
    if task not in TASKS:
        raise ManifestError(f"task {task!r} is unknown: use {' or '.join(TASKS)}")
    if task == EDIT:
        if IMAGE_COLUMN in names and IMAGES_COLUMN in names:
            raise ManifestError(
                f"{url}: has both {IMAGE_COLUMN!r} and {IMAGES_COLUMN!r} columns; an edit manifest uses "
                f"{IMAGE_COLUMN!r} (one input image per row) or {IMAGES_COLUMN!r} (a list per row), not both."
            )
        if detected != EDIT:
            raise ManifestError(
                f"{url}: --task edit needs a column {IMAGE_COLUMN!r} (the input image of each row) or "
                f"{IMAGES_COLUMN!r} (a list of input images); found {names}."
            )
    return task


def _check_columns(table: pa.Table, url: str, task: str = GENERATE) -> None:
    names = table.column_names
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ManifestError(
            f"{url}: missing required column(s) {', '.join(map(repr, missing))}; found {names}. "
            "Every manifest needs a unique string 'id' and a 'prompt' per row."
        )
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ManifestError(f"{url}: column(s) {duplicated} appear more than once; keep one of each.")
    reserved = [name for name in names if name in RESERVED_COLUMNS and not (task == EDIT and name == IMAGE_COLUMN)]
    if reserved:
        hint = " (or pass --task edit if 'image' holds input images)" if IMAGE_COLUMN in reserved else ""
        raise ManifestError(
            f"{url}: column(s) {reserved} are written by qwen-batch into the results; rename them in the "
            f"manifest{hint}."
        )
    if task == EDIT:
        _check_image_columns(table, url)
    if LORAS_COLUMN in names:
        _check_loras_column(table, url)
    _check_one_or_list(table, url, "control_image", pa.types.is_string, "a string or a list of strings (URLs or paths)")
    _check_one_or_list(table, url, "control_scale", _is_number, "a number or a list of numbers (one per control image)")
    for name in names:
        kind = table.schema.field(name).type
        optional_nulls = pa.types.is_null(kind) and name not in REQUIRED_COLUMNS  # pandas: a column of None
        if name in TEXT_COLUMNS and not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or optional_nulls):
            expected = "string"
        elif name in INTEGER_COLUMNS + FLOAT_COLUMNS and not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)
        ):
            expected = "integer" if name in INTEGER_COLUMNS else "number"
        else:
            continue
        raise ManifestError(f"{url}: column {name!r} has type {kind}; it must be {expected}.")


def _check_encoding(table: pa.Table, url: str) -> None:
    """Parquet writers do not check that text is UTF-8, and Python cannot read text that is not."""
    for name in table.column_names:
        column = table.column(name)
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as error:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                rows = [
                    index
                    for index, value in enumerate(column.cast(pa.large_binary()).to_pylist())
                    if value is not None and not _is_utf8(value)
                ]
                raise ManifestError(
                    f"{url}: column {name!r} is not valid UTF-8 text at row(s) {', '.join(map(str, rows[:10]))}; "
                    "write its text as UTF-8 (pandas and pyarrow do when given str values, not bytes)."
                ) from error
            raise ManifestError(
                f"{url}: column {name!r} holds invalid data ({error}); write the manifest again with pandas or pyarrow."
            ) from error


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_image_columns(table: pa.Table, url: str) -> None:
    names = table.column_names
    if IMAGE_COLUMN in names:
        kind = table.schema.field(IMAGE_COLUMN).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ManifestError(f"{url}: column {IMAGE_COLUMN!r} has type {kind}; it must be string (a URL or path).")
    if IMAGES_COLUMN in names:
        kind = table.schema.field(IMAGES_COLUMN).type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if not (is_list and (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))):
            raise ManifestError(
                f"{url}: column {IMAGES_COLUMN!r} has type {kind}; it must be a list of strings (URLs or paths)."
            )


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _check_one_or_list(table: pa.Table, url: str, name: str, is_item, expected: str) -> None:
    """A column of single values or of lists of them (`control_image`: a string or a list of strings)."""
    if name not in table.column_names:
        return
    kind = table.schema.field(name).type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    if pa.types.is_large_string(kind):
        kind = pa.string()
    if not (is_item(kind) or pa.types.is_null(kind)):
        raise ManifestError(f"{url}: column {name!r} has type {table.schema.field(name).type}; it must be {expected}.")


def _check_loras_column(table: pa.Table, url: str) -> None:
    kind = table.schema.field(LORAS_COLUMN).type
    if not _is_lora_list(kind):
        raise ManifestError(
            f"{url}: column {LORAS_COLUMN!r} has type {kind}; it must be a list of structs {{path: string, scale: "
            "number} per row, as pandas writes [{'path': 'style.safetensors', 'scale': 0.8}]."
        )


def _is_lora_list(kind: pa.DataType) -> bool:
    """list<struct<path: string, scale: number>>, or what pyarrow infers when every value is null or empty."""
    types = pa.types
    if types.is_null(kind):
        return True
    if not (types.is_list(kind) or types.is_large_list(kind)):
        return False
    item = kind.value_type
    if types.is_null(item):
        return True
    if not types.is_struct(item):
        return False
    fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    path, scale = fields.get("path", pa.null()), fields.get("scale", pa.null())
    return (
        set(fields) <= {"path", "scale"}
        and (types.is_string(path) or types.is_large_string(path) or types.is_null(path))
        and (types.is_integer(scale) or types.is_floating(scale) or types.is_null(scale))
    )


def _check_unique_ids(ids: list[str | None], url: str) -> None:
    rows_by_id: dict[str, list[int]] = defaultdict(list)
    for index, row_id in enumerate(ids):
        if row_id is not None:
            rows_by_id[row_id].append(index)
    duplicates = {row_id: rows for row_id, rows in rows_by_id.items() if len(rows) > 1}
    if duplicates:
        shown = "; ".join(
            f"{row_id!r} at rows {', '.join(map(str, rows))}" for row_id, rows in list(duplicates.items())[:10]
        )
        more = f" (and {len(duplicates) - 10} more)" if len(duplicates) > 10 else ""
        raise ManifestError(
            f"{url}: column 'id' has {len(duplicates)} duplicated value(s): {shown}{more}. "
            "Ids name the output files, so each must be unique."
        )


class _RowProblem(Exception):
    pass


@dataclass(frozen=True)
class _RowRules:
    policy: InputPolicy  # where input images and adapters may come from
    edit: bool
    defaults: RowDefaults
    family: RowRules  # the model family's sizes, steps and guidance

    @property
    def edits(self) -> bool:
        """The rows are an edit model's (their images are what they edit), not condition images of a
        text-to-image row (Qwen-Image-2.1), which leave image starts and controls to the family to refuse."""
        return self.edit and not self.family.max_condition_images


def _validate_row(index: int, values: dict[str, Any], rules: _RowRules) -> Request | InvalidRow:
    """Resolve defaults and check every field; all of a row's problems are reported together."""
    problems: list[str] = []
    resolved: dict[str, Any] = {}

    def check(name: str, resolve) -> None:
        try:
            resolved[name] = resolve()
        except _RowProblem as problem:
            problems.append(str(problem))

    row_id = values["id"]
    if row_id is None:
        problems.append("id is missing (null); give every row an id")
    elif not ID_PATTERN.fullmatch(row_id) or row_id.startswith("."):
        # No leading dot: that rules out '.', '..', hidden files and the storage layer's temporary
        # names (`.tmp-...`), which resume never lists and which are swept away after a crash.
        problems.append(
            f"id {row_id!r} is not allowed: use 1-128 characters of A-Z a-z 0-9 . _ - not starting with '.'"
        )

    prompt = values["prompt"]
    resolved["prompt"] = prompt
    if prompt is None or not prompt.strip():
        problems.append("prompt is empty; give the row a prompt or remove it")
    negative = values.get("negative_prompt")
    resolved["negative_prompt"] = DEFAULT_NEGATIVE_PROMPT if negative is None else negative
    if rules.edit:
        check("images", lambda: _input_images(values, rules.policy, rules.family.max_condition_images))
    # A row with input (or condition) images and no size takes the last image's aspect ratio (resolved in stage 2).
    has_images = rules.edit and bool(resolved.get("images", True))
    default_size = None if has_images else rules.family.default_size
    check("width", lambda: _size(values, "width", rules.family, default_size))
    check("height", lambda: _size(values, "height", rules.family, default_size))
    check("seed", lambda: _seed(values, row_id))
    check("num_inference_steps", lambda: _steps(values, rules.family))
    check("true_cfg_scale", lambda: _true_cfg_scale(values, rules.family, negative))
    check("loras", lambda: _loras(values, rules))
    check("scheduler_shift", lambda: _scheduler_shift(values, rules.defaults))
    check(STEP_CACHE_COLUMN, lambda: _step_cache(values, rules.defaults))
    if any(values.get(name) is not None for name in CONTROL_COLUMNS):
        try:
            resolved.update(_controls(values, rules))
        except _RowProblem as problem:
            problems.append(str(problem))
    # A control row's mask without an init image is ControlNet-inpainting (`_controls`), not an image start.
    control_mask = values.get(CONTROL_IMAGE_COLUMN) is not None and values.get(INIT_IMAGE_COLUMN) is None
    starts = (INIT_IMAGE_COLUMN, STRENGTH_COLUMN, "mask_crop_padding") + (() if control_mask else (MASK_IMAGE_COLUMN,))
    if any(values.get(name) is not None for name in starts):
        try:
            resolved.update(_image_start(values, rules))
        except _RowProblem as problem:
            problems.append(str(problem))
    if problems:
        return InvalidRow(index=index, id=row_id, reason="; ".join(problems), parameters=resolved)
    return Request(index=index, id=row_id, **resolved)


def _loras(values: dict[str, Any], rules: _RowRules) -> tuple[LoraRef, ...]:
    listed = values.get(LORAS_COLUMN)
    if not listed:
        return rules.defaults.loras
    if len(listed) > MAX_LORAS_PER_ROW:
        raise _RowProblem(f"{LORAS_COLUMN} has {len(listed)} adapters; use at most {MAX_LORAS_PER_ROW}")
    refs = []
    for position, item in enumerate(listed):
        label = f"{LORAS_COLUMN}[{position}]"
        path = (item or {}).get("path")
        if path is None or not path.strip():
            raise _RowProblem(f"{label}.path is empty; give the adapter's .safetensors path or URL")
        scale = (item or {}).get("scale")
        try:
            scale = check_scale(DEFAULT_LORA_SCALE if scale is None else scale, f"{label}.scale")
            url = rules.policy.resolve(path, what="adapter")
        except InputLocationError as error:
            raise _RowProblem(f"{label}.path {error}") from error
        except ValueError as error:
            raise _RowProblem(str(error)) from error
        refs.append(LoraRef(url=url, scale=scale))
    urls = [ref.url for ref in refs]
    repeated = next((url for url in urls if urls.count(url) > 1), None)
    if repeated:
        raise _RowProblem(f"{LORAS_COLUMN} lists {repeated} more than once; list it once, with the scales added up")
    return tuple(refs)


def _scheduler_shift(values: dict[str, Any], defaults: RowDefaults) -> float | None:
    shift = values.get("scheduler_shift")
    if shift is None:
        return defaults.scheduler_shift
    try:
        return check_scheduler_shift(shift)
    except ValueError as error:
        raise _RowProblem(str(error)) from error


def _step_cache(values: dict[str, Any], defaults: RowDefaults) -> str | None:
    """The row's spec, normalized; an empty cell takes the run's --step-cache (`none` turns it off for the row)."""
    spec = values.get(STEP_CACHE_COLUMN)
    if spec is None or not spec.strip():
        return defaults.step_cache
    try:
        return normalized(spec)
    except StepCacheError as error:
        raise _RowProblem(f"{STEP_CACHE_COLUMN} {error}") from error


def _input_images(values: dict[str, Any], policy: InputPolicy, condition_images: int = 0) -> tuple[str, ...]:
    """An edit row's input images (1 to MAX_INPUT_IMAGES), or for a family that takes condition images on
    text-to-image rows (`condition_images` > 0) none to that many."""
    optional, most = condition_images > 0, condition_images or MAX_INPUT_IMAGES
    if IMAGE_COLUMN in values:
        raw = values[IMAGE_COLUMN]
        if raw is None and optional:
            return ()
        if raw is None:
            raise _RowProblem(f"{IMAGE_COLUMN} is missing (null); give the URL or path of the input image")
        listed, column = [raw], IMAGE_COLUMN
    else:
        listed, column = values.get(IMAGES_COLUMN), IMAGES_COLUMN
        if not listed and optional:
            return ()
        if not listed:
            raise _RowProblem(f"{IMAGES_COLUMN} is empty; give 1 to {MAX_INPUT_IMAGES} input image URLs")
        if len(listed) > most:
            what = "condition images with this model" if optional else "input images"
            raise _RowProblem(f"{IMAGES_COLUMN} has {len(listed)} images; use at most {most} {what}")
    resolved = []
    for position, raw in enumerate(listed):
        label = column if column == IMAGE_COLUMN else f"{column}[{position}]"
        if raw is None:
            raise _RowProblem(f"{label} is null; give the URL or path of the input image")
        try:
            resolved.append(policy.resolve(raw))
        except InputLocationError as error:
            raise _RowProblem(f"{label} {error}") from error
    return tuple(resolved)


def _controls(values: dict[str, Any], rules: _RowRules) -> dict[str, Any]:
    """control_image (one or a list), control_scale (one for all, or one each), control_start/end, and
    control_preprocess: checked together."""
    from qwen_batch.pipeline.conditions.control_preprocess import ControlPreprocessError, check_preprocess

    raw = values.get(CONTROL_IMAGE_COLUMN)
    if rules.edits:
        raise _RowProblem("control_image and its columns are for text-to-image rows; remove them from edit rows")
    listed = [raw] if isinstance(raw, str) else list(raw or [])
    if not listed:
        given = next(name for name in CONTROL_COLUMNS if values.get(name) is not None)
        raise _RowProblem(f"{given} needs {CONTROL_IMAGE_COLUMN}: give the control image (edges, depth, pose...)")
    if values.get(INIT_IMAGE_COLUMN) is not None:
        raise _RowProblem(f"{CONTROL_IMAGE_COLUMN} with {INIT_IMAGE_COLUMN} is not supported: use one or the other")
    if len(listed) > MAX_CONTROL_IMAGES:
        raise _RowProblem(f"{CONTROL_IMAGE_COLUMN} has {len(listed)} images; use at most {MAX_CONTROL_IMAGES}")
    scales = values.get(CONTROL_SCALE_COLUMN)
    if not isinstance(scales, list):  # none (1.0) or one number: the same for every control image
        scales = [1.0 if scales is None else scales] * len(listed)
    if len(scales) != len(listed):
        raise _RowProblem(
            f"{CONTROL_SCALE_COLUMN} has {len(scales)} values for {len(listed)} control images: give one for all, "
            "or one each"
        )
    for scale in scales:
        if scale is None or not (math.isfinite(float(scale)) and 0.0 <= float(scale) <= 10.0):
            raise _RowProblem(f"{CONTROL_SCALE_COLUMN} {scale} is out of range: use 0 to 10 (1 is the usual)")
    start, end = (values.get(name) for name in (CONTROL_START_COLUMN, CONTROL_END_COLUMN))
    start, end = 0.0 if start is None else float(start), 1.0 if end is None else float(end)
    if not (0.0 <= start < end <= 1.0):
        raise _RowProblem(
            f"{CONTROL_START_COLUMN} {start} and {CONTROL_END_COLUMN} {end}: give fractions of the schedule with "
            "0 <= start < end <= 1 (defaults 0 and 1)"
        )
    preprocess = values.get(CONTROL_PREPROCESS_COLUMN)
    if preprocess is not None:
        try:
            check_preprocess(preprocess)
        except ControlPreprocessError as error:
            raise _RowProblem(f"{CONTROL_PREPROCESS_COLUMN}: {error}") from error
    mask = values.get(MASK_IMAGE_COLUMN)
    if mask is not None and len(listed) != 1:
        raise _RowProblem(f"ControlNet-inpainting (control_image with {MASK_IMAGE_COLUMN}) takes one control image")
    controls = []
    for position, url in enumerate(listed):
        label = CONTROL_IMAGE_COLUMN if isinstance(raw, str) else f"{CONTROL_IMAGE_COLUMN}[{position}]"
        if url is None:
            raise _RowProblem(f"{label} is null; give the URL or path of the control image")
        try:
            controls.append(ControlRef(rules.policy.resolve(url), float(scales[position]), preprocess))
        except InputLocationError as error:
            raise _RowProblem(f"{label} {error}") from error
    resolved: dict[str, Any] = {"controls": tuple(controls), "control_range": (start, end)}
    if mask is not None:  # ControlNet-inpainting: the mask goes to an inpainting ControlNet with its image
        try:
            resolved["mask_image"] = rules.policy.resolve(mask)
        except InputLocationError as error:
            raise _RowProblem(f"{MASK_IMAGE_COLUMN} {error}") from error
    return resolved


def _edit_inpaint_image(values: dict[str, Any], init: Any, mask: Any, padding: Any) -> Any:
    """An edit row with a mask (QwenImageEditInpaintPipeline): its one input image is where it starts."""
    if init is not None:
        raise _RowProblem(f"{INIT_IMAGE_COLUMN} is for text-to-image rows; an edit row starts from its own image")
    if mask is None:
        raise _RowProblem(f"{STRENGTH_COLUMN} on an edit row needs {MASK_IMAGE_COLUMN} (edit-inpainting)")
    listed = [values[IMAGE_COLUMN]] if IMAGE_COLUMN in values else list(values.get(IMAGES_COLUMN) or [])
    if len(listed) != 1:
        raise _RowProblem(f"edit-inpainting takes one input image; this row has {len(listed)}")
    if padding is not None:
        raise _RowProblem("mask_crop_padding is not supported on edit rows yet; remove it")
    if values.get("width") is not None or values.get("height") is not None:
        raise _RowProblem(
            "edit-inpainting rows take their size from the input image (about 1 megapixel, as diffusers' "
            "QwenImageEditInpaintPipeline does): remove width and height"
        )
    return listed[0]


def _image_start(values: dict[str, Any], rules: _RowRules) -> dict[str, Any]:
    """init_image, mask_image and strength: checked together, since each needs the others' context."""
    init, mask, strength = (values.get(name) for name in (INIT_IMAGE_COLUMN, MASK_IMAGE_COLUMN, STRENGTH_COLUMN))
    padding = values.get("mask_crop_padding")
    if rules.edits:  # edit-inpainting: the edit's input image is the one the row starts from and repaints
        init = _edit_inpaint_image(values, init, mask, padding)
    if init is None:
        given = MASK_IMAGE_COLUMN if mask is not None else STRENGTH_COLUMN
        raise _RowProblem(
            f"{given} needs {INIT_IMAGE_COLUMN}: give the image the row starts from (and repaints where the mask "
            "is white), or remove it"
        )
    strength = DEFAULT_STRENGTH if strength is None else float(strength)
    # 0 would run no step at all (diffusers raises); anything above gives at least one.
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise _RowProblem(
            f"{STRENGTH_COLUMN} {strength} is out of range: use a number above 0 and at most 1 (1 repaints from "
            f"pure noise; the default, {DEFAULT_STRENGTH}, keeps the image's layout)"
        )
    start: dict[str, Any] = {"strength": strength}
    if padding is not None:
        padding = _integer(values, "mask_crop_padding", None)
        if mask is None:
            raise _RowProblem("mask_crop_padding needs mask_image: it pads the mask's bounding box")
        if not 0 <= padding <= rules.family.max_size:
            raise _RowProblem(f"mask_crop_padding {padding} is out of range: use 0 to {rules.family.max_size} pixels")
        start["mask_crop_padding"] = padding
    for column, raw in ((INIT_IMAGE_COLUMN, init), (MASK_IMAGE_COLUMN, mask)):
        if raw is None:
            continue
        try:
            start[column] = rules.policy.resolve(raw)
        except InputLocationError as error:
            raise _RowProblem(f"{column} {error}") from error
    return start


def _size(values: dict[str, Any], name: str, rules: RowRules, default: int | None) -> int | None:
    """A width or height, `default` when the row gives none (None: the row has none)."""
    size = _integer(values, name, default)
    if size is None:
        return None
    if not rules.min_size <= size <= rules.max_size:
        raise _RowProblem(f"{name} {size} is out of range: use {rules.min_size} to {rules.max_size}")
    multiple = rules.size_multiple
    if size % multiple:
        lower = size - size % multiple
        raise _RowProblem(f"{name} {size} is not a multiple of {multiple}: use {lower} or {lower + multiple}")
    return size


def _seed(values: dict[str, Any], row_id: str | None) -> int:
    seed = _integer(values, "seed", None)
    if seed is None:
        return derive_seed(row_id or "")
    if not INT64_MIN <= seed <= INT64_MAX:
        raise _RowProblem(f"seed {seed} is outside the int64 range")
    return seed


def _steps(values: dict[str, Any], rules: RowRules) -> int:
    if rules.fixed_steps is not None:
        steps = _integer(values, "num_inference_steps", rules.fixed_steps)
        if steps != rules.fixed_steps:
            raise _RowProblem(
                f"num_inference_steps {steps} cannot be used: this checkpoint samples a fixed grid of "
                f"{rules.fixed_steps} sigmas (sample_sigmas in its model_index.json); leave num_inference_steps "
                f"empty or give {rules.fixed_steps}"
            )
        return steps
    steps = _integer(values, "num_inference_steps", rules.default_steps)
    if not rules.min_steps <= steps <= rules.max_steps:
        hint = " (one step gives a NaN image with this model's scheduler)" if steps == 1 else ""
        raise _RowProblem(
            f"num_inference_steps {steps} is out of range: use {rules.min_steps} to {rules.max_steps}{hint}"
        )
    return steps


def _true_cfg_scale(values: dict[str, Any], rules: RowRules, negative_prompt: str | None = None) -> float:
    scale = values.get("true_cfg_scale")
    scale = rules.default_true_cfg_scale if scale is None else float(scale)
    if not (math.isfinite(scale) and MIN_TRUE_CFG_SCALE <= scale <= MAX_TRUE_CFG_SCALE):
        raise _RowProblem(
            f"true_cfg_scale {scale} is out of range: use a number from {MIN_TRUE_CFG_SCALE} to "
            f"{MAX_TRUE_CFG_SCALE} (above 1 turns classifier-free guidance on)"
        )
    if scale > 1.0 and rules.guidance_needs_negative_prompt and not (negative_prompt or "").strip():
        raise _RowProblem(
            f"true_cfg_scale {scale} needs a negative_prompt with this model: it guides only against one "
            "(give the row a negative_prompt, or leave true_cfg_scale empty for the model's 1.0)"
        )
    return scale


def _integer(values: dict[str, Any], name: str, default: int | None) -> int | None:
    value = values.get(name)
    if value is None:
        return default
    if isinstance(value, float):
        # pandas turns integer columns with gaps into floats; accept whole numbers, refuse the rest.
        if not math.isfinite(value) or not value.is_integer():
            raise _RowProblem(f"{name} {value} is not a whole number")
        value = int(value)
    return value
