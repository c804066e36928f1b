"""Writes finished batches (PNG encoding, upload, part file) in the background while the GPU works.

A bounded number of batches is in flight: when the storage is slow the engine waits here rather
than piling decoded images up in RAM. A batch's part file is written after all its images, so every
record in a part file points at a complete image. An image that cannot be written marks its row
`failed` with the error; it is never lost silently. A part file that cannot be written (after the
storage layer's retries) stops the run at the next batch, with that error: what was written stays,
and running again resumes.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from qwen_batch.errors import StorageError
from qwen_batch.io.storage import Folder
from qwen_batch.outputs.png import encode_png
from qwen_batch.run.results import FAILED, IMAGES_FOLDER, OK, Record, ResultStore

if TYPE_CHECKING:
    from collections.abc import Iterable

    from PIL import Image

    from qwen_batch.manifest import Request

log = logging.getLogger(__name__)


class BatchWriter:
    def __init__(self, output: Folder, store: ResultStore, workers: int = 2, max_pending_batches: int = 2):
        self.output, self.store = output, store
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-batch-writer")
        self._slots = threading.BoundedSemaphore(max_pending_batches)
        self._futures: list[Future[list[Record]]] = []
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
        down or refusing writes, and every further batch would be generated only to be lost."""
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _write_batch(
        self, requests: list[Request], images: Iterable[Image.Image], records: list[Record]
    ) -> list[Record]:
        for request, image, record in zip(requests, images, records, strict=True):
            relative = posixpath.join(IMAGES_FOLDER, f"{request.id}.png")
            metadata = {"id": request.id, **request.parameters(), "model": record.model}
            if record.transformer:
                metadata |= {"transformer": record.transformer, "transformer_sha256": record.transformer_sha256}
            if record.input_sha256:
                metadata["input_sha256"] = record.input_sha256
            if record.steps_computed is not None:  # a step cache: how many steps ran in full
                metadata["steps_computed"] = record.steps_computed
                if record.uncond_steps_computed is not None:
                    metadata["uncond_steps_computed"] = record.uncond_steps_computed
            try:
                data = encode_png(image, metadata)
                self.output.write_bytes(relative, data)
            except (StorageError, OSError, ValueError) as error:
                record.status, record.error = FAILED, f"writing the image failed: {error}"
                continue
            record.status, record.image = OK, self.output.display(relative)
            record.sha256 = hashlib.sha256(data).hexdigest()
        return self._write_records(records)

    def _write_records(self, records: list[Record]) -> list[Record]:
        self.store.write_part(records)
        return records

    def drain(self) -> list[Record]:
        """Wait for every queued batch; the records written, in submission order."""
        written: list[Record] = []
        started = time.perf_counter()
        try:
            for future in self._futures:
                written.extend(future.result())
        finally:
            self._futures.clear()
            self.wait_seconds += time.perf_counter() - started
        return written

    def close(self) -> None:
        self._pool.shutdown(wait=True)
