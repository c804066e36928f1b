"""Draw the Qwen-Image-2.1 example's condition images into prompts/qwen_image21/ (then `build.py` builds the manifest).

    python prompts/build_qwen_image21.py

Two small pictures drawn with Pillow, no randomness: a red kite in a blue sky (RGB) and a yellow star sticker on
a transparent background (RGBA: Qwen-Image-2.1's VAE reads and writes alpha). `qwen_image21_example.jsonl` names
them relative to the manifest's folder, in its rows' `images` lists (condition images the prompt refers to as
picture 1, picture 2). Run it on the tiny 2.1 model (`make demo-2.1`):

    qwen-batch run prompts/qwen_image21_example.parquet --output out/demo-2.1 --model tiny-2.1
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
INPUTS = HERE / "qwen_image21"
SIZE = (64, 64)
MAX_TOTAL_BYTES = 20_000  # they live in the repository


def kite() -> Image.Image:
    """A red diamond kite with a tail, in a sky from deep to pale blue."""
    image = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(SIZE[1]):
        t = y / (SIZE[1] - 1)
        draw.line((0, y, SIZE[0], y), fill=(round(60 + 120 * t), round(110 + 100 * t), round(200 + 40 * t)))
    draw.polygon([(32, 8), (46, 26), (32, 44), (18, 26)], fill=(214, 40, 40))
    draw.line((32, 8, 32, 44), fill=(120, 20, 20))
    draw.line((18, 26, 46, 26), fill=(120, 20, 20))
    draw.line((32, 44, 28, 52, 36, 58, 30, 63), fill=(250, 250, 250))  # the tail
    return image


def star_sticker() -> Image.Image:
    """A yellow five-pointed star with a white rim, on a fully transparent background."""
    image = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    points = [(32, 4), (39, 24), (60, 24), (43, 37), (49, 58), (32, 45), (15, 58), (21, 37), (4, 24), (25, 24)]
    ImageDraw.Draw(image).polygon(points, fill=(250, 204, 40, 255), outline=(255, 255, 255, 255), width=2)
    return image


def draw_inputs() -> list[Path]:
    INPUTS.mkdir(exist_ok=True)
    written = []
    for name, image in {"kite.png": kite(), "star-sticker.png": star_sticker()}.items():
        image.save(INPUTS / name, optimize=True)
        written.append(INPUTS / name)
    total = sum(path.stat().st_size for path in written)
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"the condition images take {total} bytes; keep them under {MAX_TOTAL_BYTES}")
    return written


if __name__ == "__main__":
    for path in draw_inputs():
        print(f"wrote {path}")
