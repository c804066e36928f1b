"""Which shapes torchao's fp8 linear (dynamic per-row, as qwen-batch's fp8 mode) runs eagerly, with the GPU
capped and not: device call 3 of issue 26 saw `CUBLAS_STATUS_NOT_SUPPORTED` from `torch._scaled_mm` at 24 GiB."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from qwen_batch.memory_modes import _fp8_config


def probe(rows: int, features: int = 3072, out: int = 3072, bias: bool = True, flat: bool = False, dtype=None) -> str:
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(features, out, bias=bias, device="cuda", dtype=torch.bfloat16)
    quantize_(linear, _fp8_config())
    shape = (rows, features) if flat else (1, rows, features)
    x = torch.randn(*shape, device="cuda", dtype=dtype or torch.bfloat16)
    try:
        with torch.inference_mode():
            linear(x)
        torch.cuda.synchronize()
        return "ok"
    except RuntimeError as error:
        return str(error).split("\n")[0][:90]


for out in (3072, 12288, 18432):
    for rows in (1, 2, 6, 16, 4096):
        flat = probe(rows, out=out, flat=True)
        fp32 = probe(rows, out=out, flat=True, dtype=torch.float32)
        print(f"N {out} rows {rows}: 3-D {probe(rows, out=out)}; 2-D {flat}; 2-D fp32 input {fp32}", flush=True)
print(f"K 12288 rows 6: {probe(6, features=12288)}", flush=True)
