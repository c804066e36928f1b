"""Where encoded images go: one file per row (`ImageFiles`), or WebDataset / Parquet shards (`ShardedImages`).

The writer hands each row's encoded image and record to `put`, which returns the records now safely stored (their
results part file may be written): a file's row at once; a shard's rows when their shard is published, so a record
never points at a shard a reader cannot see. `close` stores what is left (the last shard, partly filled).

Resume asks `done_ids`: files whose image is there, or rows in a published shard. `reconcile` runs before a run
generates anything (shards only): rows published but missing from the results (a kill between publishing a shard
and writing its part file) are adopted, and rows whose parameters changed are taken out of their shards before
they are generated again, so a reader never gets both versions.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import threading
from typing import TYPE_CHECKING

from qwen_batch.outputs.images import ImageFormat
from qwen_batch.outputs.shards import (
    DEFAULT_SHARD_BYTES,
    FILES,
    Sample,
    ShardPublishError,
    ShardWriter,
    remove_rows,
    scan_shards,
)
from qwen_batch.run.results import FAILED, IMAGES_FOLDER, OK, Record

if TYPE_CHECKING:
    from qwen_batch.io.storage import Folder
    from qwen_batch.manifest import Request
    from qwen_batch.outputs.shards import PublishedShard

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardCounts:
    """The shards a writer published: how many, their rows and bytes."""

    shards: int = 0
    rows: int = 0
    bytes: int = 0


class ImageFiles:
    """`images/<id>.<ext>`, one file per row (the `files` output format)."""

    kind = FILES

    def __init__(self, output: Folder, image_format: ImageFormat):
        self.output, self.format = output, image_format
        self.counts = ShardCounts()

    def relative(self, row_id: str) -> str:
        return posixpath.join(IMAGES_FOLDER, f"{row_id}.{self.format.extension}")

    def put(self, request: Request, record: Record, data: bytes) -> list[Record]:
        relative = self.relative(request.id)
        self.output.write_bytes(relative, data)  # a StorageError fails this row only (the writer catches it)
        record.status, record.image = OK, self.output.display(relative)
        return [record]

    def close(self) -> list[Record]:
        return []

    def abort(self) -> None:
        pass

    def done_ids(self, candidates: set[str]) -> set[str]:
        """Those of `candidates` whose image file is there."""
        if not candidates:
            return set()
        names = {
            posixpath.basename(name) for name in self.output.list_files(IMAGES_FOLDER, f".{self.format.extension}")
        }
        return {row_id for row_id in candidates if f"{row_id}.{self.format.extension}" in names}


class ShardedImages:
    """WebDataset or Parquet shards (`qwen_batch.outputs.shards`), published whole; rows wait for their shard."""

    def __init__(
        self,
        output: Folder,
        kind: str,
        image_format: ImageFormat,
        rows_per_shard: int,
        worker: int = 0,
        workers: int = 1,
        max_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.output, self.kind, self.format = output, kind, image_format
        self.writer = ShardWriter(output, kind, rows_per_shard, max_bytes, worker=worker, workers=workers)
        self._waiting: dict[str, Record] = {}  # rows in the open shard: their records are stored once it is published
        self._lock = threading.Lock()
        self.counts = ShardCounts()

    def put(self, request: Request, record: Record, data: bytes) -> list[Record]:
        record.status = OK
        sample = Sample(
            id=request.id,
            image=data,
            extension=self.format.extension,
            record=dataclasses.asdict(record),
            prompt=request.prompt,
        )
        with self._lock:
            self._waiting[request.id] = record
        try:
            published = self.writer.add(sample)
        except ShardPublishError as error:
            return self._failed(error)
        return self._stored(published)

    def close(self) -> list[Record]:
        try:
            published = self.writer.close()
        except ShardPublishError as error:
            return self._failed(error)
        return self._stored(published)

    def abort(self) -> None:
        """Drop the open shard (a run stopping on an error): its rows are generated again next time."""
        self.writer.abort()

    def _stored(self, published: list[PublishedShard]) -> list[Record]:
        stored = []
        with self._lock:
            for shard in published:
                self.counts.shards += 1
                self.counts.rows += shard.rows
                self.counts.bytes += shard.bytes
                for row_id, key in shard.keys.items():
                    record = self._waiting.pop(row_id)
                    record.shard, record.key = shard.url, key
                    stored.append(record)
        return stored

    def _failed(self, error: ShardPublishError) -> list[Record]:
        with self._lock:
            records = [self._waiting.pop(row_id) for row_id in error.ids if row_id in self._waiting]
        for record in records:
            record.status, record.error = FAILED, f"publishing its shard failed: {error}"
            record.shard = record.key = None
        return records


def reconcile_shards(
    output: Folder, kind: str, requests: list[Request], fingerprints: dict[str, str], records: dict[str, Record]
) -> tuple[set[str], list[Record]]:
    """Before generating into shards: which of `requests` are done, and the records to adopt.

    A row is done when a published shard holds it with its current fingerprint. Such a row that the results do
    not know (the run was killed after publishing its shard) is adopted: its record, rebuilt from the shard, is
    returned to be written as a part file. A row whose fingerprint changed, and any second copy of a row, is
    removed from its shard now, before the row is generated again."""
    scan = scan_shards(output, kind)
    removals = scan.removals()
    done, adopted = set(), []
    for request in requests:
        row = scan.rows.get(request.id)
        if row is None:
            continue
        if row.fingerprint != fingerprints[request.id]:
            removals.setdefault(row.shard, set()).add(request.id)
            continue
        done.add(request.id)
        known = records.get(request.id)
        if known is None or known.status != OK or known.fingerprint != row.fingerprint or known.key != row.key:
            fields = {field.name for field in dataclasses.fields(Record)}
            record = Record(**{name: value for name, value in row.record.items() if name in fields})
            record.status, record.shard, record.key = OK, output.display(row.shard), row.key
            adopted.append(record)
    if removals:
        log.info("taking %d changed or repeated rows out of %d shards", sum(map(len, removals.values())), len(removals))
        remove_rows(output, kind, removals)
    return done, adopted
