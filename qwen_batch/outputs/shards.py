"""WebDataset and Parquet shards of generated images, each row published exactly once.

Layout (shard numbers `NNNNN`, five digits or more):

- `webdataset`: `shards/NNNNN.tar` (webdataset's TarWriter; per sample `KEY.png|webp|jpg`, `KEY.json` = the row's
  record plus `key`, `KEY.txt` = the prompt), beside it `shards/NNNNN.parquet` (the same rows without images, as
  img2dataset and NeMo Curator write) and `shards/NNNNN_stats.json`.
- `parquet`: `data/NNNNN.parquet` (column `image` in the `datasets` Image layout, `key`, the record's fields; the
  `huggingface` schema metadata), `data/NNNNN_stats.json`, and a dataset card `README.md`.

KEY is the shard number and the row's index in it (`000070012`, img2dataset's style): WebDataset groups a sample's
files by the name up to the first dot, and manifest ids may hold dots, slashes, anything; the json maps key -> id.

Exactly once. A shard is *published* when its data file (the tar, or the data parquet) exists; nothing else counts.
The data file is self-describing (its json members or its columns hold every row's id, key and fingerprint), so the
sidecars (stats, the tar's parquet) are derived and can always be rebuilt from it. A shard is spooled to a local
temporary file and published whole: on local disk under a `TEMP_PREFIX` name in the target folder then `os.replace`
(never listed, swept by `Folder.remove_stale_temporaries`), on an object store by one `put_file` (a single PUT, or a
multipart upload that appears only once completed). Then its stats, then (webdataset) its sidecar parquet, both
carrying the data file's *version* as listed (S3's ETag, or size/inode/mtime on local disk).

What a kill leaves, and how the next run converges:
- while spooling, or during the upload: a temporary file (local) or nothing (S3); no reader sees any of it, the rows
  are not published and are generated again.
- after the data file, before its results part file: a published shard the results do not know. `published_rows`
  reads the shards themselves, so the run adopts those rows (writes their records) instead of generating them again.
- after the data file, before or between its sidecars: a sidecar missing, or stale (its version is not the data
  file's); `published_rows` reads the data file instead and rebuilds them. The sidecar parquet is written last, so a
  current sidecar parquet means current stats too.
- in `remove_rows` (a changed row, dropped before it is generated again): the data file is replaced whole, so a
  reader sees the old shard or the new one; a kill before the replace leaves the old shard and the run removes the
  row again; after it, stale sidecars as above. An emptied shard's data file is deleted before its sidecars, and a
  sidecar without its data file is ignored (and deleted) by `published_rows`.
- a row in two shards (never written so, but possible if a future change rewrites shards differently): `scan_shards`
  keeps the newest (by `finished_at`, then shard number) and lists the others in `duplicates`; `removals()` gives
  what to pass to `remove_rows`.

Shard numbers never collide: worker i of n takes numbers = i (mod n) above every numbered file present when it
started, so concurrent workers write disjoint numbers and a later run (any n) never reuses one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qwen_batch import __version__
from qwen_batch.errors import StorageError
from qwen_batch.io.parquet import read_parquet
from qwen_batch.io.storage import TEMP_PREFIX, Folder, with_retries
from qwen_batch.outputs import dataset_card
from qwen_batch.outputs.dataset_card import IMAGE_COLUMN, IMAGE_TYPE
from qwen_batch.run.results import RECORD_SCHEMA

log = logging.getLogger(__name__)

FILES, WEBDATASET, PARQUET = OUTPUT_FORMATS = ("files", "webdataset", "parquet")
SHARD_KINDS = (WEBDATASET, PARQUET)
DEFAULT_ROWS_PER_SHARD = 1000
# `datasets`' MAX_SHARD_SIZE ("500MB") and the Hub's advice for Parquet and WebDataset files.
DEFAULT_SHARD_BYTES = 500 * 1000 * 1000
IMAGE_EXTENSIONS = ("png", "webp", "jpg")
NUMBER_DIGITS = 5
# Rows per Parquet row group: what `datasets` uses for image datasets, so the Hub viewer reads a page at a time; the
# byte limit keeps a row group of large images from holding much RAM while it is spooled.
ROW_GROUP_ROWS = 100
ROW_GROUP_BYTES = 64 * 1024 * 1024
FOLDERS = {WEBDATASET: "shards", PARQUET: "data"}
DATA_SUFFIX = {WEBDATASET: ".tar", PARQUET: ".parquet"}
STATS_SUFFIX = "_stats.json"
# The tar's sidecar parquet names the data file's version it was built from: stale when the tar changed since.
SIDECAR_METADATA = b"qwen_batch_shard"
# Record fields that are not the row's: `image` is the files output's path (and the Parquet output's image column),
# `shard` is where the row is, which the shard itself need not say.
_NOT_STORED = ("image", "shard")
_NUMBERED = re.compile(r"^(\d+)(\.tar|\.parquet|_stats\.json)$")
_RECORD_TYPES = {schema_field.name: schema_field.type for schema_field in RECORD_SCHEMA}


@dataclass
class Sample:
    """One generated row for a shard: its encoded image, its results record (JSON-able values) and prompt."""

    id: str
    image: bytes
    extension: str  # png | webp | jpg
    record: dict[str, Any]
    prompt: str


@dataclass(frozen=True)
class PublishedShard:
    number: int
    relative: str  # under the output folder, e.g. shards/00007.tar
    url: str  # as written to results: output.display(relative)
    keys: dict[str, str]  # id -> key
    rows: int
    bytes: int


@dataclass(frozen=True)
class PublishedRow:
    id: str
    shard: str  # the data file, relative to the output folder
    number: int
    key: str
    fingerprint: str | None
    record: dict[str, Any]  # as stored (typed as results records: finished_at a datetime), with `key`


@dataclass
class ShardScan:
    rows: dict[str, PublishedRow]  # id -> the newest published copy
    duplicates: list[PublishedRow] = field(default_factory=list)  # older copies of ids in `rows`

    def removals(self) -> dict[str, set[str]]:
        """The duplicates as `remove_rows` takes them."""
        drop: dict[str, set[str]] = {}
        for row in self.duplicates:
            drop.setdefault(row.shard, set()).add(row.id)
        return drop


class ShardPublishError(StorageError):
    """A shard could not be published (after the storage layer's retries); `ids`: its rows, none of them written."""

    def __init__(self, message: str, ids: list[str]):
        super().__init__(message)
        self.ids = ids


def shard_name(kind: str, number: int, suffix: str | None = None) -> str:
    """`shards/00007.tar`, `data/00007.parquet`, or with `suffix` a sidecar (`.parquet`, `_stats.json`)."""
    return f"{FOLDERS[kind]}/{number:0{NUMBER_DIGITS}d}{DATA_SUFFIX[kind] if suffix is None else suffix}"


def _check_kind(kind: str) -> None:
    if kind not in SHARD_KINDS:
        raise ValueError(f"not a shard output format: {kind!r} (one of {', '.join(SHARD_KINDS)})")


# ---------------------------------------------------------------------------------------------- storage helpers


def _version(info: dict[str, Any]) -> str:
    """What changes whenever the object is replaced: its content hash where the store gives one, else size and file
    identity (a replaced local file is a new inode with a new mtime)."""
    for name in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(name):
            return str(info[name]).strip('"')
    return ":".join(str(info.get(name, "")) for name in ("size", "ino", "mtime", "LastModified", "created"))


def _listing(output: Folder, kind: str) -> dict[str, dict[str, Any]]:
    """Relative path -> listing info of the numbered files in the kind's folder: one listing call."""
    base = output.path(FOLDERS[kind])

    def find() -> dict[str, dict[str, Any]]:
        output.fs.invalidate_cache(base)  # other workers publish here
        try:
            return output.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}

    prefix = output.root.rstrip("/") + "/"
    found = {}
    for path, info in with_retries(find, output.display(FOLDERS[kind])).items():
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        if posixpath.dirname(relative) == FOLDERS[kind] and _NUMBERED.match(posixpath.basename(relative)):
            found[relative] = info
    return found


