"""How the flows' tasks treat their inputs, results and failures.

- **No caching, no persisted results** (`TASK_OPTIONS`): a task's inputs hold the run's plan (and
  through it thousands of rows); the models live in the worker's process and are never arguments or
  results. So Prefect never hashes an input nor serialises a result: no tensor or model can reach it.
  A task's real outcome is on storage (images, part files, the cache, results.parquet).
- **Retries only for storage I/O that may pass** (`STORAGE_RETRIES`): a network error, a timeout,
  throttling, a 5xx. The storage layer (`qwen_batch.io.storage`) already retries those a few times within
  seconds; a task retry, 10 to 40 s later, rides out a longer outage. A missing file, denied access,
  an invalid manifest or parameter, a model that does not load, or a row that failed to generate
  (recorded in the results, never raised) are not retried: the next attempt would fail the same way.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from qwen_batch.errors import StorageError
from qwen_batch.io.storage import is_transient


def is_transient_storage_failure(error: BaseException | None) -> bool:
    """True when the failure is a storage read or write that failed for a reason that may pass."""
    while error is not None:
        if isinstance(error, StorageError):
            return error.__cause__ is not None and is_transient(error.__cause__)
        error = error.__cause__  # e.g. the ManifestError raised from the StorageError of reading it
    return False


def retry_on_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """A task's `retry_condition_fn`: retry when it failed on transient storage I/O, and only then."""
    try:
        state.result()
    except Exception as error:
        return is_transient_storage_failure(error)
    return False


TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
STORAGE_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=10),  # about 10 s, 20 s, 40 s
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_storage_errors,
}
