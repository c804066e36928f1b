"""Put a loaded model on its device in a memory mode, and compile it.

The modes (chosen per stage by `qwen_batch.planner`, or forced with --memory-mode):
- `bf16`: resident in the run's dtype (bf16 on a GPU).
- `fp8`: the transformer blocks' linear layers in float8. With fp8 matmuls (compute capability >= 8.9)
  through torchao (dynamic per-row activation scales, per-row weight scales); otherwise fp8 storage
  with bf16 compute (diffusers layerwise casting). `module.to(torch.float8_e4m3fn)` does not work: the
  first matmul fails on mixed dtypes.
- `offload`: weights in pinned host RAM, copied to the GPU one transformer block ahead of use on a side
  stream (diffusers group offload); one pass over the weights per step serves the whole batch.
- `sequential`: each layer copied to the GPU when it runs (accelerate): the last resort.

Kept in bf16 under fp8 (`FP8_KEPT_BF16`): the last linear of the image MLP (`img_mlp.net.2`: vLLM-Omni
and SGLang keep it, reporting visible degradation otherwise; its inputs are the widest-ranged
activations of the block, right after the GELU of the 4x expansion), and everything outside the 60
blocks: patch and text embedders, timestep embedding, the output norm and projection (0.2% of the
weights, and the first and last layers set the scale of everything in between). `--fp8-every-linear`
(`Placement.fp8_every_linear`) puts that image-MLP linear in fp8 too: a third of the image stream's GEMM
work, 8% faster per forward on an H200 (docs/benchmarks.md), at the quality risk the peers avoid.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.model_source import qwen_batch_home

if TYPE_CHECKING:
    import torch

    from qwen_batch.planner import MemoryPlan

log = logging.getLogger(__name__)

RESIDENT, FP8, OFFLOAD, SEQUENTIAL = "bf16", "fp8", "offload", "sequential"
PLACEMENT_MODES = (RESIDENT, FP8, OFFLOAD, SEQUENTIAL)
FP8_KEPT_BF16 = (r"img_mlp\.net\.2$",)  # inside the blocks; all layers outside them stay bf16 too
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# bf16 on a GPU: the feed-forwards' GELU in cuBLASLt's GEMM epilogue (qwen_batch.gelu_epilogue).
# Benchmarks turn it off to measure what it gives.
GELU_EPILOGUE = True
# Inductor options for the compiled blocks (`torch.compile(options=...)`). Coordinate-descent tuning of
# Inductor's own fused kernels (norms, modulation, RoPE, gates): on an H200, 0.1239 -> 0.1221 s per
# row-forward (-1.5%) for about 5 s more compile (docs/benchmarks.md). torchao turns it on for fp8.
COMPILE_OPTIONS: dict[str, object] = {"coordinate_descent_tuning": True}
# fp8 scales: "row" (one per activation row and weight row) or "tensor" (one per tensor, cuBLAS's
# plain fp8 GEMM; coarser, so more rounding where a row's range differs from the tensor's).
FP8_GRANULARITY = "row"
FP8_SCALE_FLOOR = 1e-12  # see _quantize_fp8


@dataclass(frozen=True)
class Placement:
    """How one stage's model goes on the device."""

    mode: str = RESIDENT
    compile: bool = False
    vae_tiling: bool = False
    compile_cache: str | None = None  # None: $QWEN_BATCH_HOME/compile-cache
    # The run fuses LoRA adapters: fp8 then keeps its layers' bf16 weights on the host (QuantizedWeights).
    adapters: bool = False
    fp8_every_linear: bool = False  # fp8 also on the block linears FP8_KEPT_BF16 names

    @property
    def fp8_kept_bf16(self) -> tuple[str, ...]:
        """The block linears (name patterns) that stay bf16 under fp8."""
        return () if self.fp8_every_linear else FP8_KEPT_BF16

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENT_MODES:
            raise ConfigError(f"memory mode {self.mode!r}: use one of {', '.join(PLACEMENT_MODES)}")
        if self.fp8_every_linear and self.mode != FP8:  # e.g. --memory-mode auto chose bf16 on a large GPU
            log.warning("--fp8-every-linear applies to the fp8 mode only: the transformer runs in %s", self.mode)


