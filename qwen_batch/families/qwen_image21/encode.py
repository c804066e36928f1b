"""Stage 1 for Qwen-Image-2.1: every distinct prompt, with its condition images, through the Qwen3-VL encoder
into the embedding cache, and every condition image's VAE latents, by content.

Only the encoder, its processor and the VAE load (the transformer does not). What is cached is what
`QwenImage21Pipeline` computes for one prompt (its own `_get_qwen_prompt_embeds`, so the template, the dropped
system turn and the pre-norm hidden states are exactly the pipeline's):
- per (text, the row's condition images' content hashes): the embedding `[tokens, hidden]` and the image-slot
  mask `[tokens]` (True where a condition image's tokens go; each slot stands for 2x2 latent tokens);
- per condition image (its SHA-256): its packed, normalized VAE latents `[h/16 * w/16, channels]` at the size the
  pipeline resizes it to;
- per image URL, a note: the content hash and size it had when read (or why it cannot be used), so stage 2
  (`qwen_batch.families.qwen_image21.rows`) finds everything without reading an image.
Each prompt is encoded alone, with its own images (the pipeline takes one set of images per call, and a batch
of prompts is left-padded, which changes the states on a GPU): what the pipeline computes for that row alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ModelError
from qwen_batch.families.qwen_image21 import FAMILY, OUTPUT_RESOLUTION
from qwen_batch.io.input_images import read_input_images
from qwen_batch.io.storage import Folder
from qwen_batch.memory.device import gpu_memory_gib, release_memory, reset_peak_memory
from qwen_batch.memory.oom import run_in_halves
from qwen_batch.pipeline.conditions.edit import calculate_dimensions
from qwen_batch.pipeline.embedding_cache import EmbeddingCache, cache_namespace, key_of
from qwen_batch.pipeline.encode import EncodeContext, EncodeStats, load_encoder_pipeline
from qwen_batch.weights.model_source import ModelSource

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from qwen_batch.manifest import Request

log = logging.getLogger(__name__)

PREFETCH_THREADS = 4  # condition images fetched and decoded while the encoder works


def note_key(url: str) -> str:
    return key_of("2.1-input", url=url)


def latents_key(sha256: str) -> str:
    return key_of("2.1-latents", sha256=sha256)


def text_key(text: str, shas: Sequence[str] = ()) -> str:
    return key_of("2.1-text", images=list(shas), text=text)


def cache_identity(source: ModelSource, dtype: torch.dtype) -> dict[str, Any]:
    """Everything besides a row's text and images that determines what stage 1 caches."""
    from diffusers import QwenImage21Pipeline

    return {
        "family": FAMILY.name,
        "encoder": source.identity(FAMILY.encoder_components),
        # The pipeline's templates, read from its source: a release that changes them changes every embedding.
        "pipeline": _template_fingerprint(QwenImage21Pipeline),
        "output_resolution": OUTPUT_RESOLUTION,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _template_fingerprint(pipeline_class) -> str:
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(pipeline_class._get_qwen_prompt_embeds).encode()).hexdigest()[:16]


def open_cache(folder: Folder, source: ModelSource, dtype: torch.dtype) -> EmbeddingCache:
    return EmbeddingCache(folder, cache_namespace(**cache_identity(source, dtype)))


def condition_size(width: int, height: int) -> tuple[int, int]:
    """The size the pipeline resizes a condition image to: its aspect ratio at about 1024x1024, multiples of 32."""
    return calculate_dimensions(OUTPUT_RESOLUTION * OUTPUT_RESOLUTION, width / height)


