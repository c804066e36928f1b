"""Where a model comes from, and a content identity for it.

A model is named by a hub id (`Qwen/Qwen-Image`), a local diffusers-format folder, or the name of a tiny
random-weight model that a family registers (`tiny`, `tiny-edit`, `tiny-edit-plus` for Qwen-Image;
`qwen_batch.families`): built by qwen-batch itself on first use (no download), for the demo and the tests.
Its family (`model_family`) comes from the pipeline class its model_index.json names.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ModelError
from qwen_batch.families import GENERATE, ModelFamily, family_of_pipeline, tiny_model
from qwen_batch.io.file_modes import apply_umask

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImagePipeline

TINY_MODEL_NAME = "tiny"  # the default model: Qwen-Image's tiny text-to-image model
HOME_ENV = "QWEN_BATCH_HOME"  # roots every path qwen-batch keeps for itself
TINY_MODEL_SEED = 0  # the tiny models' weights: the same on every machine, so tests can pin their images
_SAMPLE_BYTES = 1 << 16


def qwen_batch_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "qwen-batch")


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user wrote it
    location: str  # what `from_pretrained` receives: a local folder or a hub id
    # Builds the pipeline instead of `from_pretrained` (same arguments as `load_pipeline`): models made
    # in memory, e.g. the full-size random-weight model of the GPU benchmarks (see `register_model`).
    loader: Callable[..., QwenImagePipeline] | None = field(default=None, compare=False, repr=False)
    # The transformer's config for a model built by `loader` (a model on disk or the hub has its own).
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # The pipeline class of a model built by `loader` (one on disk or the hub names it in model_index.json).
    pipeline_class: str = "QwenImagePipeline"

    @property
    def is_tiny(self) -> bool:
        return tiny_model(self.name) is not None

    @property
    def local_folder(self) -> Path | None:
        path = Path(self.location)
        return path if path.is_dir() else _cached_hub_snapshot(self.location)

    def folder_with(self, components: tuple[str, ...]) -> Path:
        """The local folder of the model, with these components' files in it: a hub model not downloaded
        yet gets them (and only them) downloaded now, as `from_pretrained` would."""
        folder = self.local_folder
        if folder is not None and all((folder / component).is_dir() for component in components):
            return folder
        try:
            from huggingface_hub import snapshot_download

            patterns = ["model_index.json", *(f"{component}/*" for component in components)]
            return Path(snapshot_download(self.location, allow_patterns=patterns))
        except Exception as error:  # offline, unknown repo, no access: say so in one line
            raise _cannot_load(self, error) from error

    def identity(self, components: tuple[str, ...]) -> str:
        """A short content hash of the given components (sub-folders of the diffusers layout)."""
        digest = hashlib.sha256()
        if self.loader is not None:
            digest.update(f"memory:{self.name}".encode())
            return digest.hexdigest()[:24]
        folder = self.local_folder
        if folder is None:
            # Not on disk yet: `from_pretrained` will download it; the hub id is all we know.
            digest.update(f"hub:{self.location}".encode())
            return digest.hexdigest()[:24]
        for component in components:
            for file in sorted((folder / component).rglob("*")):
                if file.is_file():
                    digest.update(_file_signature(folder, file))
        return digest.hexdigest()[:24]

    def transformer_config(self) -> dict[str, Any]:
        """The transformer's `config.json`, without loading weights (a hub model's is downloaded if needed)."""
        if self.loader is not None:
            if self.config is None:
                raise ModelError(f"model {self.name!r} is built in memory without a transformer config")
            return dict(self.config)
        from diffusers import QwenImageTransformer2DModel

        try:
            return dict(QwenImageTransformer2DModel.load_config(self.location, subfolder="transformer"))
        except (OSError, ValueError) as error:
            raise _cannot_load(self, error) from error


def model_index(source: ModelSource) -> dict[str, Any]:
    """The model's `model_index.json`: its pipeline class and the pipeline's own config (2.1-Turbo's
    `sample_sigmas`). A model built in memory has only its class."""
    import json

    if source.loader is not None:
        return {"_class_name": source.pipeline_class}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = source.local_folder
    try:
        if folder is None:  # a hub model not on this machine: that file alone (no diffusers, so no torch)
            folder = Path(hf_hub_download(source.location, "model_index.json")).parent
        return json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError, EntryNotFoundError) as error:
        raise _cannot_load(source, error) from error


def pipeline_class_name(source: ModelSource) -> str:
    """The diffusers pipeline class the model was saved with (`_class_name` in model_index.json), checked
    against the families qwen-batch runs."""
    name = model_index(source).get("_class_name")
    family_of_pipeline(name, source.name)  # a ModelError naming what runs, for any other class
    return name


def model_family(source: ModelSource) -> ModelFamily:
    """The family that runs the model: from its pipeline class, or for a tiny model from its name."""
    registered = tiny_model(source.name)
    if registered is not None and source.loader is None:
        return registered[0]
    return family_of_pipeline(pipeline_class_name(source), source.name)


def load_pipeline(source: ModelSource, dtype: torch.dtype, **components: None) -> QwenImagePipeline:
    """`from_pretrained` of the model's own pipeline class, with the components passed as None left
    out (those the class does not have are ignored, so callers can name `processor` for any model).

    Safetensors only: pickled weights could run code when loaded; remote code is never trusted.
    """
    import inspect

    import diffusers

    if source.loader is not None:
        return source.loader(dtype, **components)
    pipeline = getattr(diffusers, pipeline_class_name(source))
    accepted = inspect.signature(pipeline.__init__).parameters
    components = {name: value for name, value in components.items() if name in accepted}
    try:
        return pipeline.from_pretrained(source.location, dtype=dtype, use_safetensors=True, **components)
    except (OSError, ValueError) as error:
        raise _cannot_load(source, error) from error


def _cannot_load(source: ModelSource, error: Exception) -> ModelError:
    hint = (
        ""
        if source.local_folder is not None
        else " It is not on this machine and could not be downloaded: download it first "
        f"(hf download {source.location}) or pass a local diffusers folder to --model."
    )
    return ModelError(f"cannot load model {source.name!r}: {str(error).rstrip('.')}.{hint}")


_registered: dict[str, ModelSource] = {}


def register_model(source: ModelSource) -> None:
    """Make `--model source.name` resolve to `source` in this process (a model built in memory)."""
    _registered[source.name] = source


def resolve_model(name: str) -> ModelSource:
    """Turn `--model` into a source; the tiny models are built on first use under $QWEN_BATCH_HOME."""
    if name in _registered:
        return _registered[name]
    registered = tiny_model(name)
    if registered is not None:
        family, task = registered
        return ModelSource(name=name, location=str(ensure_tiny_model(task, family)))
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


def ensure_tiny_model(task: str = GENERATE, family: ModelFamily | None = None) -> Path:
    """The folder of a family's tiny model for `task` (Qwen-Image's by default), written once; concurrent first
    uses race safely to one result. The folder name carries the builder's revision, so a changed builder
    writes a new model."""
    from qwen_batch.families import default_family

    family = family or default_family()
    flavour = "" if task == GENERATE else f"-{task}"
    name = f"tiny-{family.name}{flavour}-r{family.tiny_model_revision(task)}-seed{TINY_MODEL_SEED}"
    return write_once(
        qwen_batch_home() / "models" / name,
        "model_index.json",
        lambda staging: family.write_tiny_model(staging, TINY_MODEL_SEED, task),
    )


def write_once(target: Path, marker: str, write: Callable[[Path], object]) -> Path:
    """The folder `target`, written by `write` into a staging folder beside it and renamed into place, unless
    it holds `marker` already: concurrent first uses race safely to one complete result."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    write(staging)
    apply_umask(staging)  # readable by the other users of a shared cache, as a downloaded model is
    try:
        staging.rename(target)
    except OSError:
        # Another process finished first; its copy is identical (same builder and seed), keep it.
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