def _number(relative: str) -> int:
    return int(_NUMBERED.match(posixpath.basename(relative)).group(1))


def _spool_path(output: Folder, relative: str) -> str:
    """Where a shard is written before it is published: beside its target on local disk (so publishing is one
    rename, and a killed writer's file is a swept temporary), else a local temporary file (then one upload)."""
    name = f"{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(relative)}"
    if output.is_local:
        directory = posixpath.dirname(output.path(relative))
        os.makedirs(directory, exist_ok=True)
        return posixpath.join(directory, name)
    return os.path.join(tempfile.gettempdir(), f"qwen-batch-{name}")


def _publish(output: Folder, spooled: str, relative: str) -> str:
    """Make the spooled file `relative`, whole or not at all; its version."""
    target = output.path(relative)
    url = output.display(relative)
    try:
        if output.is_local:
            with open(spooled, "rb+") as handle:
                os.fsync(handle.fileno())
            with_retries(lambda: os.replace(spooled, target), url)
        else:
            with_retries(lambda: output.fs.put_file(spooled, target), url)
        return _version(with_retries(lambda: output.fs.info(target), url))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(spooled)


def _open_remote(output: Folder, relative: str):
    # Small blocks: a Parquet reader asks for its footer and a few column chunks, not whole 50 MB blocks.
    return output.fs.open(output.path(relative), "rb", block_size=1 << 20)