class Encoder21:
    """The Qwen3-VL encoder, its processor and the VAE of a 2.1 model, on one device (no transformer)."""

    def __init__(self, context: EncodeContext):
        self.device, self.dtype = context.device, context.dtype
        self.pipe, self.memory_mode = load_encoder_pipeline(
            context.source, context.dtype, context.memory_mode, context.device, context.pinned_bytes, transformer=None
        )
        self.pipe.vae.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def encode(
        self, texts: Sequence[str], images: Sequence[Image.Image] = ()
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(embedding `[tokens, hidden]`, image-slot mask `[tokens]`) per text, the pipeline's arithmetic; with
        `images` (the row's, as read), the encoder sees them, resized as the pipeline resizes them."""
        import torch

        resized = [self._resized(image) for image in images] or None
        with torch.inference_mode():
            embeds, mask, slots = self.pipe._get_qwen_prompt_embeds(list(texts), resized, self.device)
        lengths = mask.sum(dim=1).tolist()
        return [(embeds[row, :length], slots[row, :length]) for row, length in enumerate(lengths)]

    def _resized(self, image: Image.Image) -> Image.Image:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        width, height = condition_size(*rgba.size)
        return self.pipe.image_processor.resize(rgba, width=width, height=height)

    def latents(self, image: Image.Image) -> torch.Tensor:
        """Packed `[tokens, channels]` latents of a condition image (posterior mode, normalized): the pipeline's."""
        import torch

        pipe = self.pipe
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        width, height = condition_size(*rgba.size)
        with torch.inference_mode():
            pixels = pipe.image_processor.preprocess(rgba, width=width, height=height).unsqueeze(2)
            encoded = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
            channels, latent_height, latent_width = encoded.shape[1], encoded.shape[3], encoded.shape[4]
            return pipe._pack_latents(encoded, 1, channels, latent_height, latent_width)[0]

    def close(self) -> None:
        del self.pipe
        release_memory(self.device)


def encode_rows(requests: Sequence[Request], context: EncodeContext) -> EncodeStats:
    """Stage 1: afterwards every row whose images could be read has its tensors in the context's cache.
    The encoder loads only if something is missing."""
    started = time.perf_counter()
    cache = context.cache
    present = cache.present_keys()
    stats = EncodeStats()
    images, shas = _read_images(requests, context)
    texts: dict[str, tuple[str, tuple[str, ...]]] = {}  # key -> (text, its images' URLs)
    latents: dict[str, str] = {}  # key -> URL
    for request in requests:
        if any(url not in shas for url in request.images):
            continue  # an image could not be read: the row fails in stage 2 with the note's reason
        row_shas = [shas[url] for url in request.images]
        for text in request.texts:
            key = text_key(text, row_shas)
            if key not in texts:
                texts[key] = (text, request.images)
        for url, sha in zip(request.images, row_shas, strict=True):
            latents.setdefault(latents_key(sha), url)
    stats.texts = len(texts)
    stats.cached = sum(key in present for key in texts)
    todo_texts = {key: value for key, value in texts.items() if key not in present}
    todo_latents = {key: url for key, url in latents.items() if key not in present}
    if todo_texts or todo_latents:
        _encode_missing(todo_texts, todo_latents, images, context, stats)
    elif texts:
        log.info("encode: all %d prompts already cached; the encoder is not loaded", len(texts))
    stats.seconds = time.perf_counter() - started
    log.info("encode: %d prompts encoded, %d cached, %.1f s", stats.encoded, stats.cached, stats.seconds)
    return stats


def _read_images(requests: Sequence[Request], context: EncodeContext) -> tuple[dict[str, Any], dict[str, str]]:
    """Every condition image read once (alpha kept: the VAE reads it), with a note per URL for stage 2."""
    urls = list(dict.fromkeys(url for request in requests for url in request.images))
    images: dict[str, Image.Image] = {}
    shas: dict[str, str] = {}
    if not urls:
        return images, shas
    context.progress.start("read condition images", len(urls), "images")
    reads = read_input_images(
        urls, context.storage_options, context.max_input_pixels, PREFETCH_THREADS, keep_alpha=True
    )
    for read in reads:
        context.progress.advance(1)
        if read.error:
            context.cache.put_note(note_key(read.url), {"url": read.url, "error": read.error})
            log.warning("condition image unusable: %s", read.error)
            continue
        images[read.url], shas[read.url] = read.image, read.sha256
        size = {"width": read.image.width, "height": read.image.height}
        context.cache.put_note(note_key(read.url), {"url": read.url, "sha256": read.sha256, **size})
    context.progress.finish()
    return images, shas


def _encode_missing(
    texts: dict[str, tuple[str, tuple[str, ...]]],
    latents: dict[str, str],
    images: dict[str, Any],
    context: EncodeContext,
    stats: EncodeStats,
) -> None:
    cache, device, progress = context.cache, context.device, context.progress
    reset_peak_memory(device)
    encoder = Encoder21(context)
    try:
        for key, url in latents.items():
            cache.put_tensors(key, {"latents": encoder.latents(images[url])}, {"url": url})
        progress.start("encode", len(texts), "prompts")

        def store(keys: list[str], encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for key, (embedding, slots) in zip(keys, encoded, strict=True):
                cache.put_tensors(key, {"embedding": embedding, "image_slots": slots}, {"tokens": str(len(slots))})
            stats.encoded += len(keys)
            progress.advance(len(keys))

        def too_big(key: str, error: BaseException) -> ModelError:
            return ModelError(
                f"the encoder ran out of GPU memory on a single prompt ({error}); free the GPU or use "
                "--memory-mode offload. Prompts encoded so far stay cached."
            )

        def encode_alone(keys: list[str]) -> None:
            text, urls = texts[keys[0]]
            store(keys, encoder.encode([text], [images[url] for url in urls]))

        # One prompt per call, with its own images: the pipeline's call for that row alone. Batches of prompts
        # are left-padded, and on a GPU the padded encoder's states differ from the prompt's alone (by up to
        # 122/255 in the tiny model's images, in fp32), so batching would cost the row its exactness.
        for key in texts:
            run_in_halves([key], encode_alone, device, too_big)
        progress.finish()
        memory = gpu_memory_gib(device)
        stats.peak_gpu_gib = memory[1] if memory else None
    finally:
        encoder.close()
        release_memory(device)
