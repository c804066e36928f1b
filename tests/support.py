"""Helpers for building manifests in tests, and the diffusers baselines of the correctness contract."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    """A Parquet manifest from dicts; columns typed as qwen-batch's schema unless `schema` says otherwise."""
    from qwen_batch.manifest import MANIFEST_SCHEMA

    names = list(dict.fromkeys(name for row in rows for name in row))
    known = {field.name: field.type for field in MANIFEST_SCHEMA}
    if schema is None:
        table = pa.table({name: pa.array([row.get(name) for row in rows], type=known.get(name)) for name in names})
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def picture_png(size: tuple[int, int], seed: int, alpha: bool = False) -> bytes:
    """A smooth seeded picture as PNG bytes (RGBA with a gradient of transparency when `alpha`): an input image."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    channels = [(np.sin(x * rng.uniform(2, 8) + y * rng.uniform(2, 8) + c) + 1) * 127.5 for c in range(3)]
    if alpha:
        channels.append(x * 255)
    buffer = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(source):
    """An image (a file's path or buffer, or a PIL image, as a pipeline returns it) as `[height, width, 3]`
    int16 RGB, for per-pixel differences."""
    import numpy as np
    from PIL import Image

    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"), dtype=np.int16)
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def small_row(row_id: str, prompt: str, **overrides) -> dict:
    """A row that is cheap on the tiny model: 256x256, 2 steps."""
    return {"id": row_id, "prompt": prompt, "width": 256, "height": 256, "num_inference_steps": 2, **overrides}


def diffusers_reference(pipe, request, **inputs):
    """The image diffusers' own pipeline makes for a request: the baseline of the correctness contract.
    `inputs` are the task's own arguments (control, init, mask or edit images, strength, ...); a size the row
    leaves out is left to the pipeline, as the engine leaves it."""
    import torch

    size = {"width": request.width, "height": request.height} if request.width else {}
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        true_cfg_scale=request.true_cfg_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **size,
        **inputs,
    ).images[0]


@contextlib.contextmanager
def diffusers_adapters(pipe, request) -> Iterator[None]:
    """A diffusers pipeline set up for a row as the adapter contract says: the row's adapters loaded through
    `load_lora_weights` and weighted with `set_adapters(names, weights)`, and, for a `scheduler_shift`, the
    scheduler built from the model's config with `base_shift = max_shift = ln(shift)`, `shift_terminal=None`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    names = [f"row_adapter_{position}" for position in range(len(request.loras))]
    for name, ref in zip(names, request.loras, strict=True):
        pipe.load_lora_weights(ref.url, adapter_name=name)
    if names:
        pipe.set_adapters(names, [ref.scale for ref in request.loras])
    original = pipe.scheduler
    if request.scheduler_shift is not None:
        shift = math.log(request.scheduler_shift)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            original.config, base_shift=shift, max_shift=shift, shift_terminal=None
        )
    try:
        yield
    finally:
        pipe.scheduler = original
        if names:
            pipe.delete_adapters(names)


def fa4_layout(monkeypatch, packed: bool) -> list:
    """Run the engine as under FlashAttention-4 on the CPU: each row's real tokens a prefix (the masked
    stand-in of `prefix_attention`, as the CPU has no FlashAttention-4), the text stream packed to its
    real tokens or padded. Returns a list that gains each packed text's length each time a batch's text is
    packed."""
    import qwen_batch.families.qwen_image.attention
    import qwen_batch.families.qwen_image.packed_text
    import qwen_batch.pipeline.denoise.text

    packs = []
    pack_text = qwen_batch.families.qwen_image.packed_text.pack_text
    monkeypatch.setattr(qwen_batch.families.qwen_image.attention, "fa4_available", lambda device, dtype: True)
    monkeypatch.setattr(qwen_batch.pipeline.denoise.text, "PACK_TEXT", packed)

    def packing(*args):
        packed = pack_text(*args)
        packs.append(packed[0].shape[1])
        return packed

    monkeypatch.setattr(qwen_batch.families.qwen_image.packed_text, "pack_text", packing)
    return packs


def differing_images(ids, ours: Path, reference: Path, tolerance: int) -> dict[str, int]:
    """Of the images `<id>.png` in two output folders, those more than `tolerance` (of 255) apart
    at some pixel, with that largest difference; empty when every pair matches."""
    import numpy as np

    differences = {}
    for image_id in ids:
        largest = int(
            np.abs(pixels(ours / "images" / f"{image_id}.png") - pixels(reference / "images" / f"{image_id}.png")).max()
        )
        if largest > tolerance:
            differences[image_id] = largest
    return differences
