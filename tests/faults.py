"""Faults for the reliability tests, injected from outside the library (it has no test hooks).

- `kill_at(point, nth)`: in a process about to run `qwen_batch.cli.main`, arrange a SIGKILL at a named
  point of the run (`KILL_POINTS`). `cli_process` runs the real CLI in a new process, killed or not.
- `FaultyFileSystem`: an in-memory fsspec store (`faulty://`) whose calls fail on a schedule: a
  transient error every few calls (a bucket having a bad minute), a permanent outage after some
  writes, or access denied to given paths.
- `recording_generate(...)`: a stand-in for `ImageGenerator.generate` that records the batches and
  raises CUDA's OutOfMemoryError for those a test chooses.

Mid-write kills replace `open` inside `qwen_batch.io.storage` (the one module that writes files) with one
whose nth matching file dies after writing half its bytes: exactly what a crash during a write leaves.
"""

from __future__ import annotations

import builtins
import errno
import os
import posixpath
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.implementations.memory import MemoryFileSystem


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DiesMidWrite:
    """A file that writes half of what it is given, makes it durable, then kills the process."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data) -> int:
        self._handle.write(bytes(data)[: len(data) // 2])
        self._handle.flush()
        os.fsync(self._handle.fileno())
        _die()
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()


def _kill_mid_write(matches: Callable[[str], bool], nth: int) -> None:
    import qwen_batch.io.storage

    lock, seen = threading.Lock(), [0]

    def open_that_dies(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        if "w" not in mode or not matches(os.fspath(file)):
            return handle
        with lock:
            seen[0] += 1
            hit = seen[0] == nth
        return _DiesMidWrite(handle) if hit else handle

    qwen_batch.io.storage.open = open_that_dies  # shadows the builtin for that module only


def _kill_on_call(owner: Any, name: str, nth: int, matches: Callable[..., bool] = lambda *a, **k: True) -> None:
    original = getattr(owner, name)
    lock, seen = threading.Lock(), [0]

    def dies_on_nth_call(*args, **kwargs):
        if matches(*args, **kwargs):
            with lock:
                seen[0] += 1
                hit = seen[0] == nth
            if hit:
                _die()
        return original(*args, **kwargs)

    setattr(owner, name, dies_on_nth_call)


def _is_part(path: str) -> bool:
    return "/_parts/" in path


def _kill_at_step(nth: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    _kill_on_call(FlowMatchEulerDiscreteScheduler, "step", nth)


def _kill_at_part_removal(nth: int) -> None:
    from qwen_batch.io.storage import Folder

    _kill_on_call(Folder, "remove", nth, lambda folder, relative: relative.startswith("_parts/"))


def _kill_in_shards(name: str, nth: int) -> None:
    import qwen_batch.outputs.shards

    _kill_on_call(qwen_batch.outputs.shards, name, nth)


def _kill_at_part_write(nth: int) -> None:
    from qwen_batch.run.results import ResultStore

    _kill_on_call(ResultStore, "write_part", nth)


# Where a run can be killed; `nth` counts the matching events of the run.
KILL_POINTS: dict[str, Callable[[int], None]] = {
    # Shard outputs: as the nth sample is added to a shard being filled (in its spool, unpublished).
    "shard-spool": lambda nth: _kill_in_shards("_stored_record", nth),
    # The nth shard complete in its spool, just before it is published.
    "shard-publish": lambda nth: _kill_in_shards("_publish", nth),
    # The nth shard published, before its index and stats files and its rows' part file.
    "shard-sidecar": lambda nth: _kill_in_shards("_write_sidecars", nth),
    # Before the nth part file (a shard's rows, once it is published, with its sidecars).
    "shard-recorded": _kill_at_part_write,
    # Stage 1, mid-write of the nth embedding written to the cache.
    "encode": lambda nth: _kill_mid_write(lambda path: path.endswith(".safetensors"), nth),
    # Stage 2, at the start of the nth scheduler step (between two denoising steps).
    "denoise-step": _kill_at_step,
    # Mid-write of the nth image (after half its bytes).
    "image-write": lambda nth: _kill_mid_write(lambda path: path.endswith(".png"), nth),
    # Mid-write of the nth results part file (its batch's images are complete).
    "part-write": lambda nth: _kill_mid_write(_is_part, nth),
    # Mid-write of results.parquet, at the merge.
    "merge-write": lambda nth: _kill_mid_write(
        lambda path: not _is_part(path) and posixpath.basename(path).endswith("-results.parquet"), nth
    ),
    # After results.parquet is written, before the nth folded part file is removed.
    "merge-cleanup": _kill_at_part_removal,
}


def kill_at(point: str, nth: int = 1) -> None:
    """Arrange for this process to be SIGKILLed at `point` (see `KILL_POINTS`) the nth time it is reached."""
    KILL_POINTS[point](nth)


# What a run imports, imported once by the fork server: each killed run then starts in a fraction of a
# second instead of re-importing torch, diffusers and transformers (several seconds each time).
_PRELOAD = [
    "torch",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "qwen_batch.cli",
    "qwen_batch.run.engine",
    "qwen_batch.pipeline.denoise",
    "qwen_batch.pipeline.encode",
    "tests.faults",
]


@dataclass
class CliProcess:
    exitcode: int | None  # -9 when SIGKILL ended it
    output: str  # what it printed (stdout and stderr)

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


def _main_in_child(cli_args: list[str], log_path: str, kill_point: str | None, nth: int) -> None:
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    if kill_point is not None:
        kill_at(kill_point, nth)
    from qwen_batch.cli import main

    sys.exit(main(cli_args))


def cli_process(
    cli_args: list[str], log_path: Path, kill_point: str | None = None, nth: int = 1, timeout: float = 300
) -> CliProcess:
    """Run `qwen-batch CLI_ARGS` in a new process, SIGKILLed at `kill_point` (see `KILL_POINTS`) if given.

    The process is forked from a fork server that has imported the libraries but run nothing, so it
    is a fresh process in all that matters here (its own memory, threads and open files, all lost
    when it is killed) that starts in a fraction of a second instead of re-importing torch,
    diffusers and transformers. It inherits the environment the fork server started with.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    process = context.Process(target=_main_in_child, args=(cli_args, str(log_path), kill_point, nth))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
    return CliProcess(process.exitcode, Path(log_path).read_text(errors="replace"))


