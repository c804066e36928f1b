"""Where the transformer's weights come from: the model's own folder, or one file given with --transformer.

The published diffusers layout (`transformer/` in the model folder: a config and safetensors shards) is the
default. `--transformer PATH` takes the transformer from one file instead, the rest (text encoder, tokenizer,
VAE, scheduler, and the transformer's config) from `--model`:

- a safetensors file as ComfyUI and others share them: bf16, fp16 or fp32, or with the blocks' linear
  weights in fp8 e4m3fn (Comfy-Org's `qwen_image_fp8_e4m3fn.safetensors`), optionally with a per-tensor
  `scale_weight`/`weight_scale` each ("fp8 scaled"); keys as diffusers names them, optionally under
  ComfyUI's `model.diffusion_model.` prefix. (diffusers' single-file loader maps Qwen-Image keys one to one,
  so these are exactly the keys `QwenImageTransformer2DModel.from_single_file` takes.)
- a GGUF file (city96's Q8_0 ... Q3_K_M, any type diffusers' GGUF support dequantizes).

A path or any fsspec URL, as for adapters: a remote file is copied once into `$QWEN_BATCH_HOME/transformers/`
(streamed to disk, never whole in memory). Every file is checked before any model loads (format, a pickle
refused, truncation, every tensor of this model's transformer present with its shape, a known storage
type), and hashed once (SHA-256, remembered per path, size and modification time): the hash enters the
rows' fingerprints, so a changed file regenerates its rows, and results and PNG metadata name it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_batch.adapters.loras import module_layout
from qwen_batch.errors import StorageError
from qwen_batch.io.input_urls import canonical
from qwen_batch.io.storage import StorageOptions, download, url_info
from qwen_batch.memory.modes import FLOAT_WEIGHTS, FP8_WEIGHTS, GGUF_WEIGHTS
from qwen_batch.weights.checkpoint_files import (
    GGUF,
    CheckpointError,
    StoredTensor,
    read_safetensors,
    read_tensors,
    sniff,
    storage_summary,
)
from qwen_batch.weights.model_source import ModelSource, qwen_batch_home

log = logging.getLogger(__name__)

# Prefixes other tools save transformer keys under (ComfyUI's checkpoints); stripped before matching.
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# ComfyUI's scaled fp8: one float32 scale per fp8 weight, under either name.
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Also in such files, and not needed here: input scales (qwen-batch scales activations dynamically) and a marker.
IGNORED_SUFFIXES = (".scale_input", ".input_scale")
IGNORED_KEYS = ("scaled_fp8",)
TRANSFORMER_CACHE = "transformers"  # under $QWEN_BATCH_HOME: local copies of remote files
HASH_CACHE = "hashes"  # under $QWEN_BATCH_HOME: SHA-256 of local files, by path, size and mtime
_HASH_CHUNK = 16 * 2**20

# The storage kinds a transformer's weights come in (`TransformerWeights.kind`).


@dataclass(frozen=True)
class TransformerFile:
    """A single transformer file given with --transformer: where it is, what it holds, and its hash."""

    location: str  # canonical path or URL, as given
    path: Path  # the local file read (the file itself, or the cached copy of a remote one)
    format: str  # "safetensors" or "gguf"
    size: int
    sha256: str
    storage: str  # "fp8 e4m3fn", "bf16", "GGUF Q4_K (+F32)", ...

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    @property
    def identity(self) -> str:
        """What enters fingerprints and cache keys: the content, not the place."""
        return f"file:{self.sha256}"

    def describe(self) -> dict[str, Any]:
        """For results and PNG metadata: which file, and its hash."""
        return {"transformer": self.location, "transformer_sha256": self.sha256}


@dataclass
class TransformerWeights:
    """The transformer's tensors by diffusers name, as stored (views of memory-mapped files), with its config."""

    config: dict[str, Any]
    tensors: dict[str, StoredTensor]
    scales: dict[str, float] = field(default_factory=dict)  # fp8 weight name -> per-tensor scale
    file: TransformerFile | None = None
    label: str = ""  # for the log: where the weights come from

    @property
    def kind(self) -> str:
        """float (bf16, fp16 or fp32 weights), fp8 (the blocks' linear weights in fp8) or gguf (quantized)."""
        if any(tensor.is_quantized for tensor in self.tensors.values()):
            return GGUF_WEIGHTS
        if any(tensor.storage == "F8_E4M3" for tensor in self.tensors.values()):
            return FP8_WEIGHTS
        return FLOAT_WEIGHTS

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    def block_nbytes(self) -> int:
        """Bytes of one transformer block as stored (the largest): what streaming moves per block."""
        per_block: dict[str, int] = {}
        for name, tensor in self.tensors.items():
            if name.startswith("transformer_blocks."):
                block = ".".join(name.split(".")[:2])
                per_block[block] = per_block.get(block, 0) + tensor.nbytes
        return max(per_block.values(), default=0)


