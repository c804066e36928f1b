"""PNG files with their generation parameters embedded.

Two text chunks: `parameters`, human readable in the style other image tools use (so image viewers
and UIs that read it show the prompt), and `qwen_batch`, the same facts as JSON for programs.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from qwen_batch.adapters.loras import LoraRef

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"
JSON_KEY = "qwen_batch"
XMP_KEY = "XML:com.adobe.xmp"


def parameters_text(metadata: dict[str, Any]) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: 50, CFG scale: 4.0, Seed: 1, Size: 1024x1024, Model: ...`

    Adapters as image tools write them: `<lora:name:scale>` after the prompt, and
    `Lora hashes: "name: hash"` with the first 10 hex digits of the file's SHA-256 (what Civitai and
    others look adapters up by)."""
    settings = [
        f"Steps: {metadata['num_inference_steps']}",
        "Sampler: FlowMatchEulerDiscrete",
        f"CFG scale: {metadata['true_cfg_scale']}",
        f"Seed: {metadata['seed']}",
        f"Size: {metadata['width']}x{metadata['height']}",
        f"Model: {metadata['model']}",
    ]
    if metadata.get("transformer"):  # the transformer came from one file: its name and hash, as for a checkpoint
        name = metadata["transformer"].rstrip("/").rsplit("/", 1)[-1]
        settings += [f"Transformer: {name}", f"Transformer hash: {metadata.get('transformer_sha256', '')[:10]}"]
    if metadata.get("scheduler_shift") is not None:
        settings.insert(2, f"Schedule shift: {metadata['scheduler_shift']}")
    if metadata.get("strength") is not None:  # started from an image (image tools' name for it)
        settings.insert(2, f"Denoising strength: {metadata['strength']}")
    if metadata.get("step_cache"):  # and how many of the steps that ran computed in full (the negative pass's apart)
        computed = f"{metadata.get('steps_computed')}"
        if metadata.get("uncond_steps_computed") is not None:
            computed += f" (negative prompt {metadata['uncond_steps_computed']})"
        settings.insert(2, f"Step cache: {metadata['step_cache']}, steps computed: {computed}")
    prompt = metadata["prompt"]
    loras = metadata.get("loras") or []
    if loras:
        names = [LoraRef(lora["path"]).name for lora in loras]
        prompt += " " + " ".join(f"<lora:{name}:{lora['scale']:g}>" for name, lora in zip(names, loras, strict=True))
        hashes = ", ".join(f"{name}: {lora.get('sha256', '')[:10]}" for name, lora in zip(names, loras, strict=True))
        settings.append(f'Lora hashes: "{hashes}"')
    return f"{prompt}\nNegative prompt: {metadata['negative_prompt']}\n{', '.join(settings)}"


def encode_png(image: Image.Image, metadata: dict[str, Any], *, xmp: bytes | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters_text(metadata))
    info.add_itxt(JSON_KEY, json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    if xmp is not None:
        # Where XMP readers look in a PNG (Pillow's PNG save has no xmp=); the XMP spec wants this chunk uncompressed.
        info.add_itxt(XMP_KEY, xmp.decode("utf-8"))
    buffer = io.BytesIO()
    # compress_level 4: close to the default's size at a fraction of its CPU time per 1024px image.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a PNG written by `encode_png`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text[JSON_KEY])
