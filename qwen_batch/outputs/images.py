"""The image file of a row in the format the run asked for (png, webp, jpeg), with its parameters inside.

PNG keeps them in text chunks (outputs/png.py). WebP and JPEG have no such chunks, so they go into EXIF:
- the human-readable `parameters` text in the Exif UserComment, where A1111-style tools, Civitai and the
  image viewers that show a prompt look in JPEG and WebP files;
- the `qwen_batch` JSON in the XPComment tag of IFD0 (UTF-16LE, the Windows "Comments" field): it round-trips
  any prompt exactly (ImageDescription is ASCII by the standard: Pillow writes "?" for the rest), it is written
  by `encode_image` alone whatever XMP the caller passes, and exiftool shows it. `read_image_metadata` also
  finds it in the XMP packet when `marks.xmp_packet(..., extra_json=...)` put it there.
An XMP packet (outputs/marks.py: the IPTC AI-generated mark) goes where each format's readers look for it.
"""

from __future__ import annotations

import io
import json
from enum import Enum
from typing import TYPE_CHECKING, Any

from qwen_batch import __version__
from qwen_batch.errors import ConfigError
from qwen_batch.outputs.png import JSON_KEY, PARAMETERS_KEY, XMP_KEY, encode_png, parameters_text

if TYPE_CHECKING:
    from PIL import Image


class ImageFormat(str, Enum):
    PNG = "png"
    WEBP = "webp"
    JPEG = "jpeg"

    @property
    def extension(self) -> str:
        return "jpg" if self is ImageFormat.JPEG else self.value  # .jpg: what dataset tools (img2dataset, NeMo) write

    @property
    def mime(self) -> str:
        return f"image/{self.value}"

    @property
    def keeps_alpha(self) -> bool:
        return self is not ImageFormat.JPEG


IMAGE_FORMATS = tuple(f.value for f in ImageFormat)

# Quality of the lossy formats when the run gives none. JPEG 95: img2dataset's default (encode_quality), high enough
# that a model trained on the images does not learn block artefacts. WebP 90: Pillow's 80 (cwebp's 75) bands on the
# smooth gradients these models draw; at 90 a noisy 1024x1024 picture is still a third to a seventh of its PNG.
DEFAULT_QUALITY = {ImageFormat.WEBP: 90, ImageFormat.JPEG: 95}

# WebP `method` (0 fastest .. 6 smallest). 4, libwebp's and cwebp's default, keeps up: measured with encode_image on
# one core (libwebp 1.6) for 1024x1024, 0.2-0.28 s for pure noise (the worst case), ~0.2 s for a noisy gradient,
# 0.07-0.09 s for smooth RGB or RGBA; so 2 writer threads write several images a second. Method 6 took 2-3x as long
# (1.4 s on RGBA) for files 1-3 % smaller; 5 saved at most 2 %. (JPEG: ~10 ms; PNG: 0.03-0.2 s.)
WEBP_METHOD = 4

# Pillow refuses a JPEG APP1 segment (EXIF or XMP) over this many bytes: a marker's 16-bit length, less its header.
_JPEG_SEGMENT_BYTES = 65533 - 6

_USER_COMMENT = 0x9286  # in the Exif IFD
_XP_COMMENT = 0x9C9C  # in IFD0
_SOFTWARE = 0x0131  # in IFD0
_ASCII_PREFIX = b"ASCII\0\0\0"
_UNICODE_PREFIX = b"UNICODE\0"


def check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"--image-quality must be a whole number from 1 to 100, not {quality!r}")
    return quality


def refuse_alpha(fmt: ImageFormat, has_alpha: bool, model: str) -> None:
    """Before any model loads: a format that would drop the alpha channel of a model's RGBA images is refused."""
    if has_alpha and not ImageFormat(fmt).keeps_alpha:
        raise ConfigError(
            f"--image-format {ImageFormat(fmt).value} cannot keep the alpha channel of {model}'s RGBA images: "
            f"use {' or '.join(f.value for f in ImageFormat if f.keeps_alpha)}"
        )