# ---------------------------------------------------------------------------------------------- rows as tables


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _stored_record(sample: Sample, key: str) -> dict[str, Any]:
    record = {name: value for name, value in sample.record.items() if name not in _NOT_STORED}
    record["id"], record["key"] = sample.id, key
    return record


def _coerce(value: Any, arrow_type: pa.DataType) -> Any:
    # The tar's json holds timestamps as ISO text; results records hold datetimes.
    if isinstance(value, str) and pa.types.is_timestamp(arrow_type):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


def _column(name: str, values: list[Any]) -> pa.Array:
    """A column typed as results records type it (the same in every shard, so readers can concatenate shards);
    other fields as Arrow infers them, text where it cannot (or where all are null: a type a later shard can match)."""
    if name in _RECORD_TYPES:
        with contextlib.suppress(pa.ArrowException, TypeError, ValueError):
            return pa.array([_coerce(value, _RECORD_TYPES[name]) for value in values], type=_RECORD_TYPES[name])
    with contextlib.suppress(pa.ArrowException, TypeError, ValueError):
        array = pa.array(values)
        if not pa.types.is_null(array.type):
            return array
    texts = [
        value if value is None or isinstance(value, str) else json.dumps(value, default=_json_default)
        for value in values
    ]
    return pa.array(texts, type=pa.string())


def _records_table(records: list[dict[str, Any]], names: list[str] | None = None) -> pa.Table:
    if names is None:
        names = list(dict.fromkeys(["key", "id", *(name for record in records for name in record)]))
    return pa.table({name: _column(name, [record.get(name) for record in records]) for name in names})


# ---------------------------------------------------------------------------------------------- spools


