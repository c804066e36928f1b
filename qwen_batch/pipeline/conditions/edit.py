"""Image edits (Qwen-Image-Edit and the multi-image Edit-Plus) in the same two stages as text-to-image.

Stage 1 (`encode_edit_inputs`) reads every input image once and loads only the Qwen2.5-VL encoder, its
processor and the VAE. It caches, per row:
- the instruction's and the negative prompt's embeddings, computed with the input image(s) in view
  (the VL encoder sees them), keyed by the images' content hashes and the text;
- each input image's VAE latents (posterior mode, normalised, packed), keyed by its content hash;
- a note per input URL: the content hash and size that URL had when it was read.
Stage 2 (`EditConditions`) finds everything through those notes and never reads an input image: the
transformer and VAE decoder run on cached tensors only. The arithmetic is diffusers' own (its
`encode_prompt`, `_encode_vae_image`, `_pack_latents`, image resizing), so a row's output equals
`QwenImageEditPipeline` / `QwenImageEditPlusPipeline` on the same inputs (tested).

An input that cannot be read (missing, not an image, truncated, a decompression bomb) fails its row
with the reason; the note records the reason so stage 2 reports it too, and the other rows run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ModelError, QwenBatchError
from qwen_batch.io.input_images import ReadInput, read_input_images
from qwen_batch.io.storage import Folder
from qwen_batch.memory.device import gpu_memory_gib, release_memory, reset_peak_memory
from qwen_batch.memory.modes import BF16
from qwen_batch.memory.oom import run_in_halves
from qwen_batch.pipeline.embedding_cache import EmbeddingCache, cache_namespace, key_of
from qwen_batch.pipeline.encode import MAX_TEXT_TOKENS, EncodeContext, EncodeStats
from qwen_batch.weights.model_source import ModelSource

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from qwen_batch.manifest import Request

log = logging.getLogger(__name__)

EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
EDIT_ENCODER_COMPONENTS = ("text_encoder", "tokenizer", "processor", "vae")
# diffusers' edit pipelines size everything from these areas (pipeline_qwenimage_edit*.py).
VAE_IMAGE_AREA = 1024 * 1024
PLUS_CONDITION_AREA = 384 * 384
PREFETCH_THREADS = 4  # input images fetched and decoded while the encoder works


class EditInputError(QwenBatchError):
    """A row's input image could not be used; the row fails with this message."""


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels with aspect `ratio`, multiples of 32: diffusers' rule."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def output_size(request: Request, input_sizes: Sequence[tuple[int, int]], multiple: int = 16) -> tuple[int, int]:
    """The row's size, or the last input image's aspect ratio at about 1024x1024, as diffusers does."""
    width, height = input_sizes[-1]
    default_width, default_height = calculate_dimensions(VAE_IMAGE_AREA, width / height)
    width = request.width or default_width
    height = request.height or default_height
    return width // multiple * multiple, height // multiple * multiple


