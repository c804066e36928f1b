"""Where a model comes from, and a content identity for it.

A model is named by a hub id (`Qwen/Qwen-Image`), a local diffusers-format folder, or `tiny`: the
random-weight model qwen-batch builds itself (no download), used by the demo and the tests.

The identity of a component (for example the text encoder and tokenizer) keys the embedding cache
and the resume fingerprints: it is derived from the files' names, sizes and the bytes at both ends of
each file, so the same weights give the same identity on every machine (a cache on S3 is shared by
all workers) while regenerated or replaced weights give a new one, without hashing 40 GB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ModelError

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImagePipeline

TINY_MODEL_NAME = "tiny"
HOME_ENV = "QWEN_BATCH_HOME"  # roots every path qwen-batch keeps for itself
_SAMPLE_BYTES = 1 << 16

ENCODER_COMPONENTS = ("text_encoder", "tokenizer")
DENOISER_COMPONENTS = ("transformer", "vae", "scheduler")


def qwen_batch_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "qwen-batch")


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user wrote it
    location: str  # what `from_pretrained` receives: a local folder or a hub id

    @property
    def is_tiny(self) -> bool:
        return self.name == TINY_MODEL_NAME

    @property
    def local_folder(self) -> Path | None:
        path = Path(self.location)
        return path if path.is_dir() else _cached_hub_snapshot(self.location)

    def identity(self, components: tuple[str, ...]) -> str:
        """A short content hash of the given components (sub-folders of the diffusers layout)."""
        folder = self.local_folder
        digest = hashlib.sha256()
        if folder is None:
            # Not on disk yet: `from_pretrained` will download it; the hub id is all we know.
            digest.update(f"hub:{self.location}".encode())
            return digest.hexdigest()[:24]
        for component in components:
            for file in sorted((folder / component).rglob("*")):
                if file.is_file():
                    digest.update(_file_signature(folder, file))
        return digest.hexdigest()[:24]


def load_pipeline(source: ModelSource, dtype: torch.dtype, **components: None) -> QwenImagePipeline:
    """`QwenImagePipeline.from_pretrained`, with the components passed as None left out.

    Safetensors only: pickled weights could run code when loaded.
    """
    from diffusers import QwenImagePipeline

    try:
        return QwenImagePipeline.from_pretrained(source.location, dtype=dtype, use_safetensors=True, **components)
    except (OSError, ValueError) as error:
        hint = (
            ""
            if source.local_folder is not None
            else " It is not on this machine and could not be downloaded: download it first "
            f"(hf download {source.location}) or pass a local diffusers folder to --model."
        )
        raise ModelError(f"cannot load model {source.name!r}: {error}.{hint}") from error


def resolve_model(name: str) -> ModelSource:
    """Turn `--model` into a source; `tiny` is built on first use under $QWEN_BATCH_HOME."""
    if name == TINY_MODEL_NAME:
        return ModelSource(name=name, location=str(ensure_tiny_model()))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is not a diffusers model folder (no model_index.json). "
                "Point --model at a folder written by save_pretrained, or use a hub id such as Qwen/Qwen-Image."
            )
        return ModelSource(name=name, location=str(path.resolve()))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSource(name=name, location=name)
    raise ModelError(f"model {name!r} is neither a local folder nor a hub id like 'Qwen/Qwen-Image'")


def ensure_tiny_model() -> Path:
    """The tiny model's folder, written once; concurrent first uses race safely to one result."""
    from qwen_batch.tiny_model import TINY_MODEL_REVISION, TINY_MODEL_SEED, write_tiny_model

    target = qwen_batch_home() / "models" / f"tiny-qwen-image-r{TINY_MODEL_REVISION}-seed{TINY_MODEL_SEED}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    write_tiny_model(staging, seed=TINY_MODEL_SEED)
    try:
        staging.rename(target)
    except OSError:
        # Another process finished first; its copy is identical (same seed), keep it.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _file_signature(root: Path, file: Path) -> bytes:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(_SAMPLE_BYTES)
        if size > 2 * _SAMPLE_BYTES:
            handle.seek(size - _SAMPLE_BYTES)
        tail = handle.read(_SAMPLE_BYTES)
    signature = hashlib.sha256(head + tail).hexdigest()
    return f"{file.relative_to(root).as_posix()}\0{size}\0{signature}\n".encode()


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model if it was downloaded before (no network)."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None