class FaultyFileSystem(MemoryFileSystem):
    """`faulty://`: an in-memory object store that fails on a schedule set by `inject(...)`.

    - every `transient_every`-th call fails with a transient error (connection reset, timeout, a 503
      "slow down"), but the retry of a failed call passes, so the storage layer's retries get through:
      a bucket having a bad minute (with 1, every call fails once);
    - after `down_after_writes` successful writes, every call fails with ConnectionError: an outage
      that outlasts the retries;
    - a write to a path ending with one of `denied` fails with PermissionError (a permanent error).
    """

    protocol = "faulty"
    store: dict = {}  # noqa: RUF012 - its own store, not MemoryFileSystem's shared one
    pseudo_dirs: list = [""]  # noqa: RUF012

    transient_every = 0
    down_after_writes: int | None = None
    denied: tuple[str, ...] = ()
    calls = writes = injected = denials = 0
    _retry_passes: set = set()  # noqa: RUF012
    _lock = threading.Lock()

    _TRANSIENT = (
        lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        lambda: TimeoutError("Read timed out"),
        lambda: OSError(errno.EIO, "503 Slow Down"),
    )

    @classmethod
    def reset(cls):
        """An empty store that does not fail (yet)."""
        import fsspec

        fsspec.register_implementation(cls.protocol, cls, clobber=True)
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        return cls.inject()

    @classmethod
    def inject(cls, transient_every: int = 0, down_after_writes: int | None = None, denied: tuple[str, ...] = ()):
        """Fail from now on as described in the class docstring; counters restart from 0."""
        cls.transient_every, cls.down_after_writes, cls.denied = transient_every, down_after_writes, denied
        cls.calls = cls.writes = cls.injected = cls.denials = 0
        cls._retry_passes = set()
        return cls

    @classmethod
    def recover(cls) -> None:
        """The outage is over and nothing fails any more."""
        cls.inject()

    def _fault(self, operation: str, path: str, writing: bool = False) -> None:
        cls = type(self)
        with cls._lock:
            cls.calls += 1
            if writing and cls.denied and path.endswith(cls.denied):
                cls.denials += 1
                raise PermissionError(errno.EACCES, "Access Denied", path)
            if cls.down_after_writes is not None and cls.writes >= cls.down_after_writes:
                cls.injected += 1
                raise ConnectionError("Could not connect: the store is down")
            key = (operation, path)
            if key in cls._retry_passes:
                cls._retry_passes.discard(key)
            elif cls.transient_every and cls.calls % cls.transient_every == 0:
                cls._retry_passes.add(key)
                cls.injected += 1
                raise cls._TRANSIENT[cls.injected % len(cls._TRANSIENT)]()
            if writing:
                cls.writes += 1

    # Faults are injected at the call the storage layer makes, not at the calls fsspec makes inside it
    # (some of which it catches): one injected fault is one failed storage operation.
    _inside = threading.local()

    def _call(self, operation: str, path: str, call: Callable[[], Any], writing: bool = False) -> Any:
        if getattr(self._inside, "active", False):
            return call()
        self._fault(operation, path, writing)
        self._inside.active = True
        try:
            return call()
        finally:
            self._inside.active = False

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self._call("cat_file", path, lambda: super(FaultyFileSystem, self).cat_file(path, start, end, **kwargs))

    def pipe_file(self, path, value, **kwargs):
        call = lambda: super(FaultyFileSystem, self).pipe_file(path, value, **kwargs)  # noqa: E731
        return self._call("pipe_file", path, call, writing=True)

    def find(self, path, *args, **kwargs):
        return self._call("find", path, lambda: super(FaultyFileSystem, self).find(path, *args, **kwargs))

    def exists(self, path, **kwargs):
        return self._call("exists", path, lambda: super(FaultyFileSystem, self).exists(path, **kwargs))

    def rm_file(self, path):
        return self._call("rm_file", path, lambda: super(FaultyFileSystem, self).rm_file(path))


def recording_generate(calls: list[list[str]], out_of_memory_for: Callable[[list[str]], bool] = lambda ids: False):
    """A replacement for `ImageGenerator.generate` that records each batch's ids in `calls` and raises
    CUDA's OutOfMemoryError, as a GPU would, for the batches `out_of_memory_for(ids)` picks."""
    import torch

    from qwen_batch.pipeline.denoise import ImageGenerator

    real_generate = ImageGenerator.generate

    def generate(self, requests, *args, **kwargs):
        ids = [request.id for request in requests]
        calls.append(ids)
        if out_of_memory_for(ids):
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
            )
        return real_generate(self, requests, *args, **kwargs)

    return generate
