"""Draw the conditions example's images into prompts/conditions/ (then `build.py` builds the manifest).

    python prompts/build_conditions.py

A product photo (a bottle on a table, drawn with Pillow, no randomness), the mask of its background
(white repaints, black keeps the bottle), and the photo's canny edges made with OpenCV (the same
`qwen_batch.pipeline.conditions.control_preprocess` a row's `control_preprocess: canny` runs in stage 1), so the example has a
ready control image as well as a row that makes its own. `conditions_example.jsonl` names them relative to
the manifest's folder. Run it:

    qwen-batch run prompts/conditions_example.parquet --output out/conditions --controlnet tiny
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
INPUTS = HERE / "conditions"
SIZE = (256, 256)
BOTTLE = (100, 48, 156, 216)  # the body; the neck sits above it


def product_photo() -> Image.Image:
    """A green bottle on a wooden table before a pale wall."""
    image = Image.new("RGB", SIZE, (226, 222, 214))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 196, 256, 256), fill=(150, 104, 64))  # the table
    draw.rounded_rectangle(BOTTLE, radius=18, fill=(40, 120, 72))
    draw.rectangle((118, 16, 138, 52), fill=(40, 120, 72))  # the neck
    draw.rectangle((108, 110, 148, 150), fill=(236, 232, 220))  # the label
    return image


def background_mask() -> Image.Image:
    """White everywhere but the bottle (kept): a new background for the same product."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle(BOTTLE, radius=18, fill="black")
    draw.rectangle((118, 16, 138, 52), fill="black")
    return image


def draw_inputs() -> list[Path]:
    from qwen_batch.pipeline.conditions.control_preprocess import preprocess

    INPUTS.mkdir(exist_ok=True)
    photo = product_photo()
    images = {"bottle.png": photo, "bottle-background-mask.png": background_mask()}
    images["bottle-canny.png"] = preprocess("canny", photo)  # OpenCV (pip install 'qwen-batch[control]')
    written = []
    for name, image in images.items():
        image.save(INPUTS / name, optimize=True)
        written.append(INPUTS / name)
    return written


if __name__ == "__main__":
    for path in draw_inputs():
        print(f"wrote {path}")