def fp8_compute_available(device: str) -> bool:
    """fp8 matmuls need compute capability 8.9 (Ada) or newer, and torchao."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        return False
    try:
        import torchao  # noqa: F401
    except ImportError:
        log.warning("torchao is not installed: fp8 falls back to fp8 storage with bf16 compute (pip install torchao)")
        return False
    return True


def weights_stay_put(mode: str, device: str) -> bool:
    """Whether a forward uses the transformer's weights where they lie: not streamed from host RAM
    (offload, sequential), not cast per layer (fp8 storage without fp8 matmuls)."""
    return mode == RESIDENT or (mode == FP8 and fp8_compute_available(device))


def place_transformer(transformer: torch.nn.Module, placement: Placement, device: str, dtype: torch.dtype) -> str:
    """Move a (CPU-loaded) QwenImageTransformer2DModel to `device` in `placement.mode`; compile it when
    asked. Returns what was done, in words, for the log."""
    mode = placement.mode
    if mode == RESIDENT:
        transformer.to(device)
        done = f"resident in {str(dtype).removeprefix('torch.')}"
        if GELU_EPILOGUE and device.startswith("cuda"):
            from qwen_batch.gelu_epilogue import fuse_gelu_epilogues

            done += f"; GELU fused into {fuse_gelu_epilogues(transformer)} GEMMs"
    elif mode == FP8:
        kept = placement.fp8_kept_bf16
        if fp8_compute_available(device):
            _quantize_fp8(transformer, device, kept=kept)
            done = f"fp8 through torchao (dynamic activation, per-{FP8_GRANULARITY} scales), {_kept_bf16(kept)} in bf16"
        else:
            _fp8_storage(transformer, dtype, kept)
            transformer.to(device)
            done = f"fp8 storage, bf16 compute (layerwise casting), {_kept_bf16(kept)} in bf16"
    elif mode == OFFLOAD:
        _group_offload(transformer, device, offload_type="block_level")
        done = "group offload: blocks streamed from pinned host RAM, one block ahead"
    else:
        _sequential_offload(transformer, device)
        done = "sequential offload: every layer copied when it runs"
    if placement.compile:
        if mode in (OFFLOAD, SEQUENTIAL) or "layerwise" in done:
            log.warning("compile is skipped under %s: its hooks move or cast weights around each layer", mode)
        else:
            use_compile_cache(placement.compile_cache)
            # Regional: the 60 identical blocks share one compiled graph, so compiling costs one block.
            transformer.compile_repeated_blocks(fullgraph=True, options=dict(COMPILE_OPTIONS) or None)
            done += f"; blocks compiled (cache {os.environ[COMPILE_CACHE_ENV]})"
    return done


def place_vae(vae: torch.nn.Module, device: str, tiling: bool) -> None:
    vae.to(device)
    # One image at a time: the decode's peak memory (about 4 GiB at 1024x1024) no longer grows with
    # the batch, and a row's image does not depend on what shares its batch.
    vae.enable_slicing()
    if tiling:
        vae.enable_tiling()


def place_text_encoder(text_encoder: torch.nn.Module, mode: str, device: str, dtype: torch.dtype) -> str:
    """Move the Qwen2.5-VL text encoder to `device`. The LM head goes: encoding reads hidden states,
    and the head's logits (vocabulary 152,064 wide) would cost 0.3 MB per token and 1 GiB of weights."""
    import torch

    if hasattr(text_encoder, "lm_head"):
        text_encoder.lm_head = torch.nn.Identity()
    if mode == RESIDENT:
        text_encoder.to(device)
        return "resident"
    if mode == FP8:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(
            text_encoder,
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=dtype,
            skip_modules_pattern=("norm", "embed", r"visual\.patch_embed"),
        )
        text_encoder.to(device)
        return "fp8 storage, bf16 compute (layerwise casting)"
    if mode in (OFFLOAD, SEQUENTIAL):
        _group_offload(text_encoder, device, offload_type="leaf_level")
        return "group offload, layer by layer from pinned host RAM"
    raise ConfigError(f"memory mode {mode!r}: use one of {', '.join(PLACEMENT_MODES)}")