# --- The model's own folder -----------------------------------------------------------------------------


def published_weights(folder: Path, config: Mapping[str, Any]) -> TransformerWeights:
    """The transformer of a diffusers-layout model folder: `transformer/*.safetensors`, as listed by its
    index (sharded) or the one file."""
    directory = Path(folder) / "transformer"
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["diffusion_pytorch_model.safetensors"]
    tensors: dict[str, StoredTensor] = {}
    for shard in shards:
        if not (directory / shard).is_file():
            raise CheckpointError(f"{directory / shard}: missing (the model folder is incomplete; download it again)")
        tensors.update(read_safetensors(directory / shard))
    weights = TransformerWeights(dict(config), tensors, label=f"{directory} ({len(shards)} files)")
    check_architecture(weights, directory)
    return weights


# --- One file (--transformer) ---------------------------------------------------------------------------


def open_transformer_file(location: str, storage_options: StorageOptions | None = None) -> TransformerFile:
    """Find (and for a remote URL, copy once) the file, check its format, read its header, hash it.
    The architecture check needs the model's config: `file_weights` does it."""
    url = canonical(location)
    path = _local_copy(url, storage_options) if _is_remote(url) else Path(url.removeprefix("file://"))
    if not path.exists():
        raise CheckpointError(f"--transformer {location}: no such file")
    if path.is_dir():
        raise CheckpointError(
            f"--transformer {location}: is a folder; give one .safetensors or .gguf file (a diffusers folder "
            "goes to --model)"
        )
    kind = sniff(path)
    tensors = read_tensors(path)
    if not tensors:
        raise CheckpointError(f"--transformer {location}: holds no tensors")
    return TransformerFile(
        location=url,
        path=path,
        format=kind,
        size=path.stat().st_size,
        sha256=file_sha256(path),
        storage=storage_summary(tensors),
    )


def file_weights(file: TransformerFile, config: Mapping[str, Any]) -> TransformerWeights:
    """The file's tensors by diffusers name, checked against the model's transformer config."""
    tensors, scales = file_tensors(file)
    weights = TransformerWeights(
        dict(config), tensors, scales, file=file, label=f"{file.location} ({file.storage}, sha256 {file.sha256[:12]})"
    )
    check_architecture(weights, file.location)
    return weights