class _TarSpool:
    """A WebDataset shard being written to its spool file."""

    def __init__(self, path: str):
        from webdataset.writer import TarWriter  # imports torch: only when a webdataset output is written

        self.path = path
        self._handle = open(path, "wb")  # noqa: SIM115 (closed by finish or discard)
        self._tar = TarWriter(self._handle, encoder=False, mtime=datetime.now(timezone.utc).timestamp())
        self.bytes = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks

    @staticmethod
    def sample_bytes(sample: Sample, record_json: bytes) -> int:
        # Each member: a 512-byte header and its data padded to 512 bytes.
        sizes = (len(sample.image), len(record_json), len(sample.prompt.encode("utf-8")))
        return sum(tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for size in sizes)

    def add(self, sample: Sample, key: str, record: dict[str, Any]) -> None:
        record_json = json.dumps(record, default=_json_default, ensure_ascii=False).encode("utf-8")
        self._tar.write(
            {"__key__": key, sample.extension: sample.image, "json": record_json, "txt": sample.prompt.encode("utf-8")}
        )
        self.bytes += self.sample_bytes(sample, record_json)

    def finish(self) -> None:
        self._tar.close()
        self._handle.close()

    def discard(self) -> None:
        # The tar stream first: left to the garbage collector it would write its end blocks to a closed file.
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _ParquetSpool:
    """A Parquet shard being written to its spool file, a row group at a time (RAM holds one row group)."""

    def __init__(self, path: str):
        self.path = path
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self.schema: pa.Schema | None = None
        self.bytes = 0

    @staticmethod
    def sample_bytes(sample: Sample, record_json: bytes) -> int:
        return len(sample.image) + len(record_json)

    def add(self, sample: Sample, key: str, record: dict[str, Any]) -> None:
        size = self.sample_bytes(sample, json.dumps(record, default=_json_default).encode("utf-8"))
        self._pending.append({IMAGE_COLUMN: {"bytes": sample.image, "path": f"{key}.{sample.extension}"}, **record})
        self._pending_bytes += size
        self.bytes += size
        if len(self._pending) >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            # The first row group fixes the columns: results records carry the same fields on every row.
            names = list(dict.fromkeys(["key", "id", *(name for row in self._pending for name in row)]))
            names.remove(IMAGE_COLUMN)
            records = _records_table(self._pending, names)
            images = pa.array([row[IMAGE_COLUMN] for row in self._pending], type=IMAGE_TYPE)
            table = records.add_column(0, IMAGE_COLUMN, images)
            self.schema = table.schema
            metadata_schema = dataset_card.with_hf_metadata(table.schema)
            self._writer = pq.ParquetWriter(self.path, metadata_schema, compression="zstd")
        else:
            names = [name for name in self.schema.names if name != IMAGE_COLUMN]
            dropped = {name for row in self._pending for name in row} - set(self.schema.names)
            if dropped:
                log.warning("%s: fields %s not in the shard's first rows, not stored", self.path, sorted(dropped))
            records = _records_table(self._pending, names).cast(pa.schema([self.schema.field(name) for name in names]))
            images = pa.array([row[IMAGE_COLUMN] for row in self._pending], type=IMAGE_TYPE)
            table = records.add_column(0, IMAGE_COLUMN, images)
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata), row_group_size=len(table))
        self._pending, self._pending_bytes = [], 0

    def finish(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


@dataclass
class _OpenShard:
    number: int
    relative: str
    spool: _TarSpool | _ParquetSpool
    records: list[dict[str, Any]] = field(default_factory=list)  # as stored, with key: small, no images
    keys: dict[str, str] = field(default_factory=dict)
    extensions: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------- sidecars


def _stats(kind: str, relative: str, records: list[dict[str, Any]], size: int, version: str, formats) -> dict:
    return {
        "shard": relative,
        "number": _number(relative),
        "format": kind,
        "rows": len(records),
        "bytes": size,
        "image_format": ",".join(sorted(formats)),
        "first_id": records[0]["id"] if records else None,
        "last_id": records[-1]["id"] if records else None,
        "first_key": records[0]["key"] if records else None,
        "last_key": records[-1]["key"] if records else None,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "written_by": f"qwen-batch {__version__}",
        "data_version": version,  # the data file these stats describe
    }


def _write_sidecars(output: Folder, kind: str, relative: str, table: pa.Table, size: int, version: str, formats):
    """Stats, then (webdataset) the sidecar parquet last: a current sidecar parquet means current stats."""
    number = _number(relative)
    records = table.to_pylist()
    stats = _stats(kind, relative, records, size, version, formats)
    output.write_bytes(shard_name(kind, number, STATS_SUFFIX), json.dumps(stats, indent=1, default=str).encode())
    if kind == WEBDATASET:
        marker = {"data": relative, "data_version": version, "rows": table.num_rows, "formats": sorted(formats)}
        marker = json.dumps(marker).encode()
        sink = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({SIDECAR_METADATA: marker}), sink, compression="zstd")
        output.write_bytes(shard_name(kind, number, ".parquet"), sink.getvalue())


