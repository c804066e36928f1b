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
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qwen_batch.errors import ManifestError, StorageError
from qwen_batch.storage import read_url

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_NEGATIVE_PROMPT = " "  # a blank negative prompt still turns true CFG on, as the model card does
DEFAULT_SIZE = 1024
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 2048, 16
# Not 1: with a single step the scheduler's terminal shift (shift_terminal 0.02) divides 0 by 0 and
# the image is NaN, in diffusers' own pipeline too.
DEFAULT_STEPS, MIN_STEPS, MAX_STEPS = 50, 2, 200
DEFAULT_TRUE_CFG_SCALE, MIN_TRUE_CFG_SCALE, MAX_TRUE_CFG_SCALE = 4.0, 0.0, 50.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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
    ]
)
REQUIRED_COLUMNS = ("id", "prompt")
TEXT_COLUMNS = ("id", "prompt", "negative_prompt")
INTEGER_COLUMNS = ("width", "height", "seed", "num_inference_steps")
FLOAT_COLUMNS = ("true_cfg_scale",)
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


def derive_seed(row_id: str) -> int:
    """A stable seed for a row that has none: the same id always gets the same seed."""
    digest = hashlib.sha256(b"qwen-batch/seed/" + row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & INT64_MAX


def shard_of(row_id: str, shards: int) -> int:
    """The shard (0..shards-1) a row belongs to: a stable hash of its id, so shards are disjoint,
    every process computes the same split, and adding rows does not move the others."""
    digest = hashlib.sha256(b"qwen-batch/shard/" + row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True, slots=True)
class Request:
    """One valid manifest row: everything needed to generate its image."""

    index: int
    id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    num_inference_steps: int
    true_cfg_scale: float

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    @property
    def batch_key(self) -> tuple[int, int, int, float]:
        """Rows sharing this key can share a batch: same latent shape, same schedule, same guidance."""
        return (self.width, self.height, self.num_inference_steps, self.true_cfg_scale)

    @property
    def texts(self) -> tuple[str, ...]:
        """The texts the encoder must see for this row."""
        return (self.prompt, self.negative_prompt) if self.uses_cfg else (self.prompt,)

    def parameters(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "true_cfg_scale": self.true_cfg_scale,
        }


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

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def extra_columns(self) -> list[str]:
        known = set(MANIFEST_SCHEMA.names)
        return [name for name in self.table.column_names if name not in known]

    def report(self) -> str:
        """The human-readable validation report that `qwen-batch validate` prints."""
        lines = [
            f"{self.url}: {self.num_rows} rows, {len(self.requests)} valid, {len(self.invalid)} invalid",
        ]
        if self.extra_columns:
            lines.append(f"  extra columns carried into results: {', '.join(self.extra_columns)}")
        for row in self.invalid:
            label = f"id {row.id!r}" if row.id is not None else "no id"
            lines.append(f"  row {row.index} ({label}): {row.reason}")
        return "\n".join(lines)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate a Parquet manifest from any fsspec URL. Raises `ManifestError`."""
    try:
        data = read_url(url, storage_options)
    except StorageError as error:
        raise ManifestError(f"cannot read the manifest: {error}") from error
    try:
        # use_threads=False: pyarrow 25-26 can abort at interpreter exit ("terminate called without an
        # active exception") once its CPU thread pool has run; manifests are small, one thread is plenty.
        table = pq.read_table(io.BytesIO(data), use_threads=False)
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(
            f"{url}: not a readable Parquet file ({error}). Write the manifest with "
            "pandas.DataFrame.to_parquet or pyarrow.parquet.write_table."
        ) from error
    return validate_table(table, url)


def validate_table(table: pa.Table, url: str = "<table>") -> Manifest:
    _check_columns(table, url)
    columns = {name: table.column(name).to_pylist() for name in MANIFEST_SCHEMA.names if name in table.column_names}
    _check_unique_ids(columns["id"], url)

    requests: list[Request] = []
    invalid: list[InvalidRow] = []
    for index in range(table.num_rows):
        values = {name: column[index] for name, column in columns.items()}
        outcome = _validate_row(index, values)
        (requests if isinstance(outcome, Request) else invalid).append(outcome)
    return Manifest(url=url, table=table, requests=requests, invalid=invalid)


def _check_columns(table: pa.Table, url: str) -> None:
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
    reserved = [name for name in names if name in RESERVED_COLUMNS]
    if reserved:
        raise ManifestError(
            f"{url}: column(s) {reserved} are written by qwen-batch into the results; rename them in the manifest."
        )
    for name in names:
        kind = table.schema.field(name).type
        if name in TEXT_COLUMNS and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            expected = "string"
        elif name in INTEGER_COLUMNS + FLOAT_COLUMNS and not (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)
        ):
            expected = "integer" if name in INTEGER_COLUMNS else "number"
        else:
            continue
        raise ManifestError(f"{url}: column {name!r} has type {kind}; it must be {expected}.")


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


def _validate_row(index: int, values: dict[str, Any]) -> Request | InvalidRow:
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
    elif not ID_PATTERN.fullmatch(row_id) or row_id in (".", ".."):
        problems.append(f"id {row_id!r} is not allowed: use 1-128 characters of A-Z a-z 0-9 . _ - (not '.' or '..')")

    prompt = values["prompt"]
    resolved["prompt"] = prompt
    if prompt is None or not prompt.strip():
        problems.append("prompt is empty; give the row a prompt or remove it")
    negative = values.get("negative_prompt")
    resolved["negative_prompt"] = DEFAULT_NEGATIVE_PROMPT if negative is None else negative
    check("width", lambda: _size(values, "width"))
    check("height", lambda: _size(values, "height"))
    check("seed", lambda: _seed(values, row_id))
    check("num_inference_steps", lambda: _steps(values))
    check("true_cfg_scale", lambda: _true_cfg_scale(values))
    if problems:
        return InvalidRow(index=index, id=row_id, reason="; ".join(problems), parameters=resolved)
    return Request(index=index, id=row_id, **resolved)


def _size(values: dict[str, Any], name: str) -> int:
    size = _integer(values, name, DEFAULT_SIZE)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise _RowProblem(f"{name} {size} is out of range: use {MIN_SIZE} to {MAX_SIZE}")
    if size % SIZE_MULTIPLE:
        lower = size - size % SIZE_MULTIPLE
        raise _RowProblem(f"{name} {size} is not a multiple of {SIZE_MULTIPLE}: use {lower} or {lower + SIZE_MULTIPLE}")
    return size


def _seed(values: dict[str, Any], row_id: str | None) -> int:
    seed = _integer(values, "seed", None)
    if seed is None:
        return derive_seed(row_id or "")
    if not INT64_MIN <= seed <= INT64_MAX:
        raise _RowProblem(f"seed {seed} is outside the int64 range")
    return seed


def _steps(values: dict[str, Any]) -> int:
    steps = _integer(values, "num_inference_steps", DEFAULT_STEPS)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        hint = " (one step gives a NaN image with this model's scheduler)" if steps == 1 else ""
        raise _RowProblem(f"num_inference_steps {steps} is out of range: use {MIN_STEPS} to {MAX_STEPS}{hint}")
    return steps


def _true_cfg_scale(values: dict[str, Any]) -> float:
    scale = values.get("true_cfg_scale")
    scale = DEFAULT_TRUE_CFG_SCALE if scale is None else float(scale)
    if not (math.isfinite(scale) and MIN_TRUE_CFG_SCALE <= scale <= MAX_TRUE_CFG_SCALE):
        raise _RowProblem(
            f"true_cfg_scale {scale} is out of range: use a number from {MIN_TRUE_CFG_SCALE} to "
            f"{MAX_TRUE_CFG_SCALE} (above 1 turns classifier-free guidance on)"
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
