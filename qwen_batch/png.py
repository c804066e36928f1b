"""PNG files with their generation parameters embedded.

Two text chunks: `parameters`, human readable in the style other image tools use (so image viewers
and UIs that read it show the prompt), and `qwen_batch`, the same facts as JSON for programs.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"
JSON_KEY = "qwen_batch"


def parameters_text(metadata: dict[str, Any]) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: 50, CFG scale: 4.0, Seed: 1, Size: 1024x1024, Model: ...`"""
    settings = ", ".join(
        [
            f"Steps: {metadata['num_inference_steps']}",
            "Sampler: FlowMatchEulerDiscrete",
            f"CFG scale: {metadata['true_cfg_scale']}",
            f"Seed: {metadata['seed']}",
            f"Size: {metadata['width']}x{metadata['height']}",
            f"Model: {metadata['model']}",
        ]
    )
    return f"{metadata['prompt']}\nNegative prompt: {metadata['negative_prompt']}\n{settings}"


def encode_png(image: Image.Image, metadata: dict[str, Any]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters_text(metadata))
    info.add_itxt(JSON_KEY, json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    buffer = io.BytesIO()
    # compress_level 4: close to the default's size at a fraction of its CPU time per 1024px image.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a PNG written by `encode_png`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[JSON_KEY])