# ---------------------------------------------------------------------------------------------- the writer


class ShardWriter:
    """Writes samples into shards of `kind` and publishes each one whole; thread-safe.

    A shard closes at `rows_per_shard` rows or before it would pass `max_bytes` (a single larger sample makes a
    shard of its own). Worker `worker` of `workers` takes the shard numbers = worker (mod workers) above every
    number already in the folder.
    """

    def __init__(
        self,
        output: Folder,
        kind: str,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        worker: int = 0,
        workers: int = 1,
    ):
        _check_kind(kind)
        if rows_per_shard < 1 or max_bytes < 1:
            raise ValueError("rows_per_shard and max_bytes must be positive")
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}: needs 0 <= worker < workers")
        self.output, self.kind = output, kind
        self.rows_per_shard, self.max_bytes = rows_per_shard, max_bytes
        self.workers = workers
        highest = max((_number(relative) for relative in _listing(output, kind)), default=-1)
        start = highest + 1
        self._next = start + (worker - start) % workers
        # Keys have a fixed width per writer, so number * 10**width + index is unique across its shards.
        self._index_digits = max(4, len(str(rows_per_shard - 1)))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._publishing = 0
        self._open: _OpenShard | None = None
        self._closed = False
        self._card_written = False

    def _new_shard(self) -> _OpenShard:
        number, self._next = self._next, self._next + self.workers
        relative = shard_name(self.kind, number)
        path = _spool_path(self.output, relative)
        spool = _TarSpool(path) if self.kind == WEBDATASET else _ParquetSpool(path)
        return _OpenShard(number, relative, spool)

    def add(self, sample: Sample) -> list[PublishedShard]:
        """Add one row; the shards this call published (usually none, at most two)."""
        extension = {"jpeg": "jpg"}.get(sample.extension.lower(), sample.extension.lower())
        if extension not in IMAGE_EXTENSIONS:
            raise ValueError(f"{sample.id}: image extension {sample.extension!r} is not one of {IMAGE_EXTENSIONS}")
        sample.extension = extension
        full: list[_OpenShard] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("ShardWriter.add after close")
            shard = self._open
            if shard is not None and sample.id in shard.keys:
                raise ValueError(f"{sample.id}: already in this shard")
            if shard is not None and shard.records:
                estimate = shard.spool.sample_bytes(sample, json.dumps(sample.record, default=_json_default).encode())
                if shard.spool.bytes + estimate > self.max_bytes:
                    full.append(shard)
                    shard = None
            if shard is None:
                shard = self._open = self._new_shard()
            key = f"{shard.number:0{NUMBER_DIGITS}d}{len(shard.records):0{self._index_digits}d}"
            record = _stored_record(sample, key)
            failure = None
            try:
                shard.spool.add(sample, key, record)
            except Exception as error:
                # A spool that failed mid-sample holds a partial member: never publish it; its rows go again.
                shard.spool.discard()
                self._open = None
                message = f"{self.output.display(shard.relative)}: shard not written ({error})"
                failure = ShardPublishError(message, [*shard.keys, sample.id])
                failure.__cause__ = error
            else:
                shard.records.append(record)
                shard.keys[sample.id] = key
                shard.extensions.add(extension)
                if len(shard.records) >= self.rows_per_shard or shard.spool.bytes >= self.max_bytes:
                    full.append(shard)
                    self._open = None
            self._publishing += len(full)
        published = self._publish_all(full)  # a shard closed by the byte cap before this sample still goes out
        if failure is not None:
            raise failure
        return published

    def close(self) -> list[PublishedShard]:
        """Publish the last, partial shard (nothing when empty) and wait for other threads' publishing."""
        with self._lock:
            self._closed = True
            full = [self._open] if self._open is not None and self._open.records else []
            if self._open is not None and not self._open.records:
                self._open.spool.discard()
            self._open = None
            self._publishing += len(full)
        published = self._publish_all(full)
        with self._idle:
            self._idle.wait_for(lambda: self._publishing == 0)
        return published

    def abort(self) -> None:
        """Drop the open shard unpublished (its rows are not written; a run generates them again)."""
        with self._lock:
            self._closed = True
            if self._open is not None:
                self._open.spool.discard()
            self._open = None

    def _publish_all(self, shards: list[_OpenShard]) -> list[PublishedShard]:
        published, failure = [], None
        for shard in shards:
            try:
                published.append(self._publish_shard(shard))
            except Exception as error:
                failure = failure or error
            finally:
                with self._idle:
                    self._publishing -= 1
                    self._idle.notify_all()
        if failure is not None:
            raise failure
        return published

    def _publish_shard(self, shard: _OpenShard) -> PublishedShard:
        url = self.output.display(shard.relative)
        try:
            shard.spool.finish()
            size = os.path.getsize(shard.spool.path)
            version = _publish(self.output, shard.spool.path, shard.relative)
        except Exception as error:
            shard.spool.discard()
            raise ShardPublishError(f"{url}: shard not published ({error})", list(shard.keys)) from error
        # Published: from here on the rows are in the output whatever happens; the sidecars are derived.
        table = _records_table(shard.records)
        try:
            _write_sidecars(self.output, self.kind, shard.relative, table, size, version, shard.extensions)
            if not self._card_written:
                self._card_written = True
                schema = shard.spool.schema if isinstance(shard.spool, _ParquetSpool) else None
                data_files = f"{FOLDERS[self.kind]}/*{DATA_SUFFIX[self.kind]}"
                dataset_card.write_card(self.output, self.kind, data_files, schema)
        except StorageError as error:
            # The next run's `published_rows` rebuilds them from the shard.
            log.warning("%s: published, but its sidecar files were not written: %s", url, error)
        log.info("published %s: %d rows, %d bytes", url, len(shard.records), size)
        return PublishedShard(shard.number, shard.relative, url, dict(shard.keys), len(shard.records), size)