def encode_image(
    image: Image.Image,
    fmt: ImageFormat,
    metadata: dict[str, Any],
    *,
    quality: int | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """The image file's bytes, its parameters (and the XMP packet when given) inside. `quality` is for the lossy
    formats (DEFAULT_QUALITY when None); PNG ignores it."""
    fmt = ImageFormat(fmt)
    if fmt is ImageFormat.PNG:
        return encode_png(image, metadata, xmp=xmp)
    quality = DEFAULT_QUALITY[fmt] if quality is None else check_quality(quality)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    refuse_alpha(fmt, has_alpha, str(metadata.get("model", "the model")))
    image = image.convert("RGBA" if has_alpha else "RGB") if image.mode not in ("RGB", "RGBA") else image
    exif = _exif(metadata).tobytes()
    if fmt is ImageFormat.JPEG:
        # A prompt long enough to overflow the one segment JPEG gives EXIF (or XMP) would make Pillow fail the row
        # with a bare "EXIF data is too long"; say what to do instead.
        for what, size in (("parameters (EXIF)", len(exif)), ("XMP packet", len(xmp or b""))):
            if size > _JPEG_SEGMENT_BYTES:
                raise ConfigError(
                    f"row {metadata.get('id', '?')}: its {what} take {size} bytes, more than the 64 KiB a JPEG "
                    "metadata segment holds (a very long prompt?): use --image-format png or webp"
                )
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality, "exif": exif}
    if xmp is not None:
        options["xmp"] = xmp
    if fmt is ImageFormat.WEBP:
        # alpha_quality 100: the alpha plane is compressed losslessly (a cut-out's edge stays exact), `quality` is
        # for the colour.
        image.save(buffer, format="WEBP", method=WEBP_METHOD, alpha_quality=100, **options)
    else:
        # Pillow's defaults otherwise: 4:2:0 chroma, no optimize pass (libjpeg-turbo, ~10 ms for 1024x1024).
        image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _exif(metadata: dict[str, Any]) -> Image.Exif:
    from PIL import ExifTags, Image

    exif = Image.Exif()  # big-endian ("MM"), as piexif writes it: UNICODE user comments below are UTF-16BE to match
    exif[_SOFTWARE] = f"qwen-batch {__version__}"
    exif[_XP_COMMENT] = json.dumps(metadata, ensure_ascii=False, sort_keys=True).encode("utf-16-le") + b"\0\0"
    exif.get_ifd(ExifTags.IFD.Exif)[_USER_COMMENT] = _user_comment(parameters_text(metadata))
    return exif


def _user_comment(text: str) -> bytes:
    # The Exif character-code prefix: ASCII when the text is ASCII (half the bytes), else UNICODE in the byte order
    # of the EXIF header (big-endian here), which is also what A1111 writes (piexif's UserComment.dump, "unicode").
    if text.isascii():
        return _ASCII_PREFIX + text.encode("ascii")
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def _decode_user_comment(value: bytes | str, endian: str | None) -> str:
    if isinstance(value, str):
        return value
    prefix, body = value[:8], value[8:]
    if prefix == _UNICODE_PREFIX:  # UTF-16 in the byte order of the EXIF header, as the Exif standard says
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace").rstrip("\0")
        return body.decode("utf-16-le" if endian == "<" else "utf-16-be", errors="replace").rstrip("\0")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def _open(data: bytes) -> Image.Image:
    from PIL import Image

    return Image.open(io.BytesIO(data))


def read_parameters(data: bytes) -> str | None:
    """The human-readable parameters text from a PNG, WebP or JPEG written by `encode_image`, None without it."""
    from PIL import ExifTags

    with _open(data) as image:
        if image.format == "PNG":
            return image.info.get(PARAMETERS_KEY)
        exif = image.getexif()
        value = exif.get_ifd(ExifTags.IFD.Exif).get(_USER_COMMENT)
        return None if value is None else _decode_user_comment(value, exif.endian)


def read_image_metadata(data: bytes) -> dict[str, Any]:
    """The `qwen_batch` JSON back from a PNG, WebP or JPEG written by `encode_image` (KeyError when it has none)."""
    with _open(data) as image:
        if image.format == "PNG" and JSON_KEY in image.info:
            return json.loads(image.info[JSON_KEY])
        value = image.getexif().get(_XP_COMMENT)
        if value is not None:
            raw = bytes(value) if isinstance(value, (bytes, tuple, list)) else str(value).encode("utf-16-le")
            try:
                return json.loads(raw.decode("utf-16-le", errors="replace").rstrip("\0"))
            except ValueError:  # another tool's comment, not ours: try the XMP
                pass
        xmp = _xmp_text(image)
    if xmp is not None:
        from qwen_batch.outputs.marks import read_extra_json

        extra = read_extra_json(xmp)
        if extra is not None:
            return json.loads(extra)
    raise KeyError(f"no {JSON_KEY} metadata in this image")


def read_xmp(data: bytes) -> str | None:
    """The XMP packet's text from a PNG, WebP or JPEG, None without one."""
    with _open(data) as image:
        return _xmp_text(image)


def _xmp_text(image: Image.Image) -> str | None:
    # Pillow puts the packet in info["xmp"] for all three (bytes for JPEG/WebP; PNG's iTXt also as its key).
    value = image.info.get("xmp") or image.info.get(XMP_KEY)
    if not value:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
