"""LoRA adapters: what a row asks for, where the files come from, and whether they fit the model.

A manifest row (or the run, for rows that name none) lists adapters as `LoraRef`s: a canonical URL
and a scale. Before any model loads, the run resolves every distinct adapter once (`resolve_adapters`):

- the file is read once per run; one on S3 (or any remote fsspec store) is copied into a local,
  content-addressed cache (`$QWEN_BATCH_HOME/adapters/<sha256>.safetensors`), so stage 2 and every
  batch read it from local disk;
- its SHA-256 becomes part of each row's fingerprint (`LoraRef.sha256`): changing an adapter file
  regenerates its rows on the next run;
- it must be safetensors (a pickled `.bin`/`.pt`/`.ckpt` could run code when loaded), a LoRA that
  diffusers' Qwen-Image loader reads (its own converter takes the diffusers/peft, kohya `lora_unet_`,
  ComfyUI `diffusion_model.` and DiffSynth layouts), and every layer it changes must be a linear layer
  of this model's transformer with the same shape. Otherwise its rows are `invalid` with the reason.

Stage 2 reads the tensors back with `load_adapter`, which checks the hash again: the file fused is the
file that was fingerprinted. Fusing itself lives in `qwen_batch.adapters.fusion`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError, ModelError, QwenBatchError, StorageError
from qwen_batch.io.input_urls import canonical
from qwen_batch.io.storage import Folder, StorageOptions, read_url
from qwen_batch.weights.model_source import qwen_batch_home

if TYPE_CHECKING:
    import torch

    from qwen_batch.weights.model_source import ModelSource

log = logging.getLogger(__name__)

MAX_LORAS_PER_ROW = 8
MIN_LORA_SCALE, MAX_LORA_SCALE = -10.0, 10.0
DEFAULT_LORA_SCALE = 1.0
ADAPTER_CACHE = "adapters"  # under $QWEN_BATCH_HOME
LORA_KEY_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
TRANSFORMER_PREFIX = "transformer."

# (in_features, out_features) of each linear layer of a transformer, by module name.
Layout = Mapping[str, tuple[int, int]]


class AdapterError(QwenBatchError):
    """An adapter file cannot be used with this model; names the file and the reason."""


@dataclass(frozen=True, slots=True)
class LoraRef:
    """One adapter of a row: its canonical URL, its scale and (once read) the SHA-256 of its file."""

    url: str
    scale: float = DEFAULT_LORA_SCALE
    sha256: str = ""

    @property
    def name(self) -> str:
        """The file's name without `.safetensors`: how image tools name a LoRA (`Lora hashes: name: hash`)."""
        base = self.url.rstrip("/").rsplit("/", 1)[-1]
        return base.removesuffix(".safetensors")

    def parameters(self) -> dict[str, object]:
        described: dict[str, object] = {"path": self.url, "scale": self.scale}
        if self.sha256:
            described["sha256"] = self.sha256
        return described


def check_scale(scale: float, label: str = "scale") -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and MIN_LORA_SCALE <= scale <= MAX_LORA_SCALE):
        raise ValueError(f"{label} {scale} is out of range: use a number from {MIN_LORA_SCALE} to {MAX_LORA_SCALE}")
    return scale


def run_lora(location: str, scale: float = DEFAULT_LORA_SCALE, label: str = "--lora") -> LoraRef:
    """A run-wide adapter (`--lora`, the flows' `loras`): the operator's own choice, so it needs no
    `--allow-inputs` (that rule guards against what a manifest names); a relative path is taken from
    the current folder."""
    if not location.strip():
        raise ConfigError(f"{label}: give the adapter's path or URL, e.g. --lora style.safetensors:0.8")
    try:
        scale = check_scale(scale, f"{label} {location!r}: scale")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return LoraRef(url=canonical(location), scale=scale)


def parse_lora_option(text: str) -> LoraRef:
    """`--lora PATH[:SCALE]`: a path or URL, optionally followed by `:scale` (default 1.0)."""
    location, scale = text, DEFAULT_LORA_SCALE
    head, separator, tail = text.rpartition(":")
    if separator and head and _is_number(tail):  # not the colon of s3://...
        location, scale = head, float(tail)
    return run_lora(location, scale)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- Resolving the files of a run, before any model loads ---------------------------------------------


@dataclass
class ResolvedAdapters:
    """What `resolve_adapters` found: the SHA-256 of each usable adapter, the reason for each other."""

    sha256: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def adapter_cache_folder() -> Path:
    return qwen_batch_home() / ADAPTER_CACHE


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(ref: LoraRef) -> Path:
    """Where stage 2 reads the adapter: the file itself when local, its cached copy when remote."""
    if is_remote(ref.url):
        return adapter_cache_folder() / f"{ref.sha256}.safetensors"
    return Path(ref.url.removeprefix("file://"))


def resolve_adapters(urls: Iterable[str], storage_options: StorageOptions, layout: Layout) -> ResolvedAdapters:
    """Read, hash and check every distinct adapter once (see the module's docstring)."""
    import time

    started = time.perf_counter()
    resolved = ResolvedAdapters()
    for url in dict.fromkeys(urls):
        try:
            data = _fetch(url, storage_options)
            sha256 = hashlib.sha256(data).hexdigest()
            if is_remote(url):
                _keep_local_copy(data, sha256)
            inspect_adapter(data, layout)
        except AdapterError as error:
            resolved.problems[url] = f"{url}: {error}"
            continue
        resolved.sha256[url] = sha256
    resolved.seconds = time.perf_counter() - started
    if resolved.sha256 or resolved.problems:
        log.info(
            "adapters: %d usable, %d unusable, read and checked in %.1f s",
            len(resolved.sha256),
            len(resolved.problems),
            resolved.seconds,
        )
    return resolved


