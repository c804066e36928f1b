"""On a CUDA GPU (`pytest -m gpu`): adapter switching in each memory mode, compiled, on the tiny model.

- Switching adapter sets never recompiles a compiled block (bf16 and fp8): the run fails a batch if
  dynamo recompiles (`error_on_recompile`), and every batch has the same shapes, so a recompile could
  only come from a switch.
- The weights come back exactly: a row without adapters, run after rows with adapters, is the same
  image as in a run that never fused anything (bf16 restores a copy; fp8 installs the kept bf16
  weights and quantizes them again, which gives the same fp8 weights).
- fp8 fuses in bf16, then quantizes: its adapter rows stay near the bf16 adapter rows.
- Group offload fuses into the weights it streams: its images are the resident mode's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_batch.memory.placement import fp8_compute_available
from qwen_batch.run.engine import RunConfig, release_generator, run
from qwen_batch.tiny.lora import write_tiny_lora
from tests.support import pixels, small_row, write_manifest

pytestmark = pytest.mark.gpu

PROMPT = "A red fox running through a snowy birch forest under a full moon"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("gpu-adapters")
    for seed in (1, 2):  # strong adapters: their effect stands well above bf16's rounding in the tiny model
        write_tiny_lora("tiny", folder / f"l{seed}.safetensors", seed=seed, strength=2.0)
    sets = [["l1.safetensors"], [], ["l2.safetensors"], ["l1.safetensors", "l2.safetensors"], []]
    rows = []
    for position, names in enumerate(sets):  # batches of 2, one prompt and size: every batch the same shapes
        for seed in (1, 2):
            loras = [{"path": name, "scale": 0.8} for name in names]
            rows.append(small_row(f"s{position}-{seed}", PROMPT, seed=seed, true_cfg_scale=1.0, loras=loras))
    plain = [row for row in rows if not row["loras"]]
    return write_manifest(folder / "m.parquet", rows), write_manifest(folder / "plain.parquet", plain), folder


def generate(manifest, folder, label: str, mode: str, compile_: str = "on") -> dict[str, np.ndarray]:
    release_generator()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        summary = run(
            RunConfig(
                str(manifest), str(folder / label), device="cuda", batch_size=2, memory_mode=mode, compile=compile_
            )
        )
    release_generator()
    assert summary.exit_code == 0 and summary.failed == 0, summary.problems  # a recompile fails its batch
    return {path.stem: pixels(path) for path in (folder / label / "images").glob("*.png")}


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_switching_adapters_is_exact_and_never_recompiles(manifests, mode):
    if mode == "fp8" and not fp8_compute_available("cuda"):
        pytest.skip("fp8 matmuls need compute capability 8.9 and torchao")
    manifest, plain_manifest, folder = manifests
    images = generate(manifest, folder, f"{mode}-all", mode)
    plain = generate(plain_manifest, folder, f"{mode}-plain", mode)
    for name in plain:
        assert np.array_equal(images[name], plain[name]), name  # weights restored exactly
    assert np.abs(images["s0-1"] - images["s1-1"]).max() > 20  # the adapter does something
    assert np.abs(images["s0-1"] - images["s2-1"]).max() > 20  # and another adapter something else


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_fp8_adapter_rows_are_the_bf16_ones_up_to_fp8_rounding(manifests):
    """An adapter row in fp8 is nearer its bf16 image than its own fp8 image without the adapter: the
    adapter took effect through the quantization (the tiny random model amplifies fp8 rounding, so
    "near" is judged against the adapter's own effect)."""
    if not fp8_compute_available("cuda"):
        pytest.skip("fp8 matmuls need compute capability 8.9 and torchao")
    manifest, _, folder = manifests
    bf16 = generate(manifest, folder, "bf16-eager", "bf16", compile_="off")
    fp8 = generate(manifest, folder, "fp8-eager", "fp8", compile_="off")
    figures = {}
    for adapter_row, plain_row in (("s0-1", "s1-1"), ("s2-1", "s1-1"), ("s3-1", "s1-1"), ("s1-1", "s1-1")):
        rounding = mean_difference(fp8[adapter_row], bf16[adapter_row])
        effect = mean_difference(fp8[adapter_row], fp8[plain_row])
        print(f"{adapter_row}: fp8 vs bf16 {rounding:.2f}/255, adapter effect in fp8 {effect:.2f}/255")
        figures[adapter_row] = rounding, effect
    for adapter_row in ("s0-1", "s2-1", "s3-1"):
        rounding, effect = figures[adapter_row]
        assert rounding < effect / 2, adapter_row


def test_offload_streams_the_fused_weights(manifests, monkeypatch):
    """Group offload keeps the weights on the host, so peft fuses there (its deltas in fp32, on the GPU in
    bf16): rows without adapters come out as resident; adapter rows differ by that rounding, which the
    tiny random model amplifies (measured on an H200: 2.4-2.7/255 against adapter effects of 8-12/255).
    Resident runs here with the feed-forwards' GELU as a kernel of its own, as offload does: its GEMM
    epilogue rounds once instead of twice, a difference the tiny model amplifies as much (2.5/255)."""
    import qwen_batch.memory.placement

    manifest, _, folder = manifests
    monkeypatch.setattr(qwen_batch.memory.placement, "GELU_EPILOGUE", False)
    resident = generate(manifest, folder, "resident", "bf16", compile_="off")
    offload = generate(manifest, folder, "offload", "offload", compile_="off")
    figures = {}
    for name, image in sorted(resident.items()):
        difference = mean_difference(offload[name], image)
        effect = mean_difference(image, resident["s1-" + name[-1]])
        print(f"{name}: offload vs resident {difference:.2f}/255, adapter effect {effect:.2f}/255")
        figures[name] = difference, effect
    for name, (difference, effect) in figures.items():
        assert difference < (0.1 if name.startswith(("s1-", "s4-")) else effect / 2), name