def file_tensors(file: TransformerFile) -> tuple[dict[str, StoredTensor], dict[str, float]]:
    """The file's tensors by diffusers name (ComfyUI's prefix stripped), and its fp8 weights' scales."""
    stored = read_tensors(file.path)
    tensors: dict[str, StoredTensor] = {}
    scale_tensors: dict[str, StoredTensor] = {}
    for key, tensor in stored.items():
        name = _strip_prefix(key)
        if name in IGNORED_KEYS or name.endswith(IGNORED_SUFFIXES):
            continue
        suffix = next((s for s in WEIGHT_SCALE_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            scale_tensors[name.removesuffix(suffix) + ".weight"] = tensor
            continue
        tensors[name] = tensor
    scales = {}
    for weight, tensor in scale_tensors.items():
        if tensor.storage not in ("F32", "F16", "BF16") or len(tensor.tensor().reshape(-1)) != 1:
            raise CheckpointError(
                f"{file.location}: {weight} has a scale of shape {list(tensor.shape)}: only one scale per "
                "tensor (ComfyUI's scaled fp8) is a known quantization"
            )
        if weight not in tensors or tensors[weight].storage != "F8_E4M3":
            raise CheckpointError(f"{file.location}: holds a scale for {weight}, which is not an fp8 weight")
        scales[weight] = float(tensor.tensor().reshape(-1)[0])
    return tensors, scales


def check_architecture(weights: TransformerWeights, where: object) -> None:
    """Every tensor of the model's transformer present with its shape and nothing else: a file of another
    model (or another size of this one) is refused here, with what differs."""
    model = _meta_model(weights.config)
    expected = {name: tuple(parameter.shape) for name, parameter in model.state_dict().items()}
    found = weights.tensors
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    wrong = [
        f"{name} is {list(found[name].shape)} where this model has {list(expected[name])}"
        for name in expected
        if name in found and tuple(found[name].shape) != tuple(expected[name])
    ]
    if not (missing or unexpected or wrong):
        _check_storage(weights, where, set(module_layout(model)))
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} of this model's tensors are missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not this model's (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} have another shape ({wrong[0]})")
    layers = weights.config.get("num_layers")
    raise CheckpointError(
        f"{where}: is not a transformer of this model (a Qwen-Image transformer with {layers} blocks as "
        f"--model's config says): " + "; ".join(problems)
    )


def _check_storage(weights: TransformerWeights, where: object, linear_weights: set[str]) -> None:
    """fp8 only where qwen-batch computes with it as stored: the weights of linear layers."""
    for name, tensor in weights.tensors.items():
        if tensor.storage == "F8_E4M3" and name.removesuffix(".weight") not in linear_weights:
            raise CheckpointError(
                f"{where}: {name} is stored in fp8, which qwen-batch reads for the weights of linear layers only"
            )
        if tensor.is_quantized and name.removesuffix(".weight") not in linear_weights:
            raise CheckpointError(f"{where}: {name} is quantized ({tensor.storage}) but is not a linear layer's weight")


def _meta_model(config: Mapping[str, Any]):
    """The transformer of this config on the meta device: its parameters' names and shapes, no memory."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel.from_config(dict(config))


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_copy(url: str, storage_options: StorageOptions | None) -> Path:
    """A remote file's local copy, made once per version of it (size and ETag or modification time)."""
    try:
        info = url_info(url, storage_options)
    except StorageError as error:
        raise CheckpointError(f"--transformer {url}: {error}") from None
    version = json.dumps([url, info.get("size"), str(info.get("ETag") or info.get("mtime") or "")])
    folder = qwen_batch_home() / TRANSFORMER_CACHE / hashlib.sha256(version.encode()).hexdigest()[:20]
    target = folder / url.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file() and target.stat().st_size == info.get("size"):
        return target
    started = time.perf_counter()
    log.info("transformer: copying %s (%.1f GB) to %s, once", url, (info.get("size") or 0) / 1e9, folder)
    try:
        download(url, str(target), storage_options)
    except StorageError as error:
        raise CheckpointError(f"--transformer {url}: {error}") from None
    log.info("transformer: copied in %.0f s", time.perf_counter() - started)
    return target


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered by path, size and modification time (hashing 20 GB takes a while)."""
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = qwen_batch_home() / HASH_CACHE / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:24] + ".json")
    try:
        cached = json.loads(record.read_text())
        if {key: cached.get(key) for key in stamp} == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    started = time.perf_counter()
    if stat.st_size > 2**30:
        log.info(
            "transformer: hashing %s (%.1f GB) once; its SHA-256 keys the rows' fingerprints", path, stat.st_size / 1e9
        )
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    if stat.st_size > 2**30:
        log.info("transformer: hashed in %.0f s", time.perf_counter() - started)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**stamp, "sha256": sha256}))
    except OSError:
        pass  # not remembered: hashed again next time
    return sha256


def is_gguf(file: TransformerFile | None) -> bool:
    return file is not None and file.format == GGUF


def denoiser_weights(source: ModelSource, file: TransformerFile | None) -> TransformerWeights:
    """The transformer a run's denoise stage loads: the one file given, else the model's own folder (a hub
    model's transformer files are downloaded first, once, as `from_pretrained` would)."""
    config = source.transformer_config()
    if file is not None:
        return file_weights(file, config)
    return published_weights(source.folder_with(("transformer",)), config)