def use_compile_cache(folder: str | None) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels, autotuning) at one
    folder, so a second process finds the compiled blocks instead of compiling them again.
    An explicit TORCHINDUCTOR_CACHE_DIR wins over the default."""
    if folder is None and os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV])
    path = Path(folder) if folder else qwen_batch_home() / "compile-cache"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[COMPILE_CACHE_ENV] = str(path)
    return path


@dataclass
class QuantizedWeights:
    """The bf16 weights of a transformer's fp8 layers, kept on the host so that adapters can be fused in
    bf16 and the fused layers quantized again (peft cannot fuse into float8 weights, and quantizing a
    fused fp8 weight twice would compound the rounding). Costs host RAM: 2 bytes per quantized weight."""

    originals: dict[str, torch.Tensor]  # layer name -> bf16 weight on the host
    kind: str  # "torchao" (fp8 matmuls) or "storage" (layerwise casting)
    device: str

    @classmethod
    def capture(cls, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The blocks' linear weights before placement (references: placement moves or casts copies)."""
        import torch

        return {
            name: module.weight.data
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")
        }

    @classmethod
    def after_placement(
        cls, transformer: torch.nn.Module, captured: dict[str, torch.Tensor], device: str
    ) -> QuantizedWeights | None:
        quantized = {
            name: weight.to("cpu")
            for name, weight in captured.items()
            if _is_fp8(transformer.get_submodule(name).weight)
        }
        if not quantized:
            return None
        kind = (
            "storage"
            if any(_is_fp8_storage(transformer.get_submodule(name).weight) for name in quantized)
            else "torchao"
        )
        return cls(originals=quantized, kind=kind, device=device)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.originals)

    def install_originals(self, transformer: torch.nn.Module, names: set[str]) -> None:
        """Put the original (bf16) weights of `names` back: on the GPU if they fit beside what is there,
        else on the host (peft then fuses there, slower, and `requantize` moves them)."""
        import torch

        needed = sum(self.originals[name].nbytes for name in names)
        place = self.device
        if (
            self.device.startswith("cuda")
            and torch.cuda.mem_get_info(torch.device(self.device))[0] < needed + 2 * 2**30
        ):
            place = "cpu"
        for name in names:
            module = transformer.get_submodule(name)
            module.weight = torch.nn.Parameter(self.originals[name].to(place, copy=True), requires_grad=False)

    def requantize(self, transformer: torch.nn.Module, names: set[str]) -> None:
        import torch

        if self.kind == "torchao":
            # `names` were all quantized at placement, whatever that placement kept in bf16.
            _quantize_fp8(transformer, self.device, lambda module, name: name in names, kept=())
            return
        for name in names:
            transformer.get_submodule(name).to(self.device, dtype=torch.float8_e4m3fn)


def _is_fp8_storage(weight: torch.Tensor) -> bool:
    import torch

    return weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _is_fp8(weight: torch.Tensor) -> bool:
    """A float8 weight: stored as such (layerwise casting) or a torchao quantized tensor."""
    return _is_fp8_storage(weight) or type(weight).__module__.startswith("torchao")


def _kept_bf16(kept: tuple[str, ...]) -> str:
    """What fp8 leaves in bf16, for the placement line: the kept block linears and the embedders."""
    names = [pattern.removesuffix("$").replace("\\.", ".") for pattern in kept]
    return " and ".join([*names, "embedders"]) if names else "embedders"


def _fp8_linear_filter(module: torch.nn.Module, name: str, kept: tuple[str, ...]) -> bool:
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith("transformer_blocks.")
        and not any(re.search(pattern, name) for pattern in kept)
    )