# ---------------------------------------------------------------------------------------------- reading shards


def _tar_samples(output: Folder, relative: str) -> Iterator[tuple[str, dict[str, tuple[tarfile.TarInfo, bytes]]]]:
    """A tar's samples in order, streamed: (key, {extension: (member, data)}); RAM holds one sample."""
    with _open_remote(output, relative) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = posixpath.basename(member.name)
            member_key, _, extension = name.partition(".")
            data = tar.extractfile(member).read()
            if member_key != key and members:
                yield key, members
                members = {}
            key = member_key
            members[extension] = (member, data)
        if members:
            yield key, members


def _read_tar_rows(output: Folder, relative: str) -> tuple[pa.Table, set[str]]:
    records, formats = [], set()
    for key, members in _tar_samples(output, relative):
        if "json" not in members:
            continue
        record = json.loads(members["json"][1])
        record["key"] = key
        records.append(record)
        formats |= {extension for extension in members if extension in IMAGE_EXTENSIONS}
    return _records_table(records), formats


def _read_sidecar(output: Folder, relative: str, version: str) -> pa.Table | None:
    """The sidecar parquet's rows when it describes the data file as it is now."""
    table = read_parquet(output.read_bytes(relative))
    marker = json.loads((table.schema.metadata or {}).get(SIDECAR_METADATA, b"{}"))
    if marker.get("data_version") != version or marker.get("rows") != table.num_rows:
        return None
    return table


