"""Results: one record per generated row, written as part files per batch and merged at the end.

A batch's part file is written only after its images, so a crash loses at most the batches in
flight, and a part file always points at complete images. `merge_results` folds the part files and
any earlier `results.parquet` into a new `results.parquet` with exactly one row per manifest row
(written atomically), then removes the part files it folded in; a crash in between is harmless, the
next merge folds the same records again.

Each record carries a fingerprint of everything that determines its image (model, prompt, negative
prompt, size, seed, steps, guidance, and where used the adapters' file hashes and scales, the
sampling shift and the step cache): resume skips a row only when an `ok` record with the same
fingerprint exists and its image is still there.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qwen_batch.adapters.loras import LoraRef
from qwen_batch.errors import NotFoundError, StorageError
from qwen_batch.io.parquet import read_parquet
from qwen_batch.io.storage import Folder
from qwen_batch.manifest import (
    CONDITION_COLUMNS,
    CONTROL_IMAGE_COLUMN,
    EDIT,
    INIT_IMAGE_COLUMN,
    LORAS_COLUMN,
    MANIFEST_SCHEMA,
    STEP_CACHE_COLUMN,
    Manifest,
    Request,
)

RESULTS_FILE = "results.parquet"
PARTS_FOLDER = "_parts"
IMAGES_FOLDER = "images"

OK, INVALID, FAILED = "ok", "invalid", "failed"

# The adapters as used: each one's URL, scale and the SHA-256 of its file.
LORA_FIELD = pa.field(
    LORAS_COLUMN,
    pa.list_(
        pa.struct([pa.field("path", pa.string()), pa.field("scale", pa.float64()), pa.field("sha256", pa.string())])
    ),
)
PARAMETER_FIELDS = [
    LORA_FIELD if field.name == LORAS_COLUMN else field for field in MANIFEST_SCHEMA if field.name != "id"
]
# Edit rows: the input images (canonical URLs) and their content hashes, in the row's order; rows that start
# from an image: the init image's and the mask's hashes (their URLs are in init_image and mask_image).
INPUT_FIELDS = [
    pa.field("input_images", pa.list_(pa.string())),
    pa.field("input_sha256", pa.list_(pa.string())),
]
# What qwen-batch adds to each manifest row.
OUTCOME_FIELDS = [
    pa.field("status", pa.string()),  # ok | invalid | failed
    pa.field("image", pa.string()),  # path or URL of the written image file (files output)
    pa.field("shard", pa.string()),  # shard outputs: path or URL of the shard holding the row's image
    pa.field("key", pa.string()),  # and the row's key in it (WebDataset's sample key: no dots)
    pa.field("error", pa.string()),  # empty when ok
    pa.field("warning", pa.string()),  # e.g. prompt truncated to the encoder's limit
    pa.field("model", pa.string()),
    pa.field("transformer", pa.string()),  # --transformer: the file the transformer came from (else empty)
    pa.field("transformer_sha256", pa.string()),  # and its SHA-256
    pa.field("sha256", pa.string()),  # of the image file (its bytes, as in the shard)
    pa.field("fingerprint", pa.string()),  # of everything that determines the image
    pa.field("seconds", pa.float64()),  # this row's share of its batch's generation time
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
]
SHARD_FIELDS = ("shard", "key")
# Rows with a step cache: the steps whose transformer ran in full (not reused), for the conditional pass and,
# with true CFG, the unconditional one (decided apart, as diffusers' cache contexts do).
STEP_FIELDS = [
    pa.field("steps_computed", pa.int64()),
    pa.field("uncond_steps_computed", pa.int64()),
]
RECORD_SCHEMA = pa.schema(
    [pa.field("id", pa.string()), *PARAMETER_FIELDS, *INPUT_FIELDS, *OUTCOME_FIELDS, *STEP_FIELDS]
)


@dataclass(slots=True)
class Record:
    """The outcome of one row, as stored in part files and results."""

    id: str | None
    prompt: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    true_cfg_scale: float | None = None
    loras: list[dict[str, Any]] | None = None  # [{path, scale, sha256}]
    scheduler_shift: float | None = None
    init_image: str | None = None
    mask_image: str | None = None
    strength: float | None = None
    mask_crop_padding: int | None = None
    control_image: list[str] | None = None
    control_scale: list[float] | None = None
    control_start: float | None = None
    control_end: float | None = None
    control_preprocess: str | None = None
    step_cache: str | None = None
    input_images: list[str] | None = None
    input_sha256: list[str] | None = None
    status: str = FAILED
    image: str | None = None
    shard: str | None = None
    key: str | None = None
    error: str = ""
    warning: str = ""
    model: str | None = None
    transformer: str | None = None
    transformer_sha256: str | None = None
    sha256: str | None = None
    fingerprint: str | None = None
    seconds: float | None = None
    finished_at: datetime | None = None
    steps_computed: int | None = None
    uncond_steps_computed: int | None = None

    @classmethod
    def for_request(cls, request: Request, model: str, fingerprint: str, **outcome: Any) -> Record:
        outcome.setdefault("finished_at", datetime.now(timezone.utc))
        parameters = request.parameters()
        input_images = parameters.pop("images", None)
        return cls(
            id=request.id,
            **parameters,
            input_images=input_images,
            model=model,
            fingerprint=fingerprint,
            **outcome,
        )


def fingerprint(request: Request, model_identity: str, input_versions: dict[str, str] | None = None) -> str:
    """A hash of everything that determines a row's image; resume compares it. `input_versions`: the version
    of each image the row reads (`qwen_batch.io.input_images.input_versions`), so replacing a file regenerates
    the rows that read it."""
    payload: dict[str, Any] = {"model": model_identity, **request.parameters()}
    if request.input_urls and input_versions is not None:
        payload["input_versions"] = [input_versions.get(url, "") for url in request.input_urls]
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _records_table(records: Iterable[Record]) -> pa.Table:
    rows = [asdict(record) for record in records]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def _to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class ResultStore:
    """The results of one output folder: part files, the merged file, and the images present."""

    def __init__(self, output: Folder):
        self.output = output

    def write_part(self, records: list[Record]) -> str:
        """Append the records of one batch; call only after the batch's images are written."""
        name = posixpath.join(
            PARTS_FOLDER, f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
        )
        self.output.write_bytes(name, _to_parquet(_records_table(records)))
        return name

    def _read_table(self, relative: str) -> pa.Table | None:
        try:
            return read_parquet(self.output.read_bytes(relative))
        except NotFoundError:
            return None  # folded in and removed by a concurrent merge
        except (pa.ArrowException, OSError) as error:
            raise StorageError(
                f"{self.output.display(relative)} is not a readable Parquet file ({error}); "
                "move it away and run again to regenerate its rows"
            ) from error

    def previous_records(self) -> tuple[dict[str, Record], list[str]]:
        """The newest record per id from results.parquet and all part files, and those part files."""
        parts = self.output.list_files(PARTS_FOLDER, ".parquet")
        latest: dict[str, Record] = {}
        for relative in [RESULTS_FILE, *parts]:
            if relative == RESULTS_FILE and not self.output.exists(RESULTS_FILE):
                continue
            table = self._read_table(relative)
            if table is None:
                continue
            names = [name for name in RECORD_SCHEMA.names if name in table.column_names]
            for row in table.select(names).to_pylist():
                if row.get("id") is None or row.get("status") is None:
                    continue
                record = Record(**row)
                current = latest.get(record.id)
                if current is None or _newer(record, current):
                    latest[record.id] = record
        return latest, parts

    def merge_parts(self, manifest: Manifest) -> tuple[pa.Table, list[str]]:
        """Fold results.parquet and every part file into one results.parquet (the fan-out's last step);
        the merged table and the part files folded in."""
        records, parts = self.previous_records()
        return self.merge(manifest, records, parts), parts

    def merge(self, manifest: Manifest, records: dict[str, Record], folded_parts: list[str]) -> pa.Table:
        """Write results.parquet: exactly one row per manifest row, in manifest order."""
        by_index: dict[int, Record] = {}
        for invalid in manifest.invalid:
            by_index[invalid.index] = Record(
                id=invalid.id, status=INVALID, error=invalid.reason, **_known_parameters(invalid.parameters)
            )
        for invalid in manifest.invalid:
            images = invalid.parameters.get("images")
            by_index[invalid.index].input_images = list(images) if images else None
        for request in manifest.requests:
            record = records.get(request.id)
            if record is None:
                record = Record.for_request(request, model="", fingerprint="", error="not generated")
            by_index[request.index] = record
        ordered = [by_index[index] for index in range(manifest.num_rows)]

        outcome = _records_table(ordered)
        # The conditions' columns (init_image, control_image...) and the step cache's only where the manifest has
        # them (or, for the step cache, the run's default gives rows one): a plain text-to-image manifest's results
        # keep the columns they always had.
        step_cache = STEP_CACHE_COLUMN in manifest.table.column_names or any(
            request.step_cache for request in manifest.requests
        )
        optional = (*CONDITION_COLUMNS, STEP_CACHE_COLUMN)
        known = [
            field.name
            for field in MANIFEST_SCHEMA
            if field.name not in optional
            or field.name in manifest.table.column_names
            or (field.name == STEP_CACHE_COLUMN and step_cache)
        ]
        columns = {name: outcome.column(name) for name in known}
        if manifest.task == EDIT or {INIT_IMAGE_COLUMN, CONTROL_IMAGE_COLUMN} & set(manifest.table.column_names):
            for field in INPUT_FIELDS:
                columns[field.name] = outcome.column(field.name)
        for name in manifest.extra_columns:
            columns[name] = manifest.table.column(name)
        # shard and key only for a shard output's results: a files output's keep the columns they always had.
        sharded = any(record.shard for record in ordered)
        for field in OUTCOME_FIELDS + (STEP_FIELDS if step_cache else []):
            if field.name in SHARD_FIELDS and not sharded:
                continue
            columns[field.name] = outcome.column(field.name)
        table = pa.table(columns)
        self.output.write_bytes(RESULTS_FILE, _to_parquet(table))
        for relative in folded_parts:
            self.output.remove(relative)
        self.output.remove_stale_temporaries()  # half-written files of runs that were killed
        return table


def _newer(candidate: Record, current: Record) -> bool:
    if candidate.finished_at is None:
        return False
    return current.finished_at is None or candidate.finished_at >= current.finished_at


def _known_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    names = {field.name for field in PARAMETER_FIELDS}
    known = {name: value for name, value in parameters.items() if name in names}
    if known.get(LORAS_COLUMN) is not None:  # an invalid row's adapters, as far as they were resolved
        known[LORAS_COLUMN] = [ref.parameters() if isinstance(ref, LoraRef) else ref for ref in known[LORAS_COLUMN]]
    return known
