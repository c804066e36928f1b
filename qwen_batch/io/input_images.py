"""Input images: the bytes a user supplies for an edit, turned into a safe RGB image and its content hash.

`load_input_image` is the only way an input image enters qwen-batch. It takes bytes (fetching them, and
deciding which locations may be read, is the caller's job) and either returns an `InputImage` or raises
`InputImageError` with a message that names the image, the problem and the fix; never another exception.

What it accepts and how it normalizes, in order:

1. **Formats**: PNG, JPEG and WebP, judged by the decoded content, not the file name. Anything else (GIF,
   BMP, TIFF, HEIC, an HTML error page...) is refused with the list of accepted formats. Of an animated
   PNG or WebP only the first frame is used.
2. **Size before pixels**: the header gives the size before any pixel is decoded (Pillow's `open` is
   lazy), and an image of more than `max_pixels` pixels is refused right there, so a small file that
   claims a huge size (a decompression bomb) costs nothing. The default, 50 megapixels, is about 8,000 x
   6,000 and covers any camera, while the edit pipelines resize every input to about 1 megapixel anyway.
   Pillow's own bomb check (about 179 megapixels) still applies above that, whatever `max_pixels` says.
3. **Damaged data**: empty, truncated or corrupt bytes are refused (Pillow is not told to load truncated
   images, which would pad them with grey).
4. **Orientation**: the EXIF Orientation tag is applied (`ImageOps.exif_transpose`), so a phone photo
   taken upright is edited upright, as every image viewer shows it. The tag is removed with it.
5. **Colour**: everything becomes 8-bit RGB, because the model was trained on RGB images:
   - transparency (RGBA, LA, palette images with transparency, a PNG transparent colour key) is
     composited **over white**. Dropping the alpha channel instead would reveal whatever colour the
     transparent pixels happen to store, usually black, turning a cut-out's background into a black
     area the model would faithfully keep; white is how viewers and documents show transparency and
     the usual background of product cut-outs;
   - 16-bit greyscale PNGs are **scaled** to 8 bits (value / 257, rounded); Pillow's plain conversion
     would clip everything above 255 to white. 16-bit RGB(A) PNGs are decoded by Pillow to 8 bits per
     channel by keeping the high byte, which is also a scaling, not a clip;
   - palette, greyscale, 1-bit and CMYK images go through Pillow's conversion (for CMYK JPEGs a plain
     formula, not a colour-managed one: colours may shift a little, as in most non-print software).
6. **Aspect ratio**: at most 200:1, the limit of the Qwen2.5-VL image processor the edit models use.

The hash (`sha256`) is of the bytes as supplied, so it identifies the input whatever the decoding does
and the cache can key on it without decoding.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.errors import InputImageError, QwenBatchError
from qwen_batch.io.storage import StorageOptions, read_url

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "InputImage",
    "InputImageError",
    "image_sha256",
    "input_versions",
    "load_input_image",
    "read_input_images",
]

# Pillow's format names; the order is the one messages list them in.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000
# Qwen2VLImageProcessor (smart_resize) raises for a more elongated image.
MAX_ASPECT_RATIO = 200
_ACCEPTED_TEXT = "PNG, JPEG or WebP"
_WHITE = (255, 255, 255, 255)
# Modes whose 16-bit (or wider) grey values must be scaled, not clipped, to 8 bits.
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class InputImage:
    image: Image.Image  # 8-bit RGB, upright (EXIF orientation applied), fully decoded
    sha256: str  # of the bytes as supplied
    format: str  # "PNG", "JPEG" or "WEBP"
    original_mode: str  # Pillow's mode before conversion: "RGBA", "P", "CMYK", "I;16", ...

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def image_sha256(data: bytes) -> str:
    """The hex SHA-256 of an input image's bytes: its identity in caches and results."""
    return hashlib.sha256(data).hexdigest()


