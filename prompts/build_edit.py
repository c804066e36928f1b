"""Draw the example edit manifests' input images into prompts/edit/, then build the edit manifests.

    python prompts/build_edit.py

The images are simple shapes, gradients and text drawn with Pillow, with no randomness: the same Pillow
build writes the same bytes. They cover what input images come as: PNG, JPEG and WebP; square, wide
and tall (256x256, 320x192, 192x320); a transparent background (composited over white when read); and
a JPEG stored sideways with an EXIF Orientation tag (read upright). Every image is checked with
qwen-batch's own loader. `edit_example.jsonl` (one `image` per row) and `edit_plus_example.jsonl`
(an `images` list per row) name them relative to the manifests' folder; `jsonl_to_parquet.py` turns each
into its `.parquet` (`python prompts/build.py` draws these images too, then rebuilds every manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
INPUTS = HERE / "edit"
EDIT_MANIFESTS = ("edit_example.jsonl", "edit_plus_example.jsonl")
MAX_TOTAL_BYTES = 200_000  # they live in the repository


def red_square() -> Image.Image:
    image = Image.new("RGB", (256, 256), (232, 232, 228))
    ImageDraw.Draw(image).rectangle((72, 72, 184, 184), fill=(214, 40, 40))
    return image


def sunset_hills() -> Image.Image:
    """320x192: a sky from orange to violet, a sun, two dark hills."""
    width, height = 320, 192
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    top, bottom = (92, 60, 140), (250, 160, 70)
    for y in range(height):
        t = y / (height - 1)
        draw.line((0, y, width, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    draw.ellipse((196, 92, 244, 140), fill=(255, 214, 120))
    draw.ellipse((-80, 130, 200, 300), fill=(48, 40, 64))
    draw.ellipse((140, 120, 420, 300), fill=(32, 28, 48))
    return image


def tall_tree() -> Image.Image:
    """192x320: a green tree on grass under a pale sky."""
    width, height = 192, 320
    image = Image.new("RGB", (width, height), (200, 226, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 260, width, height), fill=(96, 160, 72))
    draw.rectangle((86, 190, 106, 270), fill=(110, 72, 40))
    for top, bottom, half in ((40, 130, 50), (80, 180, 66), (120, 220, 80)):
        draw.polygon([(96, top), (96 - half, bottom), (96 + half, bottom)], fill=(40, 120, 56))
    return image


def open_sign() -> Image.Image:
    """320x192: a shop sign that reads OPEN on a brick-coloured wall."""
    image = Image.new("RGB", (320, 192), (168, 84, 62))
    draw = ImageDraw.Draw(image)
    for y in range(0, 192, 16):
        draw.line((0, y, 320, y), fill=(140, 70, 52), width=2)
    draw.rounded_rectangle((60, 56, 260, 136), radius=12, fill=(250, 246, 232), outline=(40, 40, 40), width=4)
    draw.text((160, 96), "OPEN", fill=(20, 110, 60), font=ImageFont.load_default(size=44), anchor="mm")
    return image


def circles_transparent() -> Image.Image:
    """256x256 RGBA: three circles on a transparent background (read as if on white)."""
    image = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((28, 92, 108, 172), fill=(230, 60, 60, 255))
    draw.ellipse((88, 40, 168, 120), fill=(60, 170, 80, 255))
    draw.ellipse((148, 92, 228, 172), fill=(60, 90, 220, 200))
    return image


def rotated_photo() -> Image.Image:
    """192x256 upright: a figure with an arrow pointing up. Saved sideways, with an EXIF Orientation tag."""
    image = Image.new("RGB", (192, 256), (244, 236, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((66, 60, 126, 120), fill=(230, 190, 150))
    draw.rectangle((60, 128, 132, 230), fill=(60, 100, 170))
    draw.polygon([(96, 8), (76, 40), (116, 40)], fill=(200, 40, 40))
    return image


# EXIF Orientation 6: "rotate 90 degrees clockwise to display", what a phone held upright often writes.
_ORIENTATION = 0x0112
_TURN_CLOCKWISE_TO_VIEW = 6


def _sideways_jpeg(image: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[_ORIENTATION] = _TURN_CLOCKWISE_TO_VIEW
    image.rotate(90, expand=True).save(path, "JPEG", quality=88, exif=exif)


# File name -> (drawing, how it is saved). Sizes and formats are part of what the examples show.
INPUT_IMAGES: dict[str, tuple[Callable[[], Image.Image], Callable[[Image.Image, Path], None]]] = {
    "red-square.png": (red_square, lambda image, path: image.save(path, "PNG", optimize=True)),
    "sunset-hills.jpg": (sunset_hills, lambda image, path: image.save(path, "JPEG", quality=88)),
    "tall-tree.webp": (tall_tree, lambda image, path: image.save(path, "WEBP", quality=85, method=6)),
    "open-sign.png": (open_sign, lambda image, path: image.save(path, "PNG", optimize=True)),
    "circles-transparent.png": (circles_transparent, lambda image, path: image.save(path, "PNG", optimize=True)),
    "rotated-photo.jpg": (rotated_photo, _sideways_jpeg),
}


def draw_inputs(folder: Path = INPUTS) -> list[Path]:
    """Write the input images; check each reads back upright as drawn through qwen-batch's loader."""
    from qwen_batch.io.input_images import load_input_image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (draw, save) in INPUT_IMAGES.items():
        path = folder / name
        drawn = draw()
        save(drawn, path)
        loaded = load_input_image(path.read_bytes(), source=str(path))
        if loaded.image.size != drawn.size:
            raise RuntimeError(f"{path} reads back as {loaded.image.size}, not {drawn.size}")
        written.append(path)
    total = sum(path.stat().st_size for path in written)
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"the example inputs take {total:,} bytes; keep them under {MAX_TOTAL_BYTES:,}")
    return written


if __name__ == "__main__":
    from jsonl_to_parquet import build  # prompts/ is on the path: it is this script's folder

    for path in draw_inputs():
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for name in EDIT_MANIFESTS:
        print(f"wrote {build(HERE / name)}")
