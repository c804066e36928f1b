"""Storage: transient failures are retried with backoff, permanent ones are not, writes are atomic."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from qwen_batch.cli import main
from qwen_batch.errors import NotFoundError, StorageError
from qwen_batch.io.storage import Folder, s3_storage_options
from tests.support import small_row, write_manifest


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory store whose next `failures` calls raise `error`, like a bucket having a bad minute."""

    protocol = "flaky"
    failures = 0
    error: Exception = ConnectionError("connection reset by peer")
    calls = 0

    def _maybe_fail(self):
        type(self).calls += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            raise type(self).error

    def pipe_file(self, path, value, **kwargs):
        self._maybe_fail()
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail()
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr("qwen_batch.io.storage.RETRY_BASE_DELAY", 0.001)
    FlakyFileSystem.failures, FlakyFileSystem.calls = 0, 0
    FlakyFileSystem.store.clear()
    FlakyFileSystem.pseudo_dirs.clear()
    FlakyFileSystem.pseudo_dirs.append("")
    return FlakyFileSystem


def test_transient_errors_are_retried_until_the_write_lands(flaky):
    folder = Folder("flaky://bucket/out")
    flaky.failures = 3
    folder.write_bytes("images/a.png", b"png")
    assert flaky.calls == 4
    assert folder.read_bytes("images/a.png") == b"png"


def test_a_store_that_stays_down_gives_up_with_the_url(flaky):
    folder = Folder("flaky://bucket/out")
    flaky.failures = 100
    with pytest.raises(StorageError, match=r"flaky://bucket/out/a: ConnectionError: .* \(after 4 attempts\)"):
        folder.write_bytes("a", b"x")


def test_permanent_errors_are_not_retried(flaky):
    folder = Folder("flaky://bucket/out")
    flaky.failures, flaky.error = 100, PermissionError("Forbidden")
    with pytest.raises(StorageError, match="access denied"):
        folder.read_bytes("a")
    assert flaky.calls == 1
    flaky.failures = 0
    with pytest.raises(NotFoundError, match="no such file"):
        folder.read_bytes("missing")


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    folder.write_bytes("images/a.png", b"first")
    folder.write_bytes("images/a.png", b"second")
    assert (tmp_path / "out" / "images" / "a.png").read_bytes() == b"second"
    assert [path.name for path in (tmp_path / "out" / "images").iterdir()] == ["a.png"]
    assert folder.list_files("images", ".png") == ["images/a.png"]


def test_s3_options_apply_to_s3_urls_only(tmp_path):
    options = s3_storage_options(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", anonymous=True)
    assert options == {
        "s3": {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}, "anon": True}
    }
    folder = Folder(str(tmp_path), options)  # a local folder ignores them
    folder.write_bytes("x", b"1")
    assert folder.read_bytes("x") == b"1"
    assert s3_storage_options() == {}


def test_an_image_that_cannot_be_written_fails_its_row_and_the_others_still_land(tmp_path, tiny_model, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a cat"), small_row("b", "a dog")])
    output = tmp_path / "out"
    (output / "images" / "b.png").mkdir(parents=True)  # nothing can be written at b.png
    assert main(["run", str(manifest), "--output", str(output), "--device", "cpu", "--batch-size", "2"]) == 1
    rows = {row["id"]: row for row in pq.read_table(output / "results.parquet").to_pylist()}
    assert rows["a"]["status"] == "ok" and (output / "images" / "a.png").is_file()
    assert rows["b"]["status"] == "failed" and "writing the image failed" in rows["b"]["error"]
    assert "row 1 id='b' failed: writing the image failed" in capsys.readouterr().out
