"""Input images: every kind a user may supply becomes an upright 8-bit RGB image, or a clear error."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from qwen_batch.errors import InputImageError, QwenBatchError
from qwen_batch.io.input_images import DEFAULT_MAX_PIXELS, image_sha256, load_input_image

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, scanlines: bytes) -> bytes:
    """A PNG written byte by byte: its header may claim any size, and it may hold 16-bit RGB."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(scanlines))
        + png_chunk(b"IEND", b"")
    )


def close_to(pixel, expected, tolerance=6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def load(data: bytes, **options):
    return load_input_image(data, source="inputs/photo", **options)


def error_of(data: bytes, **options) -> str:
    with pytest.raises(InputImageError) as caught:
        load(data, **options)
    assert "inputs/photo" in str(caught.value), "the message must name the image"
    return str(caught.value)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_give_rgb_with_size_hash_and_format(image_format):
    data = encode(Image.new("RGB", (48, 32), BLUE), image_format)
    loaded = load(data)
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (48, 32)
    assert loaded.sha256 == image_sha256(data) == hashlib.sha256(data).hexdigest()
    assert loaded.format == image_format
    assert close_to(loaded.image.getpixel((24, 16)), BLUE)


def test_exif_orientation_is_applied():
    # Stored 60 wide and 30 high with a red mark top left; Orientation 6 = "turn 90 degrees clockwise to view".
    stored = Image.new("RGB", (60, 30), BLUE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load(encode(stored, "JPEG", exif=exif, quality=95))
    assert loaded.image.size == (30, 60), "width and height must be swapped"
    assert close_to(loaded.image.getpixel((25, 4)), RED, tolerance=12), "the mark must move to the top right"
    assert close_to(loaded.image.getpixel((4, 4)), BLUE, tolerance=12)
    assert 0x0112 not in loaded.image.getexif(), "the tag goes with the turn, so nothing turns the image twice"


def test_palette_transparency_becomes_white_not_the_stored_colour():
    palette_image = Image.new("P", (40, 20), 0)
    palette_image.putpalette([*BLACK, *RED] + [0, 0, 0] * 254)  # index 0 stores black...
    palette_image.paste(1, (20, 0, 40, 20))
    loaded = load(encode(palette_image, "PNG", transparency=0))  # ...and is transparent
    assert loaded.original_mode == "P"
    assert loaded.image.getpixel((5, 10)) == WHITE
    assert loaded.image.getpixel((30, 10)) == RED


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))  # fully transparent pixels store black
    rgba.paste((255, 0, 0, 255), (10, 0, 20, 10))
    rgba.paste((255, 0, 0, 128), (20, 0, 30, 10))
    for image_format in ("PNG", "WEBP"):
        image = load(encode(rgba, image_format, **({"lossless": True} if image_format == "WEBP" else {}))).image
        assert image.getpixel((5, 5)) == WHITE, image_format
        assert image.getpixel((15, 5)) == RED, image_format
        assert close_to(image.getpixel((25, 5)), (255, 127, 127), tolerance=2), image_format


def test_grey_with_alpha_and_colour_key_transparency_become_white():
    grey_alpha = Image.new("LA", (20, 10), (0, 0))
    grey_alpha.paste((100, 255), (10, 0, 20, 10))
    image = load(encode(grey_alpha, "PNG")).image
    assert image.getpixel((5, 5)) == WHITE
    assert image.getpixel((15, 5)) == (100, 100, 100)

    keyed = Image.new("RGB", (20, 10), BLACK)
    keyed.paste(BLUE, (10, 0, 20, 10))
    image = load(encode(keyed, "PNG", transparency=BLACK)).image  # a tRNS colour key: black is transparent
    assert image.getpixel((5, 5)) == WHITE
    assert image.getpixel((15, 5)) == BLUE