def load_input_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str, keep_alpha: bool = False
) -> InputImage:
    """Decode `data` (a PNG, JPEG or WebP file's bytes) into an upright 8-bit RGB image (RGBA where the image
    has transparency and `keep_alpha` asks for it: Qwen-Image-2.1's VAE reads the alpha channel).

    `source` names the image in error messages (its path or URL). Raises `InputImageError` for anything
    that is not a usable image of at most `max_pixels` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputImageError(
            f"input image {source} is empty (0 bytes): check that the file was written or uploaded completely"
        )
    try:
        # Reads only the header: the size is known, no pixel is decoded yet.
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputImageError(
            f"input image {source} is not an image qwen-batch can read (it starts with {data[:16]!r}): "
            f"supply a {_ACCEPTED_TEXT} file"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_large(source, max_pixels, _pillow_bomb_size(error)) from None
    except Exception as error:  # Pillow's header parsers raise many types on malformed data
        raise _damaged(source, "", error) from None

    if image.format not in ACCEPTED_FORMATS:
        raise InputImageError(
            f"input image {source} is a {image.format} image; qwen-batch accepts {_ACCEPTED_TEXT}: "
            "convert it (for example to PNG) and point the manifest at the converted file"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(source, max_pixels, f"{width}x{height}, {width * height / 1e6:.1f} megapixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputImageError(
            f"input image {source} is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1, which the "
            "edit models' image processor cannot take: crop it"
        )

    original_mode = image.mode
    try:
        image.load()
        upright = _upright(image)
        rgb = _to_rgb(upright, keep_alpha)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_large(source, max_pixels, _pillow_bomb_size(error)) from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, zlib.error... on bad data
        raise _damaged(source, image.format, error) from None
    return InputImage(image=rgb, sha256=image_sha256(data), format=image.format, original_mode=original_mode)


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF Orientation tag says (a copy without the tag), or itself if untagged."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """8-bit RGB: alpha composited over white (or kept, as RGBA), 16-bit grey scaled (see the module docstring)."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_GREY:
        # `point` on mode I evaluates the lambda as a linear map: 0..65535 -> 0..255, rounded.
        image = image.convert("I").point(lambda value: value / 257 + 0.5).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Converting to RGBA applies a palette's or a colour key's transparency as alpha.
        rgba = image.convert("RGBA")
        if keep_alpha:
            return rgba
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _too_large(source: str, max_pixels: int, size: str) -> InputImageError:
    return InputImageError(
        f"input image {source} is too large ({size}): the limit is {max_pixels / 1e6:g} megapixels, "
        "a guard against decompression bombs. Downscale it (the edit models work at about 1 megapixel "
        "anyway), or raise the limit (--max-input-pixels) if you trust the image"
    )


def _pillow_bomb_size(error: Exception) -> str:
    """The size in Pillow's own decompression-bomb message ("Image size (N pixels) exceeds ...")."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(error))
    if found is None:
        return f"Pillow refuses to decode it: {error}"
    return f"{int(found.group(1)) / 1e6:,.1f} megapixels, over Pillow's own limit"


def _damaged(source: str, image_format: str, error: Exception) -> InputImageError:
    kind = f"{image_format} " if image_format else ""
    return InputImageError(
        f"input image {source} is damaged or incomplete ({kind}data: {error}): "
        "re-export it or copy it again; a partial upload or download is the usual cause"
    )


@dataclass
class ReadInput:
    """One input URL as read: its image and content hash, or why it cannot be used."""

    url: str
    image: Image.Image | None = None
    sha256: str = ""
    error: str = ""


def read_input_images(
    urls: Sequence[str], storage_options: StorageOptions, max_pixels: int, threads: int, keep_alpha: bool = False
) -> Iterator[ReadInput]:
    """Fetch and decode input images in order, a few ahead of the consumer."""

    def read(url: str) -> ReadInput:
        try:
            data = read_url(url, storage_options)
            loaded = load_input_image(data, max_pixels=max_pixels, source=url, keep_alpha=keep_alpha)
        except QwenBatchError as error:
            return ReadInput(url=url, error=str(error))
        return ReadInput(url=url, image=loaded.image, sha256=loaded.sha256)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        window = threads * 2  # bounded: decoded images are large
        pending = []
        for url in urls:
            pending.append(pool.submit(read, url))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def input_versions(urls: Sequence[str], storage_options: StorageOptions, threads: int = 8) -> dict[str, str]:
    """Each input URL's version as its store reports it (size and ETag or modification time; one stat or HEAD
    each, no download), so a file replaced under the same name gives its rows a new fingerprint. A URL that
    cannot be reached is "unreadable": its rows fail in stage 1 with the reason."""
    from qwen_batch.io.storage import url_info

    def version(url: str) -> str:
        try:
            info = url_info(url, storage_options)
        except QwenBatchError:
            return "unreadable"
        return f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or ''}"

    unique = list(dict.fromkeys(urls))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(unique, pool.map(version, unique), strict=True))