def _fetch(url: str, storage_options: StorageOptions) -> bytes:
    if not is_remote(url):
        path = url.removeprefix("file://")
        if not os.path.exists(path):
            raise AdapterError("not found; check the path (relative paths are taken from the manifest's folder)")
        if os.path.isdir(path):
            raise AdapterError("is a folder; give the adapter's .safetensors file")
    try:
        return read_url(url, storage_options)
    except StorageError as error:
        raise AdapterError(f"cannot be read: {error}") from error


def _keep_local_copy(data: bytes, sha256: str) -> None:
    folder = Folder(str(adapter_cache_folder()))
    name = f"{sha256}.safetensors"
    if not folder.exists(name):
        folder.write_bytes(name, data)  # atomic: concurrent shards race to identical bytes


def inspect_adapter(data: bytes, layout: Layout) -> set[str]:
    """The names of the transformer's linear layers the adapter changes; `AdapterError` if it cannot be used."""
    return _targets(_converted(_tensors(data)), layout)


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterError(
            f"is not a safetensors file ({error}); adapters are read from safetensors only, since a pickled "
            ".bin/.pt/.ckpt file can run code when loaded: convert it (or download its .safetensors version)"
        ) from None
    if not tensors:
        raise AdapterError("holds no tensors")
    return tensors


def _converted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own reading of a Qwen-Image LoRA: non-diffusers layouts converted, alphas folded in."""
    from diffusers import QwenImagePipeline

    try:
        converted = QwenImagePipeline.lora_state_dict(dict(tensors))
    except (ValueError, KeyError, RuntimeError, IndexError) as error:
        raise AdapterError(f"is not a LoRA that diffusers can read for Qwen-Image ({error})") from None
    not_lora = [key for key in converted if "lora" not in key]
    if not_lora:
        raise AdapterError(
            f"is not a LoRA: keys such as {not_lora[0]!r} hold no lora_A/lora_B (or lora_down/lora_up) weights"
        )
    return converted


def _targets(converted: dict[str, torch.Tensor], layout: Layout) -> set[str]:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    unmatched: list[str] = []
    for key, tensor in converted.items():
        suffix = next((suffix for suffix in LORA_KEY_SUFFIXES if key.endswith(suffix)), None)
        module = key.removeprefix(TRANSFORMER_PREFIX).removesuffix(suffix or "")
        if suffix is None or not key.startswith(TRANSFORMER_PREFIX) or module not in layout:
            unmatched.append(key)
            continue
        shapes.setdefault(module, {})[suffix] = tuple(tensor.shape)
    if unmatched:
        where = "no layer" if len(unmatched) == len(converted) else f"no layer for {len(unmatched)} of its tensors"
        raise AdapterError(
            f"matches {where} of this model's transformer (e.g. {unmatched[0]!r}): it is an adapter for another "
            "model or layout; Qwen-Image LoRAs name layers such as transformer_blocks.0.attn.to_q"
        )
    for module, found in sorted(shapes.items()):
        in_features, out_features = layout[module]
        down, up = found.get(".lora_A.weight"), found.get(".lora_B.weight")
        if down is None or up is None:
            raise AdapterError(f"has only one half (lora_A or lora_B) for layer {module}")
        if len(down) != 2 or len(up) != 2 or down[1] != in_features or up[0] != out_features or up[1] != down[0]:
            raise AdapterError(
                f"does not fit layer {module}: lora_A {list(down)} and lora_B {list(up)} against a layer of "
                f"{in_features} inputs and {out_features} outputs: an adapter for another model size"
            )
    return set(shapes)


def load_adapter(ref: LoraRef) -> dict[str, torch.Tensor]:
    """The adapter's tensors as stored, from the local copy, checked against the SHA-256 the run resolved."""
    from safetensors.torch import load

    path = local_path(ref)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AdapterError(f"{ref.url}: cannot be read ({error}); run again") from error
    if ref.sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise AdapterError(f"{ref.url}: changed since this run checked it; run again to use the new file")
    return load(data)


def adapter_targets(ref: LoraRef, layout: Layout) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The adapter's tensors as diffusers reads them (converted to its layout, alphas folded in: what
    `load_lora_weights` takes without converting again) and the transformer layers they change."""
    converted = _converted(load_adapter(ref))
    return converted, _targets(converted, layout)


# --- The model side: which layers an adapter may change ----------------------------------------------


def transformer_layout(source: ModelSource) -> dict[str, tuple[int, int]]:
    """The linear layers of the model's transformer, built from its config on the meta device (no weights)."""
    return layout_of_config(source.transformer_config())


def layout_of_config(config: Mapping[str, object]) -> dict[str, tuple[int, int]]:
    """The linear layers of the transformer `config` describes: the class its `_class_name` names (Qwen-Image-2.1's
    `QwenImage21Transformer2DModel`), Qwen-Image's `QwenImageTransformer2DModel` for a config that names none."""
    import torch

    with torch.device("meta"):
        model = transformer_class(config).from_config(dict(config))
    return module_layout(model)


def transformer_class(config: Mapping[str, object]) -> type:
    """The diffusers class of a transformer config (its `_class_name`), Qwen-Image's when it names none."""
    import diffusers

    name = config.get("_class_name") or "QwenImageTransformer2DModel"
    model_class = getattr(diffusers, str(name), None)
    if not isinstance(model_class, type) or not issubclass(model_class, diffusers.ModelMixin):
        raise ModelError(
            f"the model's transformer config names the class {name!r}, which this diffusers "
            f"({diffusers.__version__}) does not have: adapters cannot be checked against it"
        )
    return model_class


def module_layout(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    import torch

    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
