"""Which shapes torchao's fp8 linear (dynamic per-row, as qwen-batch's fp8 mode) runs eagerly, with the GPU
capped and not: device call 3 of issue 26 saw `CUBLAS_STATUS_NOT_SUPPORTED` from `torch._scaled_mm` at 24 GiB."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from qwen_batch.memory_modes import _fp8_config


def probe(rows: int, features: int = 3072, out: int = 3072, bias: bool = True) -> str:
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(features, out, bias=bias, device="cuda", dtype=torch.bfloat16)
    quantize_(linear, _fp8_config())
    x = torch.randn(1, rows, features, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.inference_mode():
            linear(x)
        torch.cuda.synchronize()
        return "ok"
    except RuntimeError as error:
        return str(error).split("\n")[0][:90]


for cap in (None, 24):
    if cap:
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    for rows in (1, 6, 11, 16, 27, 64, 4096):
        print(f"cap {cap} rows {rows}: bias {probe(rows)}; no bias {probe(rows, bias=False)}", flush=True)
