"""The rows the benchmarks run, the same every time: prompts, edit instructions, input images and masks,
and the text-to-image manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_TEXT = (
    "a red fox running through a snowy birch forest under a full moon with soft blue light and long shadows "
    "an old lighthouse on a rocky coast at dawn waves crashing mist rising gulls circling a small boat "
    "a busy night market in a narrow street lanterns steam from food stalls people in raincoats reflections "
    "a watercolor painting of a quiet mountain village terraced fields a river bridge and cherry blossoms"
)
WORDS = _TEXT.split(" ")


def prompts(count: int) -> list[str]:
    """Deterministic prompts of varied length (8 to 60 words), as a real manifest has."""
    lengths = [8 + (i * 23) % 53 for i in range(count)]
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(lengths)]


INSTRUCTIONS = [
    "make the sky a deep orange sunset",
    "replace the background with a sandy beach and turquoise sea under a clear sky",
    "turn it into a pencil sketch",
    "add a small red umbrella in the lower left corner and make the lighting warmer, as in late afternoon",
    "remove the text",
    "change the season to winter with fresh snow on every surface, frost on the edges and a pale grey sky",
    "make the colours more saturated and add soft film grain",
    "put the two objects side by side on a wooden table in a bright kitchen with morning light from a window",
]


def instructions(count: int) -> list[str]:
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(count)]


def write_inputs(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """`count` deterministic RGB PNGs of `size` x `size`: a colour gradient, a few discs and noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    y, x = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        rng = np.random.default_rng(seed + index)
        corners = rng.uniform(0, 255, size=(4, 3))
        pixels = (
            corners[0] * ((1 - x) * (1 - y))[..., None]
            + corners[1] * (x * (1 - y))[..., None]
            + corners[2] * ((1 - x) * y)[..., None]
            + corners[3] * (x * y)[..., None]
        )
        for _ in range(5):
            cx, cy, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            pixels[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = rng.uniform(0, 255, size=3)
        pixels += rng.normal(0, 8, size=pixels.shape)
        path = folder / f"input{index:03d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_masks(folder: Path, count: int, size: int) -> list[Path]:
    """`count` masks (white repaints): a centred box of a different size for each row."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        mask = Image.new("L", (size, size), 0)
        margin = size // 8 + (index * size // 32) % (size // 4)
        ImageDraw.Draw(mask).rectangle((margin, margin, size - margin, size - margin), fill=255)
        path = folder / f"mask{index:03d}.png"
        mask.save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, count: int, steps: int, size: int) -> Path:
    """`count` text-to-image rows of `prompts(count)` at `size` x `size`, true CFG 4 with the negative " ",
    seeds from 1000: what the recipe is given, as a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = prompts(count)
    table = pa.table(
        {
            "id": [f"p{i:03d}" for i in range(count)],
            "prompt": texts,
            "negative_prompt": [" "] * count,
            "width": pa.array([size] * count, pa.int64()),
            "height": pa.array([size] * count, pa.int64()),
            "seed": pa.array([1000 + i for i in range(count)], pa.int64()),
            "num_inference_steps": pa.array([steps] * count, pa.int64()),
            "true_cfg_scale": [4.0] * count,
        }
    )
    pq.write_table(table, path)
    return path
