"""Which shapes torchao's fp8 linear (dynamic per-row, as qwen-batch's fp8 mode) runs eagerly.

Issue 26's tiers saw `CUBLAS_STATUS_NOT_SUPPORTED` from `torch._scaled_mm` in fp8 (eager and compiled). On an
H200 (session 7, call 4) every 3,072-input shape ran (outputs 3,072, 12,288, 18,432; 1 to 4,096 rows; 2-D and
3-D; float32 inputs) and 12,288 inputs with 6 rows failed: the text MLP's down-projection on a short text.
`qwen_batch.pipeline.denoise.FP8_TEXT_MULTIPLE` pads the text stream to a multiple of 64 under fp8; this script's last
lines say which row counts work at 12,288 inputs: on an H200 (session 8, call 5) 1 to 32 rows fail, 64 and
4,096 run."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from qwen_batch.memory.placement import _fp8_config


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
for rows in (1, 6, 15, 16, 17, 32, 64, 4096):  # the text MLP's down-projection, the one call 4 saw fail
    print(f"K 12288 rows {rows}: {probe(rows, features=12288)}", flush=True)
