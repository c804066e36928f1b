"""A generated row's image file: its format, the generation parameters inside it, the AI-generated marks.

Every image gets an XMP packet with IPTC's digital source type (`trainedAlgorithmicMedia`, or
`compositeWithTrainedAlgorithmicMedia` for a row that starts from a person's image: an edit, image-to-image,
inpainting, or 2.1's condition images) and the generator; with content credentials it is also signed with C2PA, the
row's input images as its ingredients. The writer's threads call `encode` for each row.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from qwen_batch.io.storage import read_url
from qwen_batch.outputs.images import ImageFormat, encode_image
from qwen_batch.outputs.marks import Mark, xmp_packet

if TYPE_CHECKING:
    from PIL import Image

    from qwen_batch.io.storage import StorageOptions
    from qwen_batch.manifest import Request
    from qwen_batch.outputs.content_credentials import ContentCredentials
    from qwen_batch.run.results import Record


# The marks every image gets, as summaries name them: unsigned, and signed with C2PA content credentials.
MARKS = {False: "IPTC XMP", True: "IPTC XMP + C2PA (signed)"}


def starts_from_user_image(request: Request) -> bool:
    """The row changes a person's image (edit inputs, 2.1's condition images, an init image), rather than making
    one from text alone; a control image only guides the layout and is not in the result."""
    return bool(request.images) or request.init_image is not None


def row_metadata(request: Request, record: Record) -> dict[str, Any]:
    """What the image file says about how it was made (the PNG's text chunks, the WebP/JPEG EXIF)."""
    metadata = {"id": request.id, **request.parameters(), "model": record.model}
    if record.transformer:
        metadata |= {"transformer": record.transformer, "transformer_sha256": record.transformer_sha256}
    if record.input_sha256:
        metadata["input_sha256"] = record.input_sha256
    if record.steps_computed is not None:  # a step cache: how many steps ran in full
        metadata["steps_computed"] = record.steps_computed
        if record.uncond_steps_computed is not None:
            metadata["uncond_steps_computed"] = record.uncond_steps_computed
    return metadata


class ImageEncoder:
    """Encodes rows' images in one format, marked, and signed when given content credentials. Thread-safe."""

    def __init__(
        self,
        image_format: str | ImageFormat = ImageFormat.PNG,
        quality: int | None = None,
        credentials: ContentCredentials | None = None,
        storage_options: StorageOptions | None = None,
    ):
        self.format = ImageFormat(image_format)
        self.quality, self.credentials, self.storage_options = quality, credentials, storage_options

    @property
    def marks(self) -> str:
        """The marks every image gets, as the summary names them."""
        return MARKS[self.credentials is not None]

    def encode(self, request: Request, image: Image.Image, record: Record) -> bytes:
        mark = Mark.for_row(starts_from_user_image(request), record.model or "", title=request.id)
        data = encode_image(
            image, self.format, row_metadata(request, record), quality=self.quality, xmp=xmp_packet(mark)
        )
        if self.credentials is None:
            return data
        title = f"{request.id}.{self.format.extension}"
        return self.credentials.sign(data, self.format, mark, title=title, ingredients=self._ingredients(request))

    def _ingredients(self, request: Request) -> list[tuple[bytes, str, str]]:
        """The person's images the row started from, for C2PA: (bytes, MIME type, name)."""
        from PIL import Image

        urls = [*request.images, *([request.init_image] if request.init_image else [])]
        ingredients = []
        for url in urls:
            data = read_url(url, self.storage_options)
            with Image.open(io.BytesIO(data)) as opened:
                mime = Image.MIME.get(opened.format or "", "application/octet-stream")
            ingredients.append((data, mime, url.rstrip("/").rsplit("/", 1)[-1]))
        return ingredients