def _read_data_parquet(output: Folder, relative: str) -> pa.Table:
    def read() -> pa.Table:
        with _open_remote(output, relative) as handle:
            parquet = pq.ParquetFile(handle)
            names = [name for name in parquet.schema_arrow.names if name != IMAGE_COLUMN]
            return parquet.read(columns=names, use_threads=False)

    return with_retries(read, output.display(relative))


def _shard_table(output: Folder, kind: str, relative: str, listing: dict[str, dict[str, Any]]) -> pa.Table:
    """A published shard's rows (no images), from its sidecar where current; stale or missing sidecars rebuilt."""
    number, info = _number(relative), listing[relative]
    version = _version(info)
    sidecar, stats = shard_name(kind, number, ".parquet"), shard_name(kind, number, STATS_SUFFIX)
    if kind == WEBDATASET:
        table = _read_sidecar(output, sidecar, version) if sidecar in listing else None
        if table is not None:
            if stats not in listing:  # deleted by hand: a kill leaves no current sidecar without current stats
                formats = set(json.loads(table.schema.metadata[SIDECAR_METADATA]).get("formats", ["png"]))
                _write_sidecars(output, kind, relative, table, int(info.get("size", 0)), version, formats)
            return table
        log.info("%s: sidecar files missing or stale; rebuilding them from the shard", output.display(relative))
        table, formats = _read_tar_rows(output, relative)
        _write_sidecars(output, kind, relative, table, int(info.get("size", 0)), version, formats)
        return table
    table = _read_data_parquet(output, relative)
    current = stats in listing and json.loads(output.read_bytes(stats)).get("data_version") == version
    if not current:
        formats = {key.rpartition(".")[2] for key in _image_paths(output, relative)}
        _write_sidecars(output, kind, relative, table, int(info.get("size", 0)), version, formats)
    return table


def _image_paths(output: Folder, relative: str) -> list[str]:
    with _open_remote(output, relative) as handle:
        column = pq.ParquetFile(handle).read(columns=[f"{IMAGE_COLUMN}.path"], use_threads=False)
    return [row[IMAGE_COLUMN]["path"] for row in column.to_pylist() if row[IMAGE_COLUMN]]


def _newest_first(row: PublishedRow) -> tuple:
    finished = row.record.get("finished_at")
    if isinstance(finished, str):
        finished = _coerce(finished, pa.timestamp("ms", tz="UTC"))
    stamp = finished.timestamp() if isinstance(finished, datetime) else float("-inf")
    return (stamp, row.number)


def scan_shards(output: Folder, kind: str) -> ShardScan:
    """Every row of every published shard, read from the shards themselves (their sidecars where current)."""
    _check_kind(kind)
    listing = _listing(output, kind)
    # In `shards/`, NNNNN.parquet is the tar's sidecar: the data files are the tars.
    data = sorted(relative for relative in listing if relative.endswith(DATA_SUFFIX[kind]))
    published_numbers = {_number(relative) for relative in data}
    for relative in listing:
        if _number(relative) not in published_numbers:
            # A sidecar whose data file is gone: left by `remove_rows` deleting an emptied shard.
            output.remove(relative)
    copies: dict[str, list[PublishedRow]] = {}
    for relative in data:
        for record in _shard_table(output, kind, relative, listing).to_pylist():
            if record.get("id") is None or record.get("key") is None:
                continue
            row = PublishedRow(
                record["id"], relative, _number(relative), record["key"], record.get("fingerprint"), record
            )
            copies.setdefault(row.id, []).append(row)
    scan = ShardScan({})
    for row_id, rows in copies.items():
        rows.sort(key=_newest_first, reverse=True)
        scan.rows[row_id] = rows[0]
        scan.duplicates += rows[1:]
    if scan.duplicates:
        log.warning("%d rows are in more than one shard; the newest copy of each is kept", len(scan.duplicates))
    return scan