def test_cmyk_jpeg_becomes_rgb():
    loaded = load(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert loaded.original_mode == "CMYK"
    assert close_to(loaded.image.getpixel((8, 8)), RED, tolerance=10)


def test_greyscale_and_one_bit_become_rgb():
    grey = load(encode(Image.new("L", (8, 8), 77), "PNG")).image
    assert grey.getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (4, 0, 8, 8))
    image = load(encode(bilevel, "PNG")).image
    assert (image.getpixel((0, 0)), image.getpixel((7, 0))) == (BLACK, WHITE)


def test_16_bit_grey_is_scaled_not_clipped():
    values = [0, 257, 1000, 32768, 65535]
    scanline = b"\x00" + struct.pack(f">{len(values)}H", *values)
    loaded = load(handmade_png(len(values), 1, 16, 0, scanline))
    assert loaded.original_mode.startswith("I")
    # Clipping would make every value above 255 white.
    assert [loaded.image.getpixel((x, 0))[0] for x in range(len(values))] == [0, 1, 4, 128, 255]


def test_16_bit_rgb_is_scaled_not_clipped():
    scanline = b"\x00" + struct.pack(">6H", 0xFFFF, 0x8000, 0x00FF, 0x4000, 0x0000, 0xC000)
    image = load(handmade_png(2, 1, 16, 2, scanline)).image
    assert image.getpixel((0, 0)) == (255, 128, 0)
    assert image.getpixel((1, 0)) == (64, 0, 192)


def test_a_huge_size_in_the_header_is_refused_before_decoding():
    # A 30-byte IDAT that claims 10000x6000 pixels (60 MP): decoding it would fail as truncated, so the
    # "too large" error proves the size was checked first, and it is quick.
    started = time.perf_counter()
    message = error_of(handmade_png(10_000, 6_000, 8, 2, b"\x00" * 10))
    assert time.perf_counter() - started < 0.5
    assert "10000x6000" in message and "60.0 megapixels" in message
    assert f"{DEFAULT_MAX_PIXELS / 1e6:g} megapixels" in message, "the message must state the limit"
    assert "downscale" in message.lower()


def test_pillows_own_bomb_check_becomes_our_error():
    message = error_of(handmade_png(100_000, 100_000, 8, 2, b"\x00" * 10))
    assert "10,000.0 megapixels" in message and "50 megapixels" in message


def test_the_limit_is_configurable():
    data = encode(Image.new("RGB", (64, 64), BLUE), "PNG")
    assert "0.004 megapixels" in error_of(data, max_pixels=4_000)
    assert load(data, max_pixels=64 * 64).width == 64


def test_extreme_aspect_ratio_is_refused():
    assert load(encode(Image.new("RGB", (200, 1)), "PNG")).width == 200
    assert "200:1" in error_of(encode(Image.new("RGB", (201, 1)), "PNG"))


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused_with_the_accepted_ones_listed(image_format):
    message = error_of(encode(Image.new("RGB", (16, 16), RED), image_format))
    assert image_format in message
    assert "PNG, JPEG or WebP" in message


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_data_is_refused(image_format, keep):
    data = encode(Image.radial_gradient("L").convert("RGB"), image_format)
    message = error_of(data[: int(len(data) * keep)])
    assert "damaged or incomplete" in message or "not an image" in message


def test_random_bytes_html_and_empty_data_are_refused():
    assert "PNG, JPEG or WebP" in error_of(random.Random(0).randbytes(2000))
    assert "<!DOCTYPE html>" in error_of(b"<!DOCTYPE html><html>Access denied</html>")
    assert "empty" in error_of(b"")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_corrupted_files_never_raise_anything_else(image_format):
    """Damaged bytes anywhere: an image or an InputImageError, never another exception."""
    data = encode(Image.radial_gradient("L").convert("RGBA" if image_format != "JPEG" else "RGB"), image_format)
    rng = random.Random(image_format)
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            # Mostly in the first 200 bytes, where headers and chunk tables are: more kinds of failure.
            end = 200 if rng.random() < 0.7 else len(damaged)
            damaged[rng.randrange(end)] = rng.randrange(256)
        try:
            loaded = load(bytes(damaged))
        except QwenBatchError as error:
            assert isinstance(error, InputImageError)
        else:
            assert loaded.image.mode == "RGB"
