"""Folders at any fsspec URL: the one module that reads and writes files.

Everything qwen-batch stores (images, results, part files, the embedding cache) goes through a
`Folder`, so a local path, `file://`, `s3://` or `memory://` behave the same to the rest of the code.
Writes are atomic per object: a reader never sees half a file. On local disk that is a write to a
temporary name in the same directory followed by `os.replace`; object stores make a PUT atomic.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from qwen_batch.errors import StorageError

TEMP_PREFIX = ".tmp-"


def _url_to_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as error:
        raise StorageError(f"cannot open {url!r}: {error}") from error


def display_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The form users recognise: a plain path on local disk, `scheme://...` elsewhere."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def read_url(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read one whole object (a manifest, an input image)."""
    fs, path = _url_to_fs(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise StorageError(f"{url}: no such file") from error
    except IsADirectoryError as error:
        raise StorageError(f"{url}: is a folder, not a file") from error
    except PermissionError as error:
        raise StorageError(f"{url}: permission denied") from error


class Folder:
    """A folder at an fsspec URL; paths given to its methods are relative to it, with `/` separators."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
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

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError as error:
            raise StorageError(f"{self.display(relative)}: no such file") from error

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole object atomically; parent folders are created as needed."""
        target = self.path(relative)
        try:
            if self.is_local:
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
            else:
                self.fs.pipe_file(target, data)
        except OSError as error:
            raise StorageError(f"cannot write {self.display(relative)}: {error}") from error

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(relative))

    def list_files(self, relative: str = "", suffix: str = "") -> list[str]:
        """Paths (relative to this folder) of the files below `relative`, recursively, sorted.

        One listing call per folder tree, so resume and cache look-ups over thousands of objects cost
        a few requests on object stores, not one per object. Temporary files are never listed.
        """
        base = self.path(relative)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        names = []
        for path in found:
            name = path[len(prefix) :] if path.startswith(prefix) else path
            if posixpath.basename(name).startswith(TEMP_PREFIX) or not name.endswith(suffix):
                continue
            names.append(name)
        return sorted(names)
