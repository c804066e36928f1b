"""Which kernel and GEMM form is fastest at the model's shapes, and which shapes does fp8 run at all?

    python -m bench.kernels --only attention-eager,attention-compiled --json out.jsonl
    python -m bench.kernels --only fp8-shapes --json out.jsonl

GPU only (no dry run: these time kernels). `attention-*`: one transformer forward of 4 rows at 1024x1024 with
128 text tokens, half of them padded (batched CFG's short negative prompt), per attention path; the paths take
turns, round after round, so a GPU whose clocks drift as it warms up slows them all alike; the median per path.
`linear`: the blocks' GEMM shapes at 8 rows of 4,096 image tokens, per way of running them (bf16 through
Inductor, the bias or GELU as cuBLASLt's epilogue, torchao fp8 per row and per tensor). `fp8-shapes`: which
shapes torchao's fp8 linear (dynamic per-row, as the fp8 mode) runs eagerly: on an H200 every 3,072-input
shape ran, and at 12,288 inputs (the text MLP's down-projection) 1 to 32 rows failed with
`CUBLAS_STATUS_NOT_SUPPORTED` and 64 and 4,096 ran, which is why fp8 pads or fills the text stream to 64 tokens
(`qwen_batch.pipeline.denoise.text.FP8_TEXT_MULTIPLE`, `FP8_PACKED_TEXT_MINIMUM`).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from bench.full_size import build_transformer
from bench.harness import Scenario, environment, main, scenarios
from bench.measure import GpuUtilization


def needs_a_gpu(runner) -> None:
    if runner.tiny or not torch.cuda.is_available():
        raise RuntimeError("bench.kernels times GPU kernels: it has no dry run on the CPU")


def attention(runner, rows: int = 4, rounds: int = 3, compile: bool = False) -> None:
    """One transformer forward of `rows` rows at 1024x1024 with 128 text tokens, half of them padded
    (batched CFG's short negative prompt), per attention path. The paths take turns, round after
    round, so a GPU whose clocks drift as it warms up slows them all alike; the median per path."""
    from diffusers.models.attention_dispatch import attention_backend
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from qwen_batch.families.qwen_image.attention import BatchAttention

    needs_a_gpu(runner)
    transformer = build_transformer("cuda")
    text = 128
    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(rows, 4096, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    embeds = torch.randn(rows, text, 3584, device="cuda", dtype=torch.bfloat16, generator=generator)
    padded = torch.ones(rows, text, dtype=torch.bool, device="cuda")
    padded[rows // 2 :, 8:] = False  # the unconditional half: a short negative prompt
    timestep = torch.full((rows,), 0.5, device="cuda", dtype=torch.bfloat16)
    stock, sdpa, fa4 = QwenDoubleStreamAttnProcessor2_0(), BatchAttention("sdpa"), BatchAttention("fa4")
    # name: (processor, backend, mask through the transformer, mask through attention_kwargs)
    paths = {
        "diffusers, no mask": (stock, None, None, None),
        "diffusers, mask (SDPA picks)": (stock, None, padded, None),
        "qwen-batch sdpa, mask via attention_kwargs": (sdpa, None, None, padded),
        "qwen-batch fa4 (each row's prefix, no mask)": (fa4, None, None, padded),
    }
    if not compile:  # backends are chosen at trace time: forcing them per call means eager
        paths |= {
            "diffusers, mask, _native_cudnn": (stock, "_native_cudnn", padded, None),
            "diffusers, mask, _native_efficient": (stock, "_native_efficient", padded, None),
            "diffusers, no mask, _native_flash": (stock, "_native_flash", None, None),
        }
    if compile:
        transformer.compile_repeated_blocks(fullgraph=True)
    clocks = GpuUtilization()

    def forward(processor, backend, mask, kwargs_mask):
        transformer.set_attn_processor(processor)
        with torch.inference_mode(), attention_backend(backend) if backend else contextlib.nullcontext():
            return transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                attention_kwargs={"text_mask": kwargs_mask} if processor is not stock else None,
                img_shapes=[[(1, 64, 64)]] * rows,
                return_dict=False,
            )

    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(rounds + 1):
        for name, path in paths.items():
            forward(*path)  # round 0 warms up (and compiles); later rounds: one untimed call per switch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(*path)
            end.record()
            end.synchronize()
            if round_:
                times[name].append(start.elapsed_time(end) / 1000 / rows)
    clocks.stop()
    results = {"run": "attention", **environment(), "rows": rows, "text_tokens": text, "compiled": compile}
    results["forward_s_per_row"] = {name: round(statistics.median(values), 4) for name, values in times.items()}
    results["per_round"] = {name: [round(value, 4) for value in values] for name, values in times.items()}
    results["gpu_clocks"] = clocks.clock_figures()
    for name, value in results["forward_s_per_row"].items():
        print(f"{name}: {value}", flush=True)
    runner.write(results)


def linear(runner, rows: int = 8, rounds: int = 5) -> None:
    """The blocks' GEMM shapes at `rows` rows of 4,096 image tokens, per way of running them: bf16
    through Inductor (what a compiled block does with a plain Linear),
    bf16 with the bias as cuBLASLt's epilogue (`addmm` with a 1-D bias), for the MLP's expansion also
    with GELU (Inductor's separate kernel against cuBLASLt's GELU epilogue, the engine's), and torchao
    fp8 with per-row scales (the fp8 mode's) and per-tensor scales, compiled, the activation's dynamic
    quantization inside each call as in the model. Median of rounds."""
    needs_a_gpu(runner)
    tokens = rows * 4096
    results = {"run": "linear", **environment(), "tokens": tokens, "ms": {}, "tflops": {}}
    # (in, out): attention q/k/v/out projections, the MLP's 4x expansion and its way back.
    for inputs, outputs in [(3072, 3072), (3072, 12288), (12288, 3072)]:
        x = torch.randn(tokens, inputs, device="cuda", dtype=torch.bfloat16)
        linear = torch.nn.Linear(inputs, outputs, device="cuda", dtype=torch.bfloat16)
        for name in _linear_ways(with_gelu=outputs > inputs):
            ms = _median_ms(_linear_way(name, linear), x, rounds)
            key = f"{inputs}x{outputs} {name}"
            results["ms"][key] = round(ms, 3)
            results["tflops"][key] = round(2 * tokens * inputs * outputs / ms / 1e9, 1)
            print(f"{key}: {ms:.3f} ms, {results['tflops'][key]} TFLOP/s", flush=True)
            torch._dynamo.reset()
    runner.write(results)


def _linear_ways(with_gelu: bool) -> list[str]:
    gelu = ["bf16+GELU Inductor", "bf16+GELU epilogue"] if with_gelu else []
    return ["bf16 Inductor", "bf16 bias epilogue", *gelu, "fp8-row", "fp8-tensor"]


def _linear_way(name: str, linear: torch.nn.Linear):
    """`linear` run one of `_linear_ways`: a callable of the input."""
    weight, bias = linear.weight, linear.bias
    if name == "bf16 Inductor":
        return torch.compile(linear, fullgraph=True)
    if name == "bf16 bias epilogue":
        return lambda x: torch.addmm(bias, x, weight.t())
    if name == "bf16+GELU Inductor":
        return torch.compile(lambda x: torch.nn.functional.gelu(linear(x), approximate="tanh"), fullgraph=True)
    if name == "bf16+GELU epilogue":
        return lambda x: torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    from torchao.quantization import PerRow, PerTensor

    granularity = {"fp8-row": PerRow, "fp8-tensor": PerTensor}[name]()
    return torch.compile(_fp8_linear(linear, granularity), fullgraph=True)


def _fp8_linear(linear: torch.nn.Linear, granularity) -> torch.nn.Linear:
    """A torchao fp8 copy of `linear` (dynamic activation scales, floored, as the fp8 mode quantizes)."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    from qwen_batch.memory.placement import FP8_SCALE_FLOOR

    quantized = copy.deepcopy(linear)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, activation_value_lb=FP8_SCALE_FLOOR)
    quantize_(quantized, config)
    return quantized


def _median_ms(call, x: torch.Tensor, rounds: int) -> float:
    """Median over `rounds` of ten back-to-back calls, after one warm-up (and compile) call per round."""
    times = []
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            call(x)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                call(x)
            end.record()
            end.synchronize()
            if round_:
                times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def probe(rows: int, features: int = 3072, out: int = 3072, bias: bool = True, flat: bool = False, dtype=None) -> str:
    from torchao.quantization import quantize_

    from qwen_batch.memory.placement import _fp8_config

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


def fp8_shapes(runner) -> None:
    """One line per shape: `ok`, or the error's first line."""
    needs_a_gpu(runner)
    shapes = {}
    for out in (3072, 12288, 18432):
        for rows in (1, 2, 6, 16, 4096):
            shapes[f"N {out} rows {rows}"] = {
                "3-D": probe(rows, out=out),
                "2-D": probe(rows, out=out, flat=True),
                "2-D fp32 input": probe(rows, out=out, flat=True, dtype=torch.float32),
            }
    for rows in (1, 6, 15, 16, 17, 32, 64, 4096):  # the text MLP's down-projection
        shapes[f"K 12288 rows {rows}"] = {"3-D": probe(rows, features=12288)}
    runner.write({"run": "fp8-shapes", **environment(), "shapes": shapes})


SCENARIOS = scenarios(
    Scenario("attention-eager", attention, {}, "each attention path, eager, 3 rounds", 3),
    Scenario("attention-compiled", attention, {"compile": True}, "the paths that compile, compiled", 4),
    Scenario("linear", linear, {}, "the blocks' GEMMs: Inductor, cuBLASLt epilogues, fp8 per row and tensor", 4),
    Scenario("fp8-shapes", fp8_shapes, {}, "which shapes torchao's fp8 linear runs eagerly", 1),
)


if __name__ == "__main__":
    raise SystemExit(main(SCENARIOS, __spec__.name, __doc__))
