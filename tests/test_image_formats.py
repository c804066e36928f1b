"""Image files in png, webp and jpeg: the picture, its alpha, its parameters and its XMP mark survive the round trip."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import ExifTags, Image

from qwen_batch.errors import ConfigError
from qwen_batch.outputs.images import (
    DEFAULT_QUALITY,
    IMAGE_FORMATS,
    ImageFormat,
    check_quality,
    encode_image,
    read_image_metadata,
    read_parameters,
    read_xmp,
    refuse_alpha,
)
from qwen_batch.outputs.marks import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    Mark,
    read_source_type,
    xmp_packet,
)
from qwen_batch.outputs.png import encode_png, parameters_text

FORMATS = list(ImageFormat)


def _metadata(prompt: str = 'a red fox in snow, <golden> & "bright"') -> dict:
    return {
        "id": "fox-1",
        "prompt": prompt,
        "negative_prompt": "blurry",
        "num_inference_steps": 30,
        "true_cfg_scale": 4.0,
        "seed": 7,
        "width": 64,
        "height": 64,
        "model": "Qwen/Qwen-Image",
    }


def _picture(size: int = 64, mode: str = "RGB") -> Image.Image:
    # A smooth gradient with a little noise: what lossy codecs see in generated pictures, not a flat colour.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1) + rng.integers(0, 8, (size, size, 3))
    array = np.clip(rgb, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.where(x < size // 2, 255, (y * 255 // size)).astype(np.uint8)[..., None]
        array = np.concatenate([array, alpha], -1)
    return Image.fromarray(array, mode)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_formats_name_their_files_and_types():
    assert IMAGE_FORMATS == ("png", "webp", "jpeg")
    assert [f.extension for f in FORMATS] == ["png", "webp", "jpg"]
    assert [f.mime for f in FORMATS] == ["image/png", "image/webp", "image/jpeg"]
    assert [f.keeps_alpha for f in FORMATS] == [True, True, False]
    assert ImageFormat("jpeg") is ImageFormat.JPEG


@pytest.mark.parametrize("quality", [0, 101, 2.5, "90", True])
def test_quality_outside_1_to_100_is_refused(quality):
    with pytest.raises(ConfigError, match="1 to 100"):
        check_quality(quality)
    assert check_quality(1) == 1 and check_quality(100) == 100


def test_jpeg_refuses_a_models_rgba_images_before_loading_it():
    with pytest.raises(ConfigError) as error:
        refuse_alpha(ImageFormat.JPEG, True, "Qwen/Qwen-Image-Layered")
    message = str(error.value)
    assert "--image-format jpeg" in message and "Qwen/Qwen-Image-Layered" in message
    assert "png or webp" in message
    refuse_alpha(ImageFormat.JPEG, False, "Qwen/Qwen-Image")
    refuse_alpha(ImageFormat.WEBP, True, "Qwen/Qwen-Image-Layered")
    refuse_alpha(ImageFormat.PNG, True, "Qwen/Qwen-Image-Layered")


def test_jpeg_refuses_an_rgba_image_it_is_given():
    with pytest.raises(ConfigError, match="alpha channel"):
        encode_image(_picture(mode="RGBA"), ImageFormat.JPEG, _metadata())


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_picture_decodes_to_the_same_pixels(fmt):
    picture = _picture()
    decoded = _decode(encode_image(picture, fmt, _metadata()))
    assert decoded.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt.value]
    assert decoded.mode == "RGB" and decoded.size == picture.size
    difference = np.abs(np.asarray(decoded, np.int16) - np.asarray(picture, np.int16))
    if fmt is ImageFormat.PNG:
        assert difference.max() == 0
    else:  # lossy at the default quality: close everywhere on average, no pixel far off
        assert difference.mean() < 3 and np.percentile(difference, 99) < 20


@pytest.mark.parametrize("fmt", [ImageFormat.PNG, ImageFormat.WEBP])
def test_rgba_keeps_its_alpha_exactly(fmt):
    picture = _picture(mode="RGBA")
    decoded = _decode(encode_image(picture, fmt, _metadata()))
    assert decoded.mode == "RGBA"
    assert np.array_equal(np.asarray(decoded)[..., 3], np.asarray(picture)[..., 3])


def test_lower_quality_makes_smaller_files():
    picture = _picture(128)
    for fmt in (ImageFormat.WEBP, ImageFormat.JPEG):
        small = encode_image(picture, fmt, _metadata(), quality=30)
        default = encode_image(picture, fmt, _metadata())
        assert len(small) < len(default), fmt
        assert DEFAULT_QUALITY[fmt] > 30


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("prompt", ['a red fox in snow, <golden> & "bright"', "一只在雪地里的红狐狸，金色的光"])
def test_parameters_text_and_json_read_back(fmt, prompt):
    metadata = _metadata(prompt) | {"loras": [], "strength": None}
    data = encode_image(_picture(), fmt, metadata)
    assert read_image_metadata(data) == metadata
    assert read_parameters(data) == parameters_text(metadata)
    assert read_parameters(data).startswith(prompt + "\nNegative prompt: blurry\nSteps: 30")


@pytest.mark.parametrize("fmt", [ImageFormat.WEBP, ImageFormat.JPEG])
def test_parameters_are_in_exif_user_comment_where_image_tools_read_them(fmt):
    # Read with Pillow alone, as A1111-style tools do: Exif UserComment with its character-code prefix.
    metadata = _metadata("一只狐狸")
    with Image.open(io.BytesIO(encode_image(_picture(), fmt, metadata))) as image:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        software = image.getexif()[ExifTags.Base.Software]
    assert comment.startswith(b"UNICODE\0")
    assert comment[8:].decode("utf-16-be") == parameters_text(metadata)
    assert software.startswith("qwen-batch ")
    ascii_data = encode_image(_picture(), fmt, _metadata())
    with Image.open(io.BytesIO(ascii_data)) as image:
        assert image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment].startswith(b"ASCII\0\0\0")


def test_png_without_xmp_is_todays_png():
    picture, metadata = _picture(), _metadata()
    assert encode_image(picture, ImageFormat.PNG, metadata) == encode_png(picture, metadata)
    assert read_xmp(encode_png(picture, metadata)) is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", [TRAINED_ALGORITHMIC_MEDIA, COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA])
def test_xmp_mark_reads_back_through_pillow(fmt, source):
    mark = Mark.for_row(source == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, "Qwen/Qwen-Image-Edit-2511")
    assert mark.source_type == source
    data = encode_image(_picture(), fmt, _metadata(), xmp=xmp_packet(mark))
    with Image.open(io.BytesIO(data)) as image:  # where Pillow (and so most Python readers) puts it
        packet = image.info["xmp"]
    text = packet.decode("utf-8") if isinstance(packet, bytes) else packet
    assert read_source_type(text) == source
    assert read_xmp(data) == text
    assert "Qwen/Qwen-Image-Edit-2511" in text and 'xmp:CreatorTool="qwen-batch ' in text
    assert read_image_metadata(data) == _metadata()  # the XMP does not displace the parameters


@pytest.mark.parametrize("fmt", [ImageFormat.WEBP, ImageFormat.JPEG])
def test_json_is_read_from_the_xmp_when_exif_has_none(fmt):
    # A file whose EXIF was dropped by another tool but whose XMP was kept (extra_json) still gives its JSON.
    metadata = _metadata("<b>&amp; 狐狸</b>")
    packet = xmp_packet(Mark.for_row(False, "Qwen/Qwen-Image"), extra_json=json.dumps(metadata, ensure_ascii=False))
    buffer = io.BytesIO()
    _picture().save(buffer, format={"webp": "WEBP", "jpeg": "JPEG"}[fmt.value], xmp=packet)
    assert read_image_metadata(buffer.getvalue()) == metadata
    with pytest.raises(KeyError):
        read_image_metadata(_encode_plain(fmt))


def _encode_plain(fmt: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    _picture().save(buffer, format={"webp": "WEBP", "jpeg": "JPEG"}[fmt.value])
    return buffer.getvalue()


def test_jpeg_says_what_to_do_when_a_prompt_overflows_its_metadata_segment():
    with pytest.raises(ConfigError, match="use --image-format png or webp"):
        encode_image(_picture(), ImageFormat.JPEG, _metadata("fox " * 10_000))
    data = encode_image(_picture(), ImageFormat.WEBP, _metadata("fox " * 10_000))  # WebP has no such limit
    assert read_image_metadata(data)["prompt"] == "fox " * 10_000


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_1024_picture_round_trips(fmt):
    picture = _picture(1024)
    metadata = _metadata() | {"width": 1024, "height": 1024}
    data = encode_image(picture, fmt, metadata, xmp=xmp_packet(Mark.for_row(False, "Qwen/Qwen-Image")))
    decoded = _decode(data)
    assert decoded.size == (1024, 1024)
    assert read_image_metadata(data) == metadata
    assert read_source_type(read_xmp(data)) == TRAINED_ALGORITHMIC_MEDIA
    if fmt is not ImageFormat.PNG:
        assert len(data) < len(encode_png(picture, metadata))
