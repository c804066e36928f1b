"""Where an edit row's input image may come from: the manifest's folder and the allowed prefixes only."""

from __future__ import annotations

import os

import pytest

from qwen_batch.io.input_urls import InputLocationError, InputPolicy


def test_relative_paths_resolve_against_the_manifest_folder_and_may_not_climb_out(tmp_path):
    (tmp_path / "job" / "img").mkdir(parents=True)
    policy = InputPolicy.for_manifest(str(tmp_path / "job" / "m.parquet"))
    assert policy.resolve("img/a.png") == str((tmp_path / "job" / "img" / "a.png").resolve())
    assert policy.resolve("file://" + str(tmp_path / "job" / "img" / "a.png")).endswith("/job/img/a.png")
    for outside in ("../secret.png", "img/../../secret.png", "/etc/passwd", "file:///etc/passwd", "s3://bucket/a.png"):
        with pytest.raises(InputLocationError, match="outside the allowed input locations"):
            policy.resolve(outside)
    for broken in ("", "   ", "img/a\x00.png"):
        with pytest.raises(InputLocationError):
            policy.resolve(broken)


def test_a_symbolic_link_out_of_the_manifest_folder_is_refused(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", tmp_path / "job" / "innocent.png")
    policy = InputPolicy.for_manifest(str(tmp_path / "job" / "m.parquet"))
    with pytest.raises(InputLocationError, match="outside"):
        policy.resolve("innocent.png")


def test_a_manifest_on_s3_reads_its_own_prefix_and_the_allowed_ones_only():
    policy = InputPolicy.for_manifest("s3://bucket/jobs/m.parquet", ["s3://uploads/2026/"])
    assert policy.resolve("in/a.png") == "s3://bucket/jobs/in/a.png"
    assert policy.resolve("s3://uploads/2026/b.png") == "s3://uploads/2026/b.png"
    for outside in ("../other/a.png", "s3://bucket/jobs-evil/a.png", "s3://uploads/2025/b.png", "/etc/passwd"):
        with pytest.raises(InputLocationError, match="outside"):
            policy.resolve(outside)
