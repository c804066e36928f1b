"""What qwen-batch writes for later runs (tiny models in the cache, adapters, transformer files) is as
readable as the user's umask makes any new file: another user of a shared cache, or the worker image's user
reading files copied from the host, can load it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qwen_batch.io.file_modes import current_umask


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def modes(folder: Path) -> set[tuple[str, int]]:
    return {
        ("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)) for path in [folder, *folder.rglob("*")]
    }


def test_the_umask_is_read_without_changing_it(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_a_tiny_model_in_the_cache_is_readable_as_the_umask_allows(tiny_model: Path):
    mask = current_umask()
    assert modes(tiny_model) == {("dir", 0o777 & ~mask), ("file", 0o666 & ~mask)}


def test_an_adapter_is_written_with_the_umask_not_safetensors_private_mode(tiny_model, tmp_path, umask_027):
    from qwen_batch.tiny.lora import write_tiny_lora

    written = write_tiny_lora(str(tiny_model), tmp_path / "style.safetensors", rank=2)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640  # safetensors alone gives 0600


def test_a_folder_built_once_gets_the_umask_too(tmp_path, umask_027):
    import numpy as np
    from safetensors.numpy import save_file

    from qwen_batch.weights.model_source import write_once

    def write(staging: Path) -> None:
        (staging / "vae").mkdir()
        save_file({"weight": np.zeros(2, dtype=np.float32)}, str(staging / "vae" / "model.safetensors"))

    built = write_once(tmp_path / "model", "vae/model.safetensors", write)
    assert modes(built) == {("dir", 0o750), ("file", 0o640)}


@pytest.mark.parametrize("family", ["qwen_image", "qwen_image21"])
def test_a_tiny_model_written_to_a_folder_the_user_names_keeps_that_folder_mode(family, tmp_path, umask_027):
    """`qwen-batch tiny-model DIR`: the files in DIR get the umask's modes, DIR itself keeps the one it had."""
    if family == "qwen_image":
        from qwen_batch.tiny.model import write_tiny_model
    else:
        from qwen_batch.families.qwen_image21.tiny import write_tiny_model

    folder = tmp_path / "tiny"
    folder.mkdir(mode=0o700)
    write_tiny_model(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    inside = {("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)) for path in folder.rglob("*")}
    assert inside == {("dir", 0o750), ("file", 0o640)}