def published_rows(output: Folder, kind: str) -> dict[str, PublishedRow]:
    """id -> where the row is published (its newest copy; see `scan_shards` for duplicates)."""
    return scan_shards(output, kind).rows


# ---------------------------------------------------------------------------------------------- removing rows


def remove_rows(output: Folder, kind: str, rows: dict[str, set[str]]) -> None:
    """Rewrite each shard (data file relative path -> ids to drop) without those rows, atomically; a shard left
    empty is deleted (data file first). Call before generating the rows again: readers see the old row or none."""
    _check_kind(kind)
    for relative, ids in rows.items():
        if ids and output.exists(relative):
            _rewrite_without(output, kind, relative, set(ids))


def _rewrite_without(output: Folder, kind: str, relative: str, ids: set[str]) -> None:
    number = _number(relative)
    spooled = _spool_path(output, relative)
    try:
        table, formats = (
            _copy_tar_without(output, relative, ids, spooled)
            if kind == WEBDATASET
            else _copy_parquet_without(output, relative, ids, spooled)
        )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(spooled)
        raise
    if table is None:
        os.remove(spooled)
        return  # none of the ids is in this shard
    if table.num_rows == 0:
        os.remove(spooled)
        output.remove(relative)  # unpublished from here on; the sidecars follow
        output.remove(shard_name(kind, number, STATS_SUFFIX))
        if kind == WEBDATASET:
            output.remove(shard_name(kind, number, ".parquet"))
        log.info("removed shard %s: no rows left", output.display(relative))
        return
    size = os.path.getsize(spooled)
    version = _publish(output, spooled, relative)
    _write_sidecars(output, kind, relative, table, size, version, formats)
    log.info("rewrote shard %s without %d rows", output.display(relative), len(ids))


def _copy_tar_without(output: Folder, relative: str, ids: set[str], spooled: str) -> tuple[pa.Table | None, set]:
    records, formats, dropped = [], set(), 0
    with open(spooled, "wb") as handle, tarfile.open(fileobj=handle, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in _tar_samples(output, relative):
            record = json.loads(members["json"][1]) if "json" in members else {}
            if record.get("id") in ids:
                dropped += 1
                continue
            for member, data in members.values():
                tar.addfile(member, io.BytesIO(data))  # verbatim: same names, times and modes
            if record:
                records.append({**record, "key": key})
                formats |= {extension for extension in members if extension in IMAGE_EXTENSIONS}
    return (_records_table(records) if dropped else None), formats


def _copy_parquet_without(output: Folder, relative: str, ids: set[str], spooled: str) -> tuple[pa.Table | None, set]:
    kept, formats, dropped = [], set(), 0
    with _open_remote(output, relative) as handle:
        source = pq.ParquetFile(handle)
        with pq.ParquetWriter(spooled, source.schema_arrow, compression="zstd") as writer:
            for group in range(source.num_row_groups):
                table = source.read_row_group(group, use_threads=False)
                keep = [row_id not in ids for row_id in table.column("id").to_pylist()]
                dropped += keep.count(False)
                table = table.filter(pa.array(keep, type=pa.bool_()))
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)
                    kept.append(table.drop_columns([IMAGE_COLUMN]))
                    paths = pc.struct_field(table.column(IMAGE_COLUMN), "path").to_pylist()
                    formats |= {path.rpartition(".")[2] for path in paths if path}
    if not dropped:
        return None, formats
    return (pa.concat_tables(kept) if kept else pa.table({})), formats
