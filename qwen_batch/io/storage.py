"""Folders at any fsspec URL: the one module that reads and writes files.

Everything qwen-batch stores (images, results, part files, the embedding cache) goes through a
`Folder`, so a local path, `file://`, `s3://`, `gs://` or `memory://` behave the same to the rest
of the code.

- Writes are atomic per object: a reader never sees half a file. On local disk that is a write to
  a temporary name in the same directory and `os.replace`; an object store's PUT is atomic. The
  temporary file of a killed writer is never listed, and `remove_stale_temporaries` deletes it later.
- Transient failures (connection resets, timeouts, throttling, 5xx) are retried with exponential
  backoff; permanent ones (missing bucket or object, access denied) are not.
- Every failure becomes a `StorageError` that names the URL and the likely fix.

Connection settings are *storage options* keyed by protocol (`{"s3": {"endpoint_url": ...}}`), so a
local manifest and an S3 output can be used together. Anything not given comes from the standard
places (for S3: AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION, ~/.aws/config and credentials). Storage
options are never logged or written anywhere: they may hold credentials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from qwen_batch.errors import NotFoundError, StorageError

log = logging.getLogger(__name__)

StorageOptions = dict[str, dict[str, Any]]  # protocol -> fsspec filesystem options
TEMP_PREFIX = ".tmp-"
# A temporary file this old was left by a killed writer: no write of one object takes an hour.
STALE_TEMPORARY_SECONDS = 3600
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY = 0.5  # seconds; doubles after each failed attempt

T = TypeVar("T")

# Errors that retrying cannot fix: the answer will be the same next time.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def s3_storage_options(
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    anonymous: bool = False,
) -> StorageOptions:
    """Options for S3 and S3-compatible stores (MinIO, R2, Ceph); unset ones come from the environment."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if region:
        options["client_kwargs"] = {"region_name": region}
    if profile:
        options["profile"] = profile
    if anonymous:
        options["anon"] = True
    return {"s3": options} if options else {}


def _protocol(url: str) -> str:
    protocol, _ = fsspec.core.split_protocol(url)
    return {"s3a": "s3", "file": "file", None: "file"}.get(protocol, protocol)


def _url_to_fs(url: str, options: StorageOptions | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **(options or {}).get(_protocol(url), {}))
    except ImportError as error:
        raise StorageError(
            f"{url}: {error} (install the fsspec package for this scheme, e.g. s3fs for s3://)"
        ) from error
    except ValueError as error:
        raise StorageError(f"cannot open {url!r}: {error}") from error


def display_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The form users recognise: a plain path on local disk, `scheme://...` elsewhere."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: network trouble, timeouts, throttling and server errors, not 'no' answers."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    name = type(error).__name__
    # An endpoint that refuses connections was already retried by s3fs; a wrong URL stays wrong.
    if name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "EndpointConnectionError"):
        return False
    # botocore's connection errors are not OSErrors; s3fs passes some through untranslated.
    return isinstance(error, OSError) or name.endswith(("ConnectionError", "TimeoutError", "ReadTimeoutError"))


def describe(error: BaseException, url: str) -> str:
    """One line naming the URL, what went wrong, and the likely fix."""
    text = str(error) or type(error).__name__
    name = type(error).__name__
    if isinstance(error, FileNotFoundError):
        if "bucket does not exist" in text.lower():
            return f"{url}: the bucket does not exist; create it or fix the bucket name in the URL"
        return f"{url}: no such file"
    if isinstance(error, PermissionError):
        if "://" not in url or url.startswith("file://"):  # a local path: file modes, not credentials
            user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "qwen-batch's user"
            return (
                f"{url}: access denied ({text}); the user running qwen-batch ({user}) may not write or read "
                "there: choose a folder it can write, or change the folder's owner or mode"
            )
        return (
            f"{url}: access denied ({text}); check the credentials (AWS_PROFILE or --s3-profile, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket's policy"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"{url}: no credentials found; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or pass --s3-anonymous for a public bucket"
        )
    if name == "EndpointConnectionError" or "Could not connect to the endpoint" in text:
        return (
            f"{url}: cannot reach the storage endpoint ({text}); check --s3-endpoint-url or "
            "AWS_ENDPOINT_URL and that the server is up"
        )
    if isinstance(error, IsADirectoryError):
        return f"{url}: is a folder, not a file"
    return f"{url}: {name}: {text}"


