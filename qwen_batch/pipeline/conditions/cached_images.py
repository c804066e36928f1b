"""Init, mask and control images: read once in stage 1, encoded with the VAE alone into the embedding
cache, found again in stage 2. This module owns that part of the cache's layout (its keys and notes).

- **Stage 1** (`prepare_image_inputs`) reads every init, mask and control image once (the input rules of
  edits: allowed locations, formats, decompression-bomb limits) and caches, per (image, row size):
  - an init image's VAE posterior, resized as the pipelines do, as its mean and standard deviation (not one
    sample: the pipelines *sample* it with the row's generator before drawing the noise, so the sample
    belongs to the row's seed, not the image);
  - a mask binarized at latent resolution;
  - for `mask_crop_padding`, the init image's kept part to paste the result into;
  - a control image's posterior (after `control_preprocess`), or, for an inpainting ControlNet, the masked
    picture's posterior and the kept area.
- **Stage 2** (`CachedImageInputs`) finds those tensors through each URL's note (its content hash and
  size when read) and never reads an image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import InputImageError, QwenBatchError
from qwen_batch.io.input_images import read_input_images
from qwen_batch.memory.device import release_memory
from qwen_batch.pipeline.conditions.image_start import RowStart
from qwen_batch.pipeline.embedding_cache import EmbeddingCache, key_of
from qwen_batch.weights.model_source import ModelSource, load_pipeline

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from qwen_batch.manifest import Request
    from qwen_batch.pipeline.conditions.controlnet import RowControls
    from qwen_batch.pipeline.encode import EncodeContext

log = logging.getLogger(__name__)

PREFETCH_THREADS = 4


def _note_key(url: str) -> str:
    return key_of("start-input", url=url)


def _posterior_key(sha256: str, width: int, height: int, crop: tuple | None = None) -> str:
    """`crop`: (mask's SHA-256, padding) when the row works on the mask's padded box (mask_crop_padding)."""
    extra = {} if crop is None else {"crop": list(crop)}
    return key_of("init-posterior", sha256=sha256, width=width, height=height, **extra)


def _mask_key(sha256: str, width: int, height: int, padding: int | None = None) -> str:
    extra = {} if padding is None else {"crop_padding": padding}
    return key_of("inpaint-mask", sha256=sha256, width=width, height=height, **extra)


def _overlay_key(init_sha256: str, mask_sha256: str, width: int, height: int, padding: int) -> str:
    return key_of("inpaint-overlay", init=init_sha256, mask=mask_sha256, width=width, height=height, padding=padding)


def _control_key(sha256: str, preprocess: str | None, width: int, height: int, mask: str | None = None) -> str:
    """`mask`: the mask's SHA-256 for an inpainting ControlNet's condition (the masked image and the mask)."""
    extra = {} if mask is None else {"mask": mask}
    return key_of("control-posterior", sha256=sha256, preprocess=preprocess, width=width, height=height, **extra)


class ImageStartError(QwenBatchError):
    """A row's init or mask image cannot be used; the row fails with this reason, the others run."""


# --- Stage 1 --------------------------------------------------------------------------------------------


class _StartEncoder:
    """The VAE alone, and the pipelines' image and mask preprocessing."""

    def __init__(self, source: ModelSource, device: str, dtype: torch.dtype):
        from diffusers.image_processor import VaeImageProcessor

        pipe = load_pipeline(source, dtype, text_encoder=None, tokenizer=None, transformer=None, processor=None)
        self.vae = pipe.vae.to(device)
        self.device, self.dtype = device, dtype
        scale, channels = pipe.vae_scale_factor * 2, self.vae.config.z_dim
        self.patch = scale
        self.images = VaeImageProcessor(vae_scale_factor=scale, vae_latent_channels=channels)
        self.masks = VaeImageProcessor(
            vae_scale_factor=scale,
            vae_latent_channels=channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def control(self, image: Image.Image, width: int, height: int, preprocess: str | None) -> dict[str, torch.Tensor]:
        """A control image's posterior, made from the photo first where the row asks (`control_preprocess`)."""
        from qwen_batch.pipeline.conditions.control_preprocess import preprocess as make_control

        return self.posterior(make_control(preprocess, image) if preprocess else image, width, height)

    def masked_control(
        self, image: Image.Image, mask: Image.Image, width: int, height: int, preprocess: str | None
    ) -> dict[str, torch.Tensor]:
        """An inpainting ControlNet's condition, as `QwenImageControlNetInpaintPipeline.prepare_image_with_mask`
        makes it: the image with the mask's white area set to -1 (black in [-1, 1]), its VAE posterior, and
        the inverted mask at latent size."""
        import torch

        from qwen_batch.pipeline.conditions.control_preprocess import preprocess as make_control

        image = make_control(preprocess, image) if preprocess else image
        with torch.inference_mode():
            pixels = self.images.preprocess(image, height=height, width=width).unsqueeze(2)
            binary = self.masks.preprocess(mask, height=height, width=width).unsqueeze(2)
            masked = pixels.clone()
            masked[(binary > 0.5).repeat(1, 3, 1, 1, 1)] = -1
            distribution = self.vae.encode(masked.to(self.device, self.dtype)).latent_dist
            mean = distribution.mean
            kept = 1 - torch.nn.functional.interpolate(binary, size=tuple(mean.shape[-3:]))
        return {"mean": mean[0].cpu(), "std": distribution.std[0].cpu(), "mask": kept[0].contiguous()}

    def posterior(
        self, image: Image.Image, width: int, height: int, crop: tuple[int, int, int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        import torch

        mode = "fill" if crop else "default"  # the pipelines' resize_mode with padding_mask_crop
        with torch.inference_mode():
            pixels = self.images.preprocess(image, height=height, width=width, crops_coords=crop, resize_mode=mode)
            pixels = pixels.to(torch.float32)
            pixels = pixels.to(self.device, self.dtype).unsqueeze(2)
            distribution = self.vae.encode(pixels).latent_dist
            return {"mean": distribution.mean[0].cpu(), "std": distribution.std[0].cpu()}

    def mask(
        self, image: Image.Image, width: int, height: int, crop: tuple[int, int, int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        import torch

        mode = "fill" if crop else "default"
        condition = self.masks.preprocess(image, height=height, width=width, resize_mode=mode, crops_coords=crop)
        size = (2 * (height // self.patch), 2 * (width // self.patch))
        return {"mask": torch.nn.functional.interpolate(condition, size=size)[0].contiguous()}

    @staticmethod
    def crop(mask: Image.Image, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
        from diffusers.image_processor import VaeImageProcessor

        return tuple(int(v) for v in VaeImageProcessor.get_crop_region(mask, width, height, pad=padding))

    @staticmethod
    def overlay(init: Image.Image, mask: Image.Image, crop: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        """What `apply_overlay` pastes over the generated crop: the init image where the mask keeps it (as
        diffusers builds it: premultiplied, then straight alpha), at the init image's size, and the crop box."""
        import numpy as np
        import torch
        from PIL import Image as PILImage
        from PIL import ImageOps

        kept = PILImage.new("RGBa", init.size)
        kept.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        rgba = np.array(kept.convert("RGBA"))
        return {"overlay": torch.from_numpy(rgba), "crop": torch.tensor(crop, dtype=torch.int64)}

    def close(self) -> None:
        del self.vae
        release_memory(self.device)


def prepare_image_inputs(requests: Sequence[Request], context: EncodeContext) -> int:
    """Stage 1 for rows with an init image or control images: afterwards each usable row's posteriors and
    mask are cached. Returns how many tensors were encoded (0 when everything was cached: the VAE is then
    never loaded)."""
    rows = [request for request in requests if request.starts_from_image or request.controls]
    if not rows:
        return 0
    started = time.perf_counter()
    urls = list(dict.fromkeys(url for row in rows for url in _image_urls(row)))
    present = context.cache.present_keys()
    images, notes = _read_images(urls, context)
    encoded = _encode_missing(rows, images, notes, present, context)
    log.info(
        "encode (init and mask images): %d read, %d unusable, %d encoded, %.1f s",
        len(urls),
        sum("error" in note for note in notes.values()),
        encoded,
        time.perf_counter() - started,
    )
    return encoded


def _read_images(urls: list[str], context: EncodeContext) -> tuple[dict[str, Image.Image], dict[str, dict[str, Any]]]:
    """Every image read once: the usable ones, and a note per URL (content hash and size, or why it cannot be
    used), also left in the cache for stage 2."""
    images: dict[str, Image.Image] = {}
    notes: dict[str, dict[str, Any]] = {}
    context.progress.start("read init, mask and control images", len(urls), "images")
    for read in read_input_images(urls, context.storage_options, context.max_input_pixels, PREFETCH_THREADS):
        context.progress.advance(1)
        if read.error:
            notes[read.url] = {"url": read.url, "error": read.error}
            log.warning("input image unusable: %s", read.error)
        else:
            images[read.url] = read.image
            size = {"width": read.image.width, "height": read.image.height}
            notes[read.url] = {"url": read.url, "sha256": read.sha256, **size}
        context.cache.put_note(_note_key(read.url), notes[read.url])
    context.progress.finish()
    return images, notes


def _encode_missing(
    rows: list[Request],
    images: dict[str, Image.Image],
    notes: dict[str, dict[str, Any]],
    present: set[str],
    context: EncodeContext,
) -> int:
    """Encode the tensors the usable rows need and the cache lacks (`present`: its keys), loading the VAE only
    for the first one; returns how many were encoded."""
    encoder: _StartEncoder | None = None
    encoded = 0
    try:
        for row in rows:
            try:
                wanted = _wanted(row, notes)
            except ImageStartError:
                continue  # the row fails in stage 2 with the same reason
            for key, url, encode in wanted:
                if key in present:
                    continue
                encoder = encoder or _StartEncoder(context.source, context.device, context.dtype)
                context.cache.put_tensors(key, encode(encoder, images), {"url": url})
                present.add(key)
                encoded += 1
    finally:
        if encoder is not None:
            encoder.close()
    return encoded


def _image_urls(request: Request) -> list[str]:
    return [url for url in (request.init_image, request.mask_image) if url] + [c.url for c in request.controls]


def _wanted(request: Request, notes: dict[str, dict[str, Any]]) -> list[tuple[str, str, Callable]]:
    """(cache key, image URL, how to encode it from the encoder and the read images) for each tensor the row
    needs; ImageStartError if it cannot run."""
    width, height = request.width, request.height
    init_url, mask_url, padding = request.init_image, request.mask_image, request.mask_crop_padding
    wanted = []
    if request.starts_from_image:
        init, mask = _usable(request, notes)
        if width is None:  # an edit-inpainting row: sized from its image, as stage 2 will resolve it
            from qwen_batch.pipeline.conditions.edit import output_size

            width, height = output_size(request, [(init["width"], init["height"])])
        if padding is None:
            wanted.append((_posterior_key(init["sha256"], width, height), init_url,
                           lambda e, images: e.posterior(images[init_url], width, height)))  # fmt: skip
        else:  # the box around the mask, padded, stretched to the row's aspect ratio (padding_mask_crop)

            def box(images):
                return _StartEncoder.crop(images[mask_url], width, height, padding)

            key = _posterior_key(init["sha256"], width, height, (mask["sha256"], padding))
            wanted.append((key, init_url, lambda e, images: e.posterior(images[init_url], width, height, box(images))))
            key = _overlay_key(init["sha256"], mask["sha256"], width, height, padding)
            wanted.append((key, init_url, lambda e, images: e.overlay(images[init_url], images[mask_url], box(images))))
        if mask is not None:
            key = _mask_key(mask["sha256"], width, height, padding)
            crop = (lambda images: box(images)) if padding is not None else (lambda images: None)
            wanted.append((key, mask_url, lambda e, images: e.mask(images[mask_url], width, height, crop(images))))
    control_mask = None
    if request.controls and mask_url is not None:  # ControlNet-inpainting: the mask goes with the control image
        control_mask = notes[mask_url]
        if control_mask.get("error"):
            raise ImageStartError(f"mask_image: {control_mask['error']}")
        control = request.controls[0]
        note = notes[control.url]
        if note.get("error"):
            raise ImageStartError(f"control_image: {note['error']}")
        key = _control_key(note["sha256"], control.preprocess, width, height, control_mask["sha256"])
        wanted.append((key, control.url, lambda e, images, u=control.url, p=control.preprocess:
                       e.masked_control(images[u], images[mask_url], width, height, p)))  # fmt: skip
        return wanted
    for position, control in enumerate(request.controls):
        note = notes[control.url]
        if note.get("error"):
            raise ImageStartError(f"control_image[{position}]: {note['error']}")
        key = _control_key(note["sha256"], control.preprocess, width, height)
        wanted.append((key, control.url,
                       lambda e, images, u=control.url, p=control.preprocess: e.control(images[u], width, height, p)))  # fmt: skip
    return wanted


def _usable(request: Request, notes: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The row's init and mask notes, or the reason it cannot run: unreadable, or a mask of another size."""
    init = notes[request.init_image]
    if init.get("error"):
        raise ImageStartError(f"init_image: {init['error']}")
    if request.mask_image is None:
        return init, None
    mask = notes[request.mask_image]
    if mask.get("error"):
        raise ImageStartError(f"mask_image: {mask['error']}")
    if (mask["width"], mask["height"]) != (init["width"], init["height"]):
        raise ImageStartError(
            f"mask_image is {mask['width']}x{mask['height']} but init_image is {init['width']}x{init['height']}: "
            "give a mask of the init image's size (white repaints, black keeps)"
        )
    return init, mask


# --- Stage 2 --------------------------------------------------------------------------------------------


class CachedImageInputs:
    """Stage 2's view of the cache for rows with init, mask or control images."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache

    def load(self, request: Request) -> RowStart:
        notes = {url: self.cache.get_note(_note_key(url)) for url in (request.init_image, request.mask_image) if url}
        if any(not note for note in notes.values()):
            raise InputImageError("its init or mask image was not read in stage 1; run the encode stage again")
        init, mask = _usable(request, notes)
        width, height, padding = request.width, request.height, request.mask_crop_padding
        crop = None if padding is None else (mask["sha256"], padding)
        posterior, _ = self.cache.get_tensors(_posterior_key(init["sha256"], width, height, crop))
        shas = [init["sha256"]]
        mask_tensor = overlay = None
        if mask is not None:
            mask_tensor = self.cache.get_tensors(_mask_key(mask["sha256"], width, height, padding))[0]["mask"]
            shas.append(mask["sha256"])
        if padding is not None:
            tensors = self.cache.get_tensors(_overlay_key(init["sha256"], mask["sha256"], width, height, padding))[0]
            overlay = (tensors["overlay"], tuple(int(v) for v in tensors["crop"].tolist()))
        return RowStart(posterior["mean"], posterior["std"], mask_tensor, shas, overlay)

    def load_controls(self, request: Request) -> RowControls:
        from qwen_batch.pipeline.conditions.controlnet import RowControls

        posteriors, shas, masks = [], [], []
        mask = self.cache.get_note(_note_key(request.mask_image)) if request.mask_image else None
        if mask is not None and (not mask or mask.get("error")):
            raise ImageStartError(f"mask_image: {mask.get('error') or 'not read in stage 1; run it again'}")
        for position, control in enumerate(request.controls):
            note = self.cache.get_note(_note_key(control.url))
            if not note:
                raise InputImageError("its control image was not read in stage 1; run the encode stage again")
            if note.get("error"):
                raise ImageStartError(f"control_image[{position}]: {note['error']}")
            masked = mask["sha256"] if mask else None
            key = _control_key(note["sha256"], control.preprocess, request.width, request.height, masked)
            tensors = self.cache.get_tensors(key)[0]
            posteriors.append((tensors["mean"], tensors["std"]))
            masks.append(tensors.get("mask"))
            shas.append(note["sha256"])
        if mask is not None:
            shas.append(mask["sha256"])
        return RowControls(posteriors, shas, masks[0] if mask is not None else None)
