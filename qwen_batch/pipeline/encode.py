"""Stage 1: encode every distinct text with the Qwen2.5-VL text encoder into the embedding cache.

Only the tokenizer and text encoder are loaded (the 20 B transformer and the VAE are not), texts
already cached are skipped, and the rest are encoded in batches of similar token length so little
compute goes to padding. Encoding goes through diffusers' own `encode_prompt`, so the template, the
dropped template tokens and the 1,024-token limit are exactly the pipeline's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ModelError
from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
from qwen_batch.io.input_images import DEFAULT_MAX_PIXELS
from qwen_batch.io.storage import Folder, StorageOptions
from qwen_batch.memory.device import gpu_memory_gib, release_memory, reset_peak_memory
from qwen_batch.memory.modes import BF16
from qwen_batch.memory.oom import run_in_halves
from qwen_batch.memory.placement import place_text_encoder
from qwen_batch.pipeline.embedding_cache import EmbeddingCache, cache_namespace
from qwen_batch.progress import Progress, Silent
from qwen_batch.stats import Stats, peak
from qwen_batch.weights.model_source import ModelSource, load_pipeline

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 1024  # the pipeline's limit after the template tokens are dropped


@dataclass
class EncodeStats(Stats):
    texts: int = 0  # distinct texts the manifest needs
    cached: int = 0  # of which were already in the cache
    encoded: int = 0
    truncated: int = 0
    seconds: float = 0.0
    peak_gpu_gib: float | None = peak()


@dataclass(frozen=True)
class EncodeContext:
    """What every part of stage 1 works with (texts, edit inputs, init and control images): built once per run."""

    cache: EmbeddingCache  # where the embeddings and latents go, keyed by content
    source: ModelSource
    device: str
    dtype: torch.dtype
    batch_size: int = 16  # texts (or edit rows) per encoder call
    # The text encoder's placement, as the run's memory plan decided it.
    memory_mode: str = BF16
    pinned_bytes: int | None = None
    # Where input images come from, and the largest one read (decompression bombs are refused).
    storage_options: StorageOptions = field(default_factory=dict)
    max_input_pixels: int = DEFAULT_MAX_PIXELS
    progress: Progress = field(default_factory=Silent)


class PromptEncoder:
    """The text encoder and tokenizer of a Qwen-Image model, on one device."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        memory_mode: str = BF16,
        pinned_bytes: int | None = None,
    ):
        self.source, self.device, self.dtype = source, device, dtype
        self.pipe, self.memory_mode = load_encoder_pipeline(
            source, dtype, memory_mode, device, pinned_bytes, transformer=None, vae=None
        )
        self.pipe.set_progress_bar_config(disable=True)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens after the template is dropped, before truncation (to sort and to flag truncation)."""
        template = self.pipe.prompt_template_encode
        dropped = self.pipe.prompt_template_encode_start_idx
        encoded = self.pipe.tokenizer([template.format(text) for text in texts], truncation=False)
        return [len(ids) - dropped for ids in encoded["input_ids"]]

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """One unpadded `[tokens, hidden]` embedding per text."""
        import torch

        with torch.inference_mode():
            embeds, mask = self.pipe.encode_prompt(
                prompt=texts, device=self.device, max_sequence_length=MAX_TEXT_TOKENS
            )
        lengths = [embeds.shape[1]] * len(texts) if mask is None else mask.sum(dim=1).tolist()
        return [embeds[row, :length] for row, length in enumerate(lengths)]

    def close(self) -> None:
        del self.pipe
        release_memory(self.device)


def load_encoder_pipeline(
    source: ModelSource,
    dtype: torch.dtype,
    memory_mode: str,
    device: str,
    pinned_bytes: int | None = None,
    **components: None,
):
    """The pipeline with its text encoder placed in `memory_mode` (other components as `components` say).
    Resident on a GPU, the encoder loads straight to it, a shard at a time (transformers' `device_map`): its
    16.6 GB never pass through host RAM. Other modes read it memory-mapped and place it layer by layer."""

    encoder = None
    if memory_mode == BF16 and device.startswith("cuda") and source.loader is None:
        encoder = _encoder_straight_to(source, device, dtype)
    pipe = load_pipeline(source, dtype, **components, **({"text_encoder": encoder} if encoder is not None else {}))
    return pipe, place_text_encoder(pipe.text_encoder, memory_mode, device, dtype, pinned_bytes)


def _encoder_straight_to(source: ModelSource, device: str, dtype: torch.dtype):
    """The text encoder read from its files to `device` by transformers' own loader (its key mapping, its
    dtypes), fed tensors that give their file pages back once copied (`ReleasedAfterRead`)."""
    import transformers

    from qwen_batch.weights.checkpoint_files import ReleasedAfterRead, read_safetensors, safetensors_files

    folder = source.folder_with(("text_encoder",))
    _, class_name = json.loads((folder / "model_index.json").read_text())["text_encoder"]
    state = {
        name: ReleasedAfterRead(stored)
        for file in safetensors_files(folder / "text_encoder")
        for name, stored in read_safetensors(file).items()
    }
    model_class = getattr(transformers, class_name)
    config = model_class.config_class.from_json_file(folder / "text_encoder" / "config.json")
    return model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, device_map={"": device}, use_safetensors=True
    )


def encoder_cache_identity(source: ModelSource, dtype: torch.dtype) -> dict[str, Any]:
    """Everything besides the text that determines an embedding (see `qwen_batch.pipeline.embedding_cache`)."""
    from diffusers import QwenImagePipeline

    # The template is set in the pipeline's __init__; an instance without components has it.
    template = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return {
        "encoder": source.identity(QWEN_IMAGE.encoder_components),
        "template": template.prompt_template_encode,
        "template_tokens_dropped": template.prompt_template_encode_start_idx,
        "max_tokens": MAX_TEXT_TOKENS,
        "dtype": str(dtype).removeprefix("torch."),
    }


def open_cache(folder: Folder, source: ModelSource, dtype: torch.dtype) -> EmbeddingCache:
    return EmbeddingCache(folder, cache_namespace(**encoder_cache_identity(source, dtype)))


def encode_texts(texts: list[str], context: EncodeContext) -> EncodeStats:
    """Make sure every text has an embedding in the context's cache; load the encoder only if one is missing."""
    started = time.perf_counter()
    distinct = list(dict.fromkeys(texts))
    todo = context.cache.missing(distinct)
    stats = EncodeStats(texts=len(distinct), cached=len(distinct) - len(todo))
    if not todo:
        if distinct:
            log.info("encode: all %d texts already cached; the text encoder is not loaded", len(distinct))
        stats.seconds = time.perf_counter() - started
        return stats
    _encode_missing(todo, context, stats)
    stats.seconds = time.perf_counter() - started
    log.info(
        "encode: %d texts encoded, %d cached, %d truncated to %d tokens, %.1f s",
        stats.encoded,
        stats.cached,
        stats.truncated,
        MAX_TEXT_TOKENS,
        stats.seconds,
    )
    return stats