def _quantize_fp8(transformer: torch.nn.Module, device: str, only=None, kept: tuple[str, ...] | None = None) -> None:
    """torchao fp8 (dynamic activation scales and weight scales, per row or per tensor as
    `FP8_GRANULARITY` says) for the blocks' linears but `kept` (default FP8_KEPT_BF16), or for those of
    them `only(module, name)` accepts."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    kept = FP8_KEPT_BF16 if kept is None else kept

    granularity = {"row": PerRow, "tensor": PerTensor}[FP8_GRANULARITY]()
    # A floor under each scale's absolute maximum: an all-zero row (the zeroed attention output of a
    # padding token under FlashAttention-4, qwen_batch.attention) would otherwise get scale 0 and turn
    # into 0/0 = NaN, which then reaches every real token through the next layer's keys and values.
    # Measured on an H200: torchao 0.17 per-row, a zero row comes out NaN without it, zero with it.
    # Any real activation's maximum is far above the floor, so it changes nothing else.
    # `device=`: each linear moves to the GPU, then is quantized, so the bf16 copy never has to fit.
    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=granularity, activation_value_lb=FP8_SCALE_FLOOR),
        filter_fn=lambda module, name: _fp8_linear_filter(module, name, kept) and (only is None or only(module, name)),
        device=device,
    )
    transformer.to(device)


def _fp8_storage(transformer: torch.nn.Module, dtype: torch.dtype, kept: tuple[str, ...]) -> None:
    import torch
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    skip = (
        *DEFAULT_SKIP_MODULES_PATTERN,
        *(transformer._skip_layerwise_casting_patterns or ()),
        *kept,
        r"^(?!transformer_blocks)[^.]+$",  # no top-level module but the blocks
    )
    transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype, skip_modules_pattern=tuple(dict.fromkeys(skip))
    )


def pin_in_place(module: torch.nn.Module) -> None:
    """Move every CPU parameter and buffer into page-locked memory, one tensor at a time, so host RAM
    holds one copy (group offload would otherwise pin a second copy of the whole model)."""
    import torch

    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu":
            tensor.data = tensor.data.cpu()
        if not tensor.is_pinned():
            tensor.data = tensor.data.pin_memory()
    torch.cuda.empty_cache()


def _group_offload(module: torch.nn.Module, device: str, offload_type: str) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    on_gpu = device.startswith("cuda")
    if on_gpu:
        pin_in_place(module)
    apply_group_offloading(
        module,
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=1 if offload_type == "block_level" else None,
        # A side stream prefetches the next group while this one computes; record_stream lets the
        # allocator reclaim a used group without the host waiting for the GPU (no sync per block).
        use_stream=on_gpu,
        record_stream=on_gpu,
        non_blocking=on_gpu,
    )


def _sequential_offload(module: torch.nn.Module, device: str) -> None:
    import torch
    from accelerate import cpu_offload

    module.to("cpu")
    cpu_offload(module, execution_device=torch.device(device))


# --- A run's choice ---------------------------------------------------------------------------------

COMPILE_CHOICES = ("auto", "on", "off")
# Compiling costs ~25 s (bf16) to ~6 min (fp8) once per machine, then seconds from the cache; it saves
# ~0.05 s per forward, 5 s per 1024x1024 image: worth it from a handful of images.
COMPILE_MIN_IMAGES = 8
DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class RunMemory:
    """What a run's two stages do with memory, decided before any model loads."""

    encoder_mode: str
    denoiser: Placement
    batch_size: int
    encode_batch_size: int
    plan: MemoryPlan | None = None  # None on the CPU, where there is nothing to plan


def plan_run_memory(
    mode: str,
    compile: str,
    compile_cache: str | None,
    batch_size: int | None,
    encode_batch_size: int,
    device: str,
    requests: list,
    task: str = "generate",
    fp8_every_linear: bool = False,
) -> RunMemory:
    """Resolve --memory-mode and --compile for the rows to generate; raises DoesNotFitError (a
    ConfigError: exit 2, nothing loaded) when no mode fits this GPU and host."""
    from qwen_batch.planner import MEMORY_MODES, Job, detect_machine, plan_memory

    if mode not in MEMORY_MODES:
        raise ConfigError(f"--memory-mode {mode!r}: use one of {', '.join(MEMORY_MODES)}")
    if compile not in COMPILE_CHOICES:
        raise ConfigError(f"--compile {compile!r}: use one of {', '.join(COMPILE_CHOICES)}")
    adapters = any(request.loras for request in requests)
    if not device.startswith("cuda"):
        if mode in (OFFLOAD, SEQUENTIAL):
            raise ConfigError(
                f"--memory-mode {mode} streams weights from host RAM to a GPU; on the CPU use auto, bf16 or fp8"
            )
        chosen = RESIDENT if mode == "auto" else mode
        return RunMemory(
            encoder_mode=chosen,
            denoiser=Placement(
                chosen,
                compile=compile == "on",
                compile_cache=compile_cache,
                adapters=adapters,
                fp8_every_linear=fp8_every_linear,
            ),
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            encode_batch_size=encode_batch_size,
        )
    job = Job.for_requests(requests, task, batch_size, compile=compile != "off")
    plan = plan_memory(detect_machine(device), job, mode, encode_batch_size)
    denoise = plan.denoise
    compiled = compile == "on" or (
        compile == "auto"
        and denoise.mode in (RESIDENT, FP8)
        and (denoise.mode == RESIDENT or plan.machine.fp8_compute)
        and len(requests) >= COMPILE_MIN_IMAGES
    )
    if adapters and denoise.mode == SEQUENTIAL:
        raise ConfigError(
            "rows with LoRA adapters cannot run with --memory-mode sequential (accelerate's per-layer hooks "
            "would have to be rebuilt at every adapter switch): use --memory-mode offload, which streams the "
            "fused weights from host RAM"
        )
    return RunMemory(
        encoder_mode=plan.encode.mode,
        denoiser=Placement(
            denoise.mode,
            compile=compiled,
            vae_tiling=denoise.vae_tiling,
            compile_cache=compile_cache,
            adapters=adapters,
            fp8_every_linear=fp8_every_linear,
        ),
        batch_size=denoise.batch_size,
        encode_batch_size=plan.encode.batch_size,
        plan=plan,
    )
