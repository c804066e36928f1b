"""Write the example adapters in prompts/loras/: small random LoRAs for the tiny models, in several key layouts.

    python prompts/build_loras.py

They stand in for the adapters people use (a style, a detail booster, a Lightning few-step LoRA), so
`lora_example.jsonl` and `edit_lora_example.jsonl` run with no download; their images are as much noise
as the tiny model's. The same seeds write the same bytes (`qwen-batch tiny-lora` makes others).
`build.py` turns the manifests into Parquet.
"""

from __future__ import annotations

from pathlib import Path

from qwen_batch.tiny.lora import write_tiny_lora

HERE = Path(__file__).parent
LORAS = HERE / "loras"
# file name: (tiny model, key layout, rank, seed)
ADAPTERS = {
    "tiny-style-kohya.safetensors": ("tiny", "kohya", 4, 1),
    "tiny-detail-comfyui.safetensors": ("tiny", "comfyui", 8, 2),
    "tiny-lightning-8step.safetensors": ("tiny", "diffusers", 4, 3),
    "tiny-edit-style-diffsynth.safetensors": ("tiny-edit", "diffsynth", 4, 4),
}


def write_adapters() -> list[Path]:
    return [
        write_tiny_lora(model, LORAS / name, rank=rank, layout=layout, seed=seed)
        for name, (model, layout, rank, seed) in ADAPTERS.items()
    ]


if __name__ == "__main__":
    for path in write_adapters():
        print(f"wrote {path}")