def with_retries(
    operation: Callable[[], T], url: str, attempts: int | None = None, base_delay: float | None = None
) -> T:
    """Run a storage operation, retrying transient failures with exponential backoff."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                kind = NotFoundError if isinstance(error, FileNotFoundError) else StorageError
                raise kind(describe(error, url) + suffix) from error
            log.warning("%s: %s; retrying in %.1f s", url, type(error).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def read_url(url: str, storage_options: StorageOptions | None = None) -> bytes:
    """Read one whole object (a manifest, an input image)."""
    fs, path = _url_to_fs(url, storage_options)
    return with_retries(lambda: fs.cat_file(path), url)


def url_info(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """An object's size and version markers (`size`, and `ETag` or `mtime` where the store has them)."""
    fs, path = _url_to_fs(url, storage_options)
    return with_retries(lambda: fs.info(path), url)


def download(url: str, target: str, storage_options: StorageOptions | None = None) -> None:
    """Copy one object to a local file, streamed (a 20 GB checkpoint never passes through memory whole),
    under a temporary name first: `target` exists only once it is complete."""
    fs, path = _url_to_fs(url, storage_options)
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(target)}")
    try:
        with_retries(lambda: fs.get_file(path, temporary), url)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class Folder:
    """A folder at an fsspec URL; paths given to its methods are relative to it, with `/` separators."""

    def __init__(self, url: str, storage_options: StorageOptions | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = _url_to_fs(url, self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Folder({self.display()!r})"

    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def display(self, relative: str = "") -> str:
        """The URL of `relative` as written to results and shown to users."""
        return display_url(self.fs, self.path(relative))

    def child(self, relative: str) -> Folder:
        child = Folder.__new__(Folder)
        child.url = posixpath.join(self.url.rstrip("/"), relative)
        child.storage_options = self.storage_options
        child.fs, child.root, child.is_local = self.fs, self.path(relative), self.is_local
        return child

    def _retrying(self, operation: Callable[[], T], relative: str) -> T:
        return with_retries(operation, self.display(relative))

    def exists(self, relative: str) -> bool:
        return self._retrying(lambda: self.fs.exists(self.path(relative)), relative)

    def read_bytes(self, relative: str) -> bytes:
        return self._retrying(lambda: self.fs.cat_file(self.path(relative)), relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole object atomically; parent folders are created as needed."""
        target = self.path(relative)
        if self.is_local:
            self._retrying(lambda: _write_local_atomically(target, data), relative)
        else:
            self._retrying(lambda: self.fs.pipe_file(target, data), relative)

    def remove(self, relative: str) -> None:
        with contextlib.suppress(StorageError):
            self._retrying(lambda: self.fs.rm_file(self.path(relative)), relative)

    def check_writable(self) -> None:
        """Fail now, before any model loads, if this folder cannot be written (missing bucket, denied access)."""
        probe = f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"")
        self.remove(probe)

    def remove_stale_temporaries(self, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete the temporary files killed writers left in this folder tree; return how many.

        Local disk only (an object store's PUT leaves nothing behind). Only files older than
        `older_than` seconds go: a younger one may be a write in progress in another process.
        """
        if not self.is_local:
            return 0
        cutoff, removed = time.time() - older_than, 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):  # gone already: another run swept or renamed it
                    if name.startswith(TEMP_PREFIX) and os.stat(path).st_mtime < cutoff:
                        os.remove(path)
                        removed += 1
        return removed

    def list_files(self, relative: str = "", suffix: str = "") -> list[str]:
        """Paths (relative to this folder) of the files below `relative`, recursively, sorted.

        One listing call per folder tree, so resume and cache look-ups over thousands of objects cost
        a few requests on object stores, not one per object. Temporary files are never listed.
        """
        base = self.path(relative)

        def find() -> list[str]:
            # Another worker may have written here since this process last listed: no stale cache.
            self.fs.invalidate_cache(base)
            try:
                return self.fs.find(base)
            except FileNotFoundError:
                return []

        prefix = self.root.rstrip("/") + "/"
        names = []
        for path in self._retrying(find, relative):
            name = path[len(prefix) :] if path.startswith(prefix) else path
            if posixpath.basename(name).startswith(TEMP_PREFIX) or not name.endswith(suffix):
                continue
            names.append(name)
        return sorted(names)


def _write_local_atomically(target: str, data: bytes) -> None:
    directory = posixpath.dirname(target)
    os.makedirs(directory, exist_ok=True)
    temporary = posixpath.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(target)}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