def edit_cache_identity(source: ModelSource, pipeline_class: str, dtype: torch.dtype) -> dict[str, Any]:
    """Everything besides the inputs that determines an edit row's cached tensors."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class)
    # The template is set in __init__; an instance without components has it.
    template = pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    return {
        "encoder": source.identity(EDIT_ENCODER_COMPONENTS),
        "pipeline": pipeline_class,
        "template": template.prompt_template_encode,
        "template_tokens_dropped": template.prompt_template_encode_start_idx,
        "max_tokens": MAX_TEXT_TOKENS,
        "dtype": str(dtype).removeprefix("torch."),
    }


def open_edit_cache(folder: Folder, source: ModelSource, pipeline_class: str, dtype: torch.dtype) -> EmbeddingCache:
    return EmbeddingCache(folder, cache_namespace(**edit_cache_identity(source, pipeline_class, dtype)))


def _note_key(url: str) -> str:
    return key_of("input", url=url)


def _latents_key(sha256: str) -> str:
    return key_of("vae-latents", sha256=sha256)


def _text_key(shas: Sequence[str], text: str) -> str:
    return key_of("edit-text", images=list(shas), text=text)


class EditEncoder:
    """The VL encoder, processor and VAE of an edit model, on one device (no transformer)."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: torch.dtype,
        memory_mode: str = BF16,
        pinned_bytes: int | None = None,
    ):
        from qwen_batch.pipeline.encode import load_encoder_pipeline

        self.device, self.dtype = device, dtype
        # The encoder's memory mode is the planner's, as for text-to-image; the VAE is small (127 M).
        self.pipe, self.memory_mode = load_encoder_pipeline(
            source, dtype, memory_mode, device, pinned_bytes, transformer=None
        )
        self.plus = type(self.pipe).__name__ == "QwenImageEditPlusPipeline"
        self.pipe.vae.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def _condition_image(self, image: Image.Image) -> Image.Image:
        """The image as the VL encoder sees it, resized exactly as the pipeline resizes it."""
        area = PLUS_CONDITION_AREA if self.plus else VAE_IMAGE_AREA
        width, height = calculate_dimensions(area, image.width / image.height)
        return self.pipe.image_processor.resize(image, height, width)

    def fit_text(self, text: str) -> tuple[str, bool]:
        """The text cut to the encoder's token limit (the edit pipelines do not cut it themselves)."""
        ids = self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= MAX_TEXT_TOKENS:
            return text, False
        return self.pipe.tokenizer.decode(ids[:MAX_TEXT_TOKENS]), True

    def encode_texts(self, items: Sequence[tuple[str, Sequence[Image.Image]]]) -> list[torch.Tensor]:
        """Unpadded `[tokens, hidden]` embeddings of (text, its input images) pairs."""
        import torch

        with torch.inference_mode():
            if self.plus:
                # Edit-Plus puts all of a prompt's images into one template; its encode_prompt takes
                # one prompt at a time with its list of images.
                return [self._encode([text], [self._condition_image(i) for i in images])[0] for text, images in items]
            # Edit: one image per text, so a batch of different rows is one processor call.
            return self._encode([text for text, _ in items], [self._condition_image(images[0]) for _, images in items])

    def _encode(self, texts: list[str], images: list[Image.Image]) -> list[torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=texts, image=images, device=self.device)
        lengths = [embeds.shape[1]] * len(texts) if mask is None else mask.sum(dim=1).tolist()
        return [embeds[row, :length] for row, length in enumerate(lengths)]

    def encode_latents(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """Packed `[tokens, 64]` VAE latents of an input image, and the size it was encoded at."""
        import torch

        width, height = calculate_dimensions(VAE_IMAGE_AREA, image.width / image.height)
        pipe = self.pipe
        with torch.inference_mode():
            pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            latents = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
            channels, latent_height, latent_width = latents.shape[1], latents.shape[3], latents.shape[4]
            packed = pipe._pack_latents(latents, 1, channels, latent_height, latent_width)
        return packed[0], width, height

    def close(self) -> None:
        del self.pipe
        release_memory(self.device)


@dataclass
class _RowInputs:
    request: Request
    images: list[Image.Image]
    shas: list[str]


def encode_edit_inputs(requests: Sequence[Request], context: EncodeContext) -> EncodeStats:
    """Stage 1 for edit rows: afterwards every readable row has its tensors in the context's cache."""
    started = time.perf_counter()
    urls = list(dict.fromkeys(url for request in requests for url in request.images))
    inputs = _EditInputs(requests, context)
    try:
        context.progress.start("read inputs", len(urls), "images")
        for read in read_input_images(urls, context.storage_options, context.max_input_pixels, PREFETCH_THREADS):
            context.progress.advance(1)
            inputs.take(read)
            inputs.flush()
        inputs.flush(force=True)
        context.progress.finish()
        inputs.note_peak_memory()
    finally:
        inputs.close()
    stats = inputs.stats
    stats.seconds = time.perf_counter() - started
    log.info(
        "encode (edit): %d input images read (%d unusable), %d embeddings encoded, %d cached, %.1f s",
        len(urls),
        len(inputs.failed_urls),
        stats.encoded,
        stats.cached,
        stats.seconds,
    )
    return stats


class _EditInputs:
    """Edit rows as their input images arrive: a row waits until all its images are read, ready rows are
    encoded a batch at a time (the encoder loads at the first row that misses something in the cache), and
    an image is dropped once no waiting row needs it."""

    def __init__(self, requests: Sequence[Request], context: EncodeContext):
        self.context = context
        self.stats = EncodeStats()
        self.present = context.cache.present_keys()
        self.encoder: EditEncoder | None = None
        self.sha_of: dict[str, str] = {}
        self.images: dict[str, Image.Image] = {}
        self.failed_urls: set[str] = set()
        self.rows_of: dict[str, list[Request]] = {}
        for request in requests:
            for url in dict.fromkeys(request.images):
                self.rows_of.setdefault(url, []).append(request)
        self.uses = {url: len(rows) for url, rows in self.rows_of.items()}
        self.ready: list[_RowInputs] = []

    def take(self, read: ReadInput) -> None:
        """Note an input image (its content hash and size, or why it cannot be used) and queue the rows it
        completes; a row with an unusable image fails in stage 2 with the note's reason."""
        if read.error:
            self.failed_urls.add(read.url)
            self.context.cache.put_note(_note_key(read.url), {"url": read.url, "error": read.error})
            log.warning("input image unusable: %s", read.error)
        else:
            self.sha_of[read.url] = read.sha256
            self.images[read.url] = read.image
            size = {"width": read.image.width, "height": read.image.height}
            self.context.cache.put_note(_note_key(read.url), {"url": read.url, "sha256": read.sha256, **size})
        for request in self.rows_of[read.url]:
            if not all(url in self.sha_of or url in self.failed_urls for url in request.images):
                continue  # another of its images is still on its way
            if any(url in self.failed_urls for url in request.images):
                self._release(request)
                continue
            shas = [self.sha_of[url] for url in request.images]
            self.ready.append(_RowInputs(request, [self.images[url] for url in request.images], shas))

    def flush(self, force: bool = False) -> None:
        """Encode the ready rows a full batch at a time (`force`: the rest too)."""
        batch_size = self.context.batch_size
        while self.ready and (force or len(self.ready) >= batch_size):
            batch, self.ready = self.ready[:batch_size], self.ready[batch_size:]
            todo = [row for row in batch if self._missing(row)]
            if todo:
                _encode_rows(self._loaded_encoder(), self.context.cache, todo, self.present, self.stats)
            for row in batch:
                self._release(row.request)

    def _missing(self, row: _RowInputs) -> list[str]:
        keys = [_text_key(row.shas, text) for text in row.request.texts] + [_latents_key(sha) for sha in row.shas]
        return [key for key in keys if key not in self.present]

    def _loaded_encoder(self) -> EditEncoder:
        if self.encoder is None:
            context = self.context
            reset_peak_memory(context.device)
            self.encoder = EditEncoder(
                context.source, context.device, context.dtype, context.memory_mode, context.pinned_bytes
            )
        return self.encoder

    def _release(self, request: Request) -> None:
        for url in dict.fromkeys(request.images):
            self.uses[url] -= 1
            if self.uses[url] == 0:
                self.images.pop(url, None)

    def note_peak_memory(self) -> None:
        if self.encoder is not None:
            memory = gpu_memory_gib(self.context.device)
            self.stats.peak_gpu_gib = memory[1] if memory else None

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
            release_memory(self.context.device)


def _encode_rows(
    encoder: EditEncoder, cache: EmbeddingCache, rows: list[_RowInputs], present: set[str], stats: EncodeStats
) -> None:
    texts: dict[str, tuple[str, bool, Sequence[Image.Image]]] = {}  # key -> (text to encode, truncated, images)
    for row in rows:
        for text in row.request.texts:
            key = _text_key(row.shas, text)
            stats.texts += 1
            if key in present or key in texts:
                stats.cached += key in present
                continue
            fitted, truncated = encoder.fit_text(text)
            texts[key] = (fitted, truncated, row.images)
        for sha, image in zip(row.shas, row.images, strict=True):
            key = _latents_key(sha)
            if key in present:
                continue
            latents, width, height = encoder.encode_latents(image)
            cache.put_tensors(key, {"latents": latents}, {"width": str(width), "height": str(height)})
            present.add(key)
    if not texts:
        return

    def encode_batch(keys: list[str]) -> None:
        embeddings = encoder.encode_texts([(texts[key][0], texts[key][2]) for key in keys])
        for key, embedding in zip(keys, embeddings, strict=True):
            truncated = texts[key][1]
            cache.put_embedding(key, embedding, truncated)
            present.add(key)
            stats.encoded += 1
            stats.truncated += truncated

    def too_big(key: str, error: BaseException) -> ModelError:
        return ModelError(
            f"the edit encoder ran out of GPU memory on a single instruction with its image ({error}); "
            "free the GPU or use --memory-mode offload. Inputs encoded so far stay cached."
        )

    run_in_halves(list(texts), encode_batch, encoder.device, too_big)


@dataclass(frozen=True)
class EditRow:
    """An edit row as stage 2 batches it: its output size resolved, its inputs' hashes and grids."""

    request: Request  # with width and height resolved
    input_sha256: tuple[str, ...]
    image_shapes: tuple[tuple[int, int, int], ...]  # (1, h/16, w/16) of each input's latents

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Rows sharing this key share a batch: same noise shape, schedule, guidance and input grids."""
        return (*self.request.batch_key, self.image_shapes)


@dataclass
class EditCondition:
    """The cached tensors of one edit row."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    image_latents: torch.Tensor  # [tokens, 64], the row's input images one after another
    truncated: bool


class EditConditions:
    """Stage 2's view of the cache for edit rows: notes first (small) to batch, tensors per batch."""

    def __init__(self, cache: EmbeddingCache, vae_scale_factor: int = 8):
        self.cache = cache
        self.patch = vae_scale_factor * 2

    def resolve(self, request: Request) -> EditRow:
        notes = []
        for url in request.images:
            note = self.cache.get_note(_note_key(url))
            if note.get("error"):
                raise EditInputError(note["error"])
            notes.append(note)
        sizes = [(int(note["width"]), int(note["height"])) for note in notes]
        width, height = output_size(request, sizes, self.patch)
        shapes = []
        for input_width, input_height in sizes:
            latent_width, latent_height = calculate_dimensions(VAE_IMAGE_AREA, input_width / input_height)
            shapes.append((1, latent_height // self.patch, latent_width // self.patch))
        return EditRow(
            request=replace(request, width=width, height=height),
            input_sha256=tuple(note["sha256"] for note in notes),
            image_shapes=tuple(shapes),
        )

    def load(self, row: EditRow) -> EditCondition:
        import torch

        request, shas = row.request, row.input_sha256
        prompt, metadata = self.cache.get_tensors(_text_key(shas, request.prompt))
        negative = self.cache.get_tensors(_text_key(shas, request.negative_prompt))[0] if request.uses_cfg else None
        latents = [self.cache.get_tensors(_latents_key(sha))[0]["latents"] for sha in shas]
        return EditCondition(
            prompt=prompt["embedding"],
            negative=None if negative is None else negative["embedding"],
            image_latents=torch.cat(latents),
            truncated=metadata.get("truncated") == "true",
        )