def _encode_missing(todo: list[str], context: EncodeContext, stats: EncodeStats) -> None:
    """Load the text encoder, encode `todo` into the cache in batches of similar token length, and free it."""
    cache, device, progress = context.cache, context.device, context.progress
    reset_peak_memory(device)
    encoder = PromptEncoder(context.source, device, context.dtype, context.memory_mode, context.pinned_bytes)
    _log_memory("encode: text encoder loaded", device)
    try:
        counts = encoder.token_counts(todo)
        # Similar lengths share a batch, so padding wastes little compute.
        order = sorted(range(len(todo)), key=counts.__getitem__)
        progress.start("encode", len(todo), "texts")

        def encode_batch(rows: list[int]) -> None:
            embeddings = encoder.encode([todo[row] for row in rows])
            for row, embedding in zip(rows, embeddings, strict=True):
                truncated = counts[row] > MAX_TEXT_TOKENS
                stats.truncated += truncated
                cache.put(todo[row], embedding, truncated=truncated)
            stats.encoded += len(rows)
            progress.advance(len(rows))

        def too_big(row: int, error: BaseException) -> ModelError:
            return ModelError(
                f"the text encoder ran out of GPU memory on a single prompt of {counts[row]} tokens "
                f"({error}); free the GPU or use --memory-mode offload. Texts encoded so far stay cached."
            )

        for begin in range(0, len(order), context.batch_size):
            run_in_halves(order[begin : begin + context.batch_size], encode_batch, device, too_big)
        progress.finish()
        memory = gpu_memory_gib(device)
        stats.peak_gpu_gib = memory[1] if memory else None
    finally:
        encoder.close()  # drops the pipeline: nothing of the encoder's stays referenced
        release_memory(device)
        _log_memory("encode: text encoder freed", device)


def _log_memory(event: str, device: str) -> None:
    memory = gpu_memory_gib(device)
    if memory is not None:
        log.info("%s: %.2f GiB allocated on %s (peak %.2f GiB)", event, memory[0], device, memory[1])
