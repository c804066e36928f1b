"""Writes finished batches (image encoding and marks, upload or shard, part file) in the background while the GPU
works.

A bounded number of batches is in flight: when the storage is slow the engine waits here rather
than piling decoded images up in RAM. A part file is written only for records whose image is stored (a file
written, or its shard published: `qwen_batch.outputs.destinations`), so every record in a part file points at a
complete image. A row whose latents or pixels were not finite, or whose image cannot be encoded or written, is
`failed` with the error and gets no image; it is never lost silently. A part file that cannot be written (after
the storage layer's retries) stops the run at the next batch, with that error: what was written stays,
and running again resumes.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from qwen_batch.errors import QwenBatchError
from qwen_batch.outputs.destinations import ImageFiles
from qwen_batch.outputs.encoder import ImageEncoder
from qwen_batch.run.results import FAILED, Record, ResultStore

if TYPE_CHECKING:
    from collections.abc import Iterable

    from PIL import Image

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.denoise.decoded import NotFinite

log = logging.getLogger(__name__)


class BatchWriter:
    def __init__(
        self,
        store: ResultStore,
        destination=None,
        encoder: ImageEncoder | None = None,
        workers: int = 2,
        max_pending_batches: int = 2,
    ):
        self.store = store
        self.encoder = encoder or ImageEncoder()
        self.destination = destination or ImageFiles(store.output, self.encoder.format)
        self.image_bytes = 0  # of the images stored
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-batch-writer")
        self._slots = threading.BoundedSemaphore(max_pending_batches)
        self._futures: list[Future[list[Record]]] = []  # batches still being written, in submission order
        self._written: list[Record] = []  # the records of the batches done
        self._bytes_lock = threading.Lock()
        # Time the caller (the GPU loop) spent blocked on storage: full queue or the final drain.
        self.wait_seconds = 0.0

    def submit(self, requests: list[Request], images: Iterable[Image.Image], records: list[Record]) -> None:
        """Queue a generated batch; blocks while `max_pending_batches` batches are still being written.
        `images` may still be on their way from the GPU (`denoise.DecodedImages`): a writer thread waits."""
        self._enqueue(self._write_batch, requests, images, records)

    def submit_failures(self, records: list[Record]) -> None:
        """Record rows that failed before producing an image: only their part file is written."""
        self._enqueue(self._write_records, records)

    def _enqueue(self, work, *args) -> None:
        self._raise_first_failure()
        started = time.perf_counter()
        self._slots.acquire()
        self.wait_seconds += time.perf_counter() - started
        future = self._pool.submit(work, *args)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _raise_first_failure(self) -> None:
        """Stop the run at the first part file that could not be written even after retries: the store is
        down or refusing writes, and every further batch would be generated only to be lost. Done batches leave
        the list here, so each check costs the batches in flight, not every batch of the run."""
        pending = []
        for future in self._futures:
            if not future.done():
                pending.append(future)
            elif future.exception() is not None:
                raise future.exception()
            else:
                self._written.extend(future.result())
        self._futures = pending

    def _write_batch(
        self, requests: list[Request], images: Iterable[Image.Image | NotFinite], records: list[Record]
    ) -> list[Record]:
        # Here, not at the top: the denoise package imports torch, which the flows keep out of their import.
        from qwen_batch.pipeline.denoise.decoded import NotFinite

        stored: list[Record] = []
        for request, image, record in zip(requests, images, records, strict=True):
            if isinstance(image, NotFinite):  # NaN or infinity: a black or noise image is never written
                record.status, record.error = FAILED, image.message
                stored.append(record)
                continue
            try:
                data = self.encoder.encode(request, image, record)
                record.sha256 = hashlib.sha256(data).hexdigest()
                stored += self.destination.put(request, record, data)
            except (QwenBatchError, OSError, ValueError) as error:
                record.status, record.error = FAILED, f"writing the image failed: {error}"
                stored.append(record)
                continue
            with self._bytes_lock:
                self.image_bytes += len(data)
        return self._write_records(stored)

    def _write_records(self, records: list[Record]) -> list[Record]:
        if records:
            self.store.write_part(records)
        return records

    def drain(self) -> list[Record]:
        """Wait for every queued batch and store what the destination still holds (the last shard); the records
        written since the last drain, in the order they were stored."""
        written, self._written = self._written, []
        started = time.perf_counter()
        try:
            for future in self._futures:
                written.extend(future.result())
            written.extend(self._write_records(self.destination.close()))
        except BaseException:
            self.destination.abort()  # an open shard is never published half-checked
            raise
        finally:
            self._futures.clear()
            self.wait_seconds += time.perf_counter() - started
        return written

    def close(self) -> None:
        self._pool.shutdown(wait=True)
