"""Put a model's weights where they will live, in a memory mode, and compile it.

The modes (chosen per stage by `qwen_batch.memory.planner`, or forced with --memory-mode):
- `bf16`: resident in the run's dtype (bf16 on a GPU).
- `fp8`: the transformer blocks' linear layers in float8. With fp8 matmuls (compute capability >= 8.9)
  through torchao (dynamic per-row activation scales, per-row weight scales); otherwise fp8 storage
  with bf16 compute (diffusers layerwise casting). `module.to(torch.float8_e4m3fn)` does not work: the
  first matmul fails on mixed dtypes. A transformer file already in fp8 (`--transformer`, ComfyUI's
  fp8 e4m3fn) is used as stored: its weights become torchao fp8 tensors with their own scales, computed
  with fp8 matmuls where the GPU has them and upcast layer by layer elsewhere.
- `gguf`: a GGUF transformer file's quantized weights resident on the GPU, dequantized layer by layer as
  they are used (diffusers' GGUF support).
- `offload`: the blocks stay in host memory as stored (bf16, or the file's fp8 or GGUF) and are copied to
  the GPU one block ahead of use on a side stream (diffusers group offload); one pass over the weights per
  step serves the whole batch. As many blocks as `Placement.pinned_bytes` allows are pinned
  (`qwen_batch.memory.pinned_arena`); the rest stream from the memory-mapped checkpoint, pinned a block at a time.
- `fp8-offload`: offload, with the blocks' linear weights quantized once to fp8 (torchao, per-row
  scales) before they are pinned: half the bytes to keep in host RAM and to copy at every step, computed
  as bf16 (weight-only: dequantized on the GPU as each layer runs).
- `sequential`: each layer copied to the GPU when it runs (accelerate): the last resort.

Weights arrive block by block (`qwen_batch.memory.streamed_load` reads them from the checkpoint files and hands
each block to `convert_block`, then `finish_placement` adds what acts on the whole model: hooks, the
GELU epilogue, compile). A model already built in memory goes through `place_transformer`, the same two
steps. So no mode ever needs the whole bf16 transformer on the GPU, or in host RAM.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.families import GENERATE
from qwen_batch.memory.modes import BF16, FP8, FP8_OFFLOAD, GGUF, OFFLOAD, PLACEMENT_MODES, SEQUENTIAL, STREAMING_MODES
from qwen_batch.weights.model_source import qwen_batch_home

if TYPE_CHECKING:
    import torch

    from qwen_batch.families import ModelFamily
    from qwen_batch.memory.pinned_arena import PinnedArena
    from qwen_batch.memory.planner import MemoryPlan, WeightsSummary

log = logging.getLogger(__name__)

FP8_KEPT_BF16 = (r"img_mlp\.net\.2$",)  # inside the blocks; all layers outside them stay bf16 too
BLOCKS = "transformer_blocks"
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# bf16 on a GPU: the feed-forwards' GELU in cuBLASLt's GEMM epilogue (qwen_batch.families.qwen_image.gelu_epilogue).
# Benchmarks turn it off to measure what it gives.
GELU_EPILOGUE = True
# Inductor options for the compiled blocks (`torch.compile(options=...)`). Coordinate-descent tuning of
# Inductor's own fused kernels (norms, modulation, RoPE, gates): on an H200, 0.1239 -> 0.1221 s per
# row-forward (-1.5%) for about 5 s more compile (docs/benchmarks.md). torchao turns it on for fp8.
COMPILE_OPTIONS: dict[str, object] = {"coordinate_descent_tuning": True}
# fp8 scales: "row" (one per activation row and weight row) or "tensor" (one per tensor, cuBLAS's
# plain fp8 GEMM; coarser, so more rounding where a row's range differs from the tensor's).
FP8_GRANULARITY = "row"
FP8_SCALE_FLOOR = 1e-12  # see _fp8_config


@dataclass(frozen=True)
class Placement:
    """How one stage's model goes on the device."""

    mode: str = BF16
    compile: bool = False
    vae_tiling: bool = False
    compile_cache: str | None = None  # None: $QWEN_BATCH_HOME/compile-cache
    # The run fuses LoRA adapters: fp8 then keeps a way to the layers' bf16 weights (QuantizedWeights).
    adapters: bool = False
    fp8_every_linear: bool = False  # fp8 also on the block linears FP8_KEPT_BF16 names
    # Offload modes: host RAM to pin for the streamed blocks (bytes; None: all of them). The rest stream
    # from the memory-mapped checkpoint through the page cache.
    pinned_bytes: int | None = None

    @property
    def fp8_kept_bf16(self) -> tuple[str, ...]:
        """The block linears (name patterns) that stay bf16 under fp8."""
        return () if self.fp8_every_linear else FP8_KEPT_BF16

    @property
    def streams(self) -> bool:
        return self.mode in STREAMING_MODES

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENT_MODES:
            raise ConfigError(f"memory mode {self.mode!r}: use one of {', '.join(PLACEMENT_MODES)}")
        if self.fp8_every_linear and self.mode not in (FP8, FP8_OFFLOAD):
            # e.g. --memory-mode auto chose bf16 on a large GPU
            log.warning("--fp8-every-linear applies to the fp8 modes only: the transformer runs in %s", self.mode)


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
    (offload, sequential), not cast per layer (fp8 storage without fp8 matmuls, GGUF dequantized)."""
    return mode == BF16 or (mode == FP8 and fp8_compute_available(device))


# --- Block by block --------------------------------------------------------------------------------


def block_linears(block: torch.nn.Module, prefix: str, kept: tuple[str, ...]) -> Callable[[torch.nn.Module, str], bool]:
    """A torchao `filter_fn` for a block's linear layers but those `kept` (patterns on the full name)."""
    import torch

    def accept(module: torch.nn.Module, name: str) -> bool:
        full = f"{prefix}.{name}" if name else prefix
        return isinstance(module, torch.nn.Linear) and not any(re.search(pattern, full) for pattern in kept)

    return accept


def convert_block(block: torch.nn.Module, prefix: str, placement: Placement, device: str, dtype: torch.dtype) -> None:
    """What a mode does to one transformer block's weights, once they are loaded where they will live
    (the GPU for resident modes, host memory for the offload modes)."""
    mode, kept = placement.mode, placement.fp8_kept_bf16
    if mode == FP8:
        if fp8_compute_available(device):
            quantize_fp8(block, device, block_linears(block, prefix, kept))
        else:
            _cast_fp8_storage(block, prefix, kept)
    elif mode == FP8_OFFLOAD:
        from qwen_batch.memory.fp8_linear import quantize_rows, swap_in

        # Quantized on the GPU where there is one (much faster), then back to host memory.
        accept, where = block_linears(block, prefix, kept), device if device.startswith("cuda") else "cpu"
        for name, module in list(block.named_modules()):
            if accept(module, name):
                qdata, scale = quantize_rows(module.weight.to(where))
                swap_in(block, name, qdata, scale, "cpu")


def quantize_fp8(
    module: torch.nn.Module, device: str, accept: Callable[[torch.nn.Module, str], bool], weight_only: bool = False
) -> None:
    """torchao fp8 for the linear layers of `module` that `accept(layer, name)`: dynamic activation scales
    and weight scales (per row or per tensor, `FP8_GRANULARITY`), or weights only (dequantized as used)."""
    from torchao.quantization import quantize_

    # `device=`: each linear moves to the device, then is quantized, so the bf16 copy never has to fit.
    quantize_(module, _fp8_config(weight_only), filter_fn=accept, device=device)


def _fp8_config(weight_only: bool = False):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    if weight_only:
        return Float8WeightOnlyConfig()
    granularity = {"row": PerRow, "tensor": PerTensor}[FP8_GRANULARITY]()
    # A floor under each scale's absolute maximum: an all-zero row (the zeroed attention output of a
    # padding token under FlashAttention-4, qwen_batch.families.qwen_image.attention) would otherwise get scale 0 and turn
    # into 0/0 = NaN, which then reaches every real token through the next layer's keys and values.
    # Measured on an H200: torchao 0.17 per-row, a zero row comes out NaN without it, zero with it.
    # Any real activation's maximum is far above the floor, so it changes nothing else.
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, activation_value_lb=FP8_SCALE_FLOOR)


def stored_fp8_weight(qdata: torch.Tensor, scale: float, dtype: torch.dtype, fp8_matmuls: bool) -> torch.Tensor:
    """A linear weight stored in fp8 (a ComfyUI-style file: a plain cast, or with one scale per tensor) as a
    torchao fp8 tensor holding exactly those values: one scale per row, all equal to the file's. With fp8
    matmuls, the activations are quantized per row as in `fp8` mode; otherwise the weight is upcast as it
    is used (weight-only)."""
    import torch
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    rows, columns = qdata.shape
    scales = torch.full((rows, 1), scale, dtype=torch.float32, device=qdata.device)
    activations = None
    config = _fp8_config()
    if fp8_matmuls:
        activation_granularity, _ = config.granularity
        activations = QuantizeTensorToFloat8Kwargs(
            config.activation_dtype,
            activation_granularity,
            hp_value_lb=config.activation_value_lb,
            kernel_preference=config.kernel_preference,
        )
    return Float8Tensor(
        qdata,
        scales,
        block_size=[1, columns],
        mm_config=config.mm_config,
        act_quant_kwargs=activations,
        kernel_preference=config.kernel_preference,
        dtype=dtype,
    )


def _cast_fp8_storage(block: torch.nn.Module, prefix: str, kept: tuple[str, ...]) -> None:
    """fp8 storage without fp8 matmuls: the block's linears (but `kept`) cast to fp8 where they lie; the
    layerwise-casting hooks that upcast them per layer come with `finish_placement`."""
    import torch

    accept = block_linears(block, prefix, kept)
    for name, module in block.named_modules():
        if accept(module, name):
            module.to(torch.float8_e4m3fn)


def streaming_arena(placement: Placement, device: str) -> PinnedArena | None:
    """The pinned arena offload modes copy their blocks into, with the plan's budget; None where nothing is
    pinned (resident modes, sequential, the CPU)."""
    from qwen_batch.memory.pinned_arena import PinnedArena

    if placement.mode not in (OFFLOAD, FP8_OFFLOAD) or not device.startswith("cuda"):
        return None
    return PinnedArena(placement.pinned_bytes)


def pin_for_streaming(module: torch.nn.Module, arena: PinnedArena) -> None:
    """Copy `module`'s host tensors into the pinned arena while its budget lasts; the others stay where
    they are (memory-mapped checkpoint pages) and are pinned on the fly when they stream."""
    for parameter in [*module.parameters(), *module.buffers()]:
        if parameter.device.type == "cpu" and not parameter.is_pinned():
            copy = arena.take(parameter.data)
            if copy is not None:
                parameter.data = copy


# --- The whole model --------------------------------------------------------------------------------


def place_transformer(
    transformer: torch.nn.Module,
    placement: Placement,
    device: str,
    dtype: torch.dtype,
    arena: PinnedArena | None = None,
) -> str:
    """Move a QwenImageTransformer2DModel built or loaded in host memory to `device` in `placement.mode`,
    block by block (a model read from disk goes through `qwen_batch.memory.streamed_load`, which ends the same
    way). Returns what was done, in words, for the log."""
    blocks = getattr(transformer, BLOCKS)
    for index, block in enumerate(blocks):
        if placement.mode in (BF16, FP8, GGUF):
            block.to(device)
        convert_block(block, f"{BLOCKS}.{index}", placement, device, dtype)
        if arena is not None and placement.mode in (OFFLOAD, FP8_OFFLOAD):
            pin_for_streaming(block, arena)
    return finish_placement(transformer, placement, device, dtype, arena)


def finish_placement(
    transformer: torch.nn.Module,
    placement: Placement,
    device: str,
    dtype: torch.dtype,
    arena: PinnedArena | None = None,
    stored_fp8: bool = False,
) -> str:
    """What acts on the whole model once its blocks are converted: the rest of its modules to the device,
    hooks (layerwise casting, group offload), the GELU epilogue. Returns the placement line. Compiling
    comes after (`compile_blocks`), once the attention processors are in."""
    mode, kept = placement.mode, placement.fp8_kept_bf16
    if mode in (BF16, FP8, GGUF):
        transformer.to(device)
    if mode == BF16:
        done = f"resident in {str(dtype).removeprefix('torch.')}"
        if GELU_EPILOGUE and device.startswith("cuda"):
            from qwen_batch.families.qwen_image.gelu_epilogue import fuse_gelu_epilogues

            done += f"; GELU fused into {fuse_gelu_epilogues(transformer)} GEMMs"
    elif mode == FP8 and stored_fp8:
        matmuls = "fp8 matmuls" if fp8_compute_available(device) else "upcast layer by layer (no fp8 matmuls here)"
        done = f"fp8 as stored in the file, {matmuls}, embedders in {str(dtype).removeprefix('torch.')}"
    elif mode == FP8:
        if fp8_compute_available(device):
            done = f"fp8 through torchao (dynamic activation, per-{FP8_GRANULARITY} scales), {_kept_bf16(kept)} in bf16"
        else:
            _fp8_storage(transformer, dtype, kept)
            done = f"fp8 storage, bf16 compute (layerwise casting), {_kept_bf16(kept)} in bf16"
    elif mode == GGUF:
        done = "GGUF weights resident, dequantized layer by layer as they are used"
    elif mode in (OFFLOAD, FP8_OFFLOAD):
        _group_offload(transformer, device, offload_type="block_level", pin_all=arena is None)
        what = "in fp8 (per-row scales, dequantized as each layer runs)" if mode == FP8_OFFLOAD else "as stored"
        where = "pinned host RAM" if arena is None else _pinned_share(arena, transformer)
        done = f"group offload: blocks {what} streamed from {where}, one block ahead"
    else:
        _sequential_offload(transformer, device)
        done = "sequential offload: every layer copied when it runs"
    return done


def compile_blocks(model: torch.nn.Module, placement: Placement, placed: str, name: str = "blocks") -> str | None:
    """Regional torch.compile of a model's blocks (after the attention processors are set: they are traced);
    returns what was done in words, or None where it is skipped. `placed`: the placement so far in words (layerwise
    casting shows there). A ControlNet's blocks are the transformer's kind: the same compiled code serves them,
    guarded by their shapes."""
    if placement.streams or "layerwise" in placed:
        log.warning("compile is skipped under %s: its hooks move or cast weights around each layer", placement.mode)
        return None
    use_compile_cache(placement.compile_cache)
    options = dict(COMPILE_OPTIONS) or None
    if getattr(model, "_repeated_blocks", None):
        # Regional: the 60 identical blocks share one compiled graph, so compiling costs one block.
        model.compile_repeated_blocks(fullgraph=True, options=options)
    else:  # QwenImageControlNetModel declares no repeated blocks: its blocks, one by one, to the same effect
        for block in getattr(model, BLOCKS):
            block.compile(fullgraph=True, options=options)
    return f"{name} compiled (cache {os.environ[COMPILE_CACHE_ENV]})"


def _pinned_share(arena: PinnedArena, transformer: torch.nn.Module) -> str:
    total = sum(parameter.numel() * parameter.element_size() for parameter in transformer.parameters())
    if total and arena.used >= total:
        return f"pinned host RAM ({arena.used / 2**30:.1f} GiB)"
    return (
        f"pinned host RAM ({arena.used / 2**30:.1f} GiB, the budget) and, for the rest "
        f"({(total - arena.used) / 2**30:.1f} GiB), the memory-mapped checkpoint through the page cache"
    )


def place_vae(vae: torch.nn.Module, device: str, tiling: bool) -> None:
    vae.to(device)
    # One image at a time: the decode's peak memory (about 4 GiB at 1024x1024) no longer grows with
    # the batch, and a row's image does not depend on what shares its batch.
    vae.enable_slicing()
    if tiling:
        vae.enable_tiling()


def place_text_encoder(
    text_encoder: torch.nn.Module, mode: str, device: str, dtype: torch.dtype, pinned_bytes: int | None = None
) -> str:
    """Place the Qwen2.5-VL text encoder on `device` (it may be there already: loaded straight to the GPU).
    The LM head goes: encoding reads hidden states, and the head's logits (vocabulary 152,064 wide) would
    cost 0.3 MB per token and 1 GiB of weights.

    fp8 casts layer by layer on the device (each layer goes up in bf16, then is cast), so neither the
    GPU nor host RAM ever holds an fp8 copy beside the bf16 one."""
    import torch

    if hasattr(text_encoder, "lm_head"):
        text_encoder.lm_head = torch.nn.Identity()
    if mode == BF16:
        text_encoder.to(device)
        return "resident"
    if mode == FP8:
        from diffusers.hooks import apply_layerwise_casting

        skip = ("norm", "embed", r"visual\.patch_embed")
        for name, module in text_encoder.named_modules():
            if next(module.children(), None) is not None:
                continue  # not a leaf: its own parameters (if any) go with the last `.to` below
            module.to(device)
            if isinstance(module, torch.nn.Linear) and not any(re.search(pattern, name) for pattern in skip):
                module.to(torch.float8_e4m3fn)
        text_encoder.to(device)
        apply_layerwise_casting(
            text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype, skip_modules_pattern=skip
        )
        return "fp8 storage, bf16 compute (layerwise casting)"
    if mode in (OFFLOAD, FP8_OFFLOAD, SEQUENTIAL):
        if pinned_bytes is None or not device.startswith("cuda"):
            _group_offload(text_encoder, device, offload_type="leaf_level", pin_all=True)
            return "group offload, layer by layer from pinned host RAM"
        from qwen_batch.memory.pinned_arena import PinnedArena

        arena = PinnedArena(pinned_bytes)  # the encoder's own budget (a leaf-level stream, not a placement's)
        pin_for_streaming(text_encoder, arena)
        _group_offload(text_encoder, device, offload_type="leaf_level", pin_all=False)
        return (
            f"group offload, layer by layer: {arena.used / 2**30:.1f} GiB from pinned host RAM, the rest from the "
            "memory-mapped checkpoint"
        )
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
    """A way back to the original (bf16) weights of a transformer's fp8 layers, so that adapters can be
    fused in bf16 and the fused layers quantized again (peft cannot fuse into float8 weights, and
    quantizing a fused fp8 weight twice would compound the rounding). The originals are read back from
    the memory-mapped checkpoint (`originals` maps each layer to a host tensor: a view of the file's
    pages, no copy); a model built in memory keeps references to its host tensors instead."""

    originals: Mapping[str, torch.Tensor]  # layer name -> its original weight on the host, in the run's dtype
    kind: str  # "torchao" (fp8 matmuls), "weight-only" (torchao, upcast as used) or "storage" (layerwise casting)
    device: str
    # A layer's weight exactly as loaded, for the layers a switch gives back their original weights: weights
    # stored in fp8 in the file come back as stored, not quantized again from their bf16 values.
    stored: Callable[[str], torch.Tensor] | None = None

    @classmethod
    def capture(cls, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The blocks' linear weights before placement (references: placement moves or casts copies)."""
        import torch

        return {
            name: module.weight.data
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(f"{BLOCKS}.")
        }

    @classmethod
    def after_placement(
        cls, transformer: torch.nn.Module, captured: Mapping[str, torch.Tensor], device: str
    ) -> QuantizedWeights | None:
        quantized = [name for name in captured if _is_fp8(transformer.get_submodule(name).weight)]
        if not quantized:
            return None
        weights = [transformer.get_submodule(name).weight for name in quantized]
        if any(_is_fp8_storage(weight) for weight in weights):
            kind = "storage"
        else:
            kind = (
                "weight-only"
                if any(getattr(weight, "act_quant_kwargs", 0) is None for weight in weights)
                else "torchao"
            )
        if isinstance(captured, dict):  # references to host tensors: bring any that placement moved back
            originals: Mapping[str, torch.Tensor] = {name: captured[name].to("cpu") for name in quantized}
        else:  # read from the checkpoint files on request: stays lazy, restricted to these layers
            originals = captured.restricted_to(quantized)
        return cls(originals=originals, kind=kind, device=device)

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

    def requantize(self, transformer: torch.nn.Module, names: set[str], fused: set[str] | None = None) -> None:
        """Quantize `names` again after a switch: the `fused` ones (holding an adapter now) from their bf16
        weights; the others back to what they were at load."""
        import torch

        fused = set(names) if fused is None else fused & set(names)
        if self.stored is not None:
            for name in set(names) - fused:
                transformer.get_submodule(name).weight = torch.nn.Parameter(self.stored(name), requires_grad=False)
            names = fused
        if not names:
            return
        if self.kind in ("torchao", "weight-only"):
            # `names` were all quantized at placement, whatever that placement kept in bf16.
            quantize_fp8(transformer, self.device, lambda module, name: name in names, self.kind == "weight-only")
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


def _group_offload(module: torch.nn.Module, device: str, offload_type: str, pin_all: bool) -> None:
    """diffusers group offload, one block (or leaf layer) ahead on a side stream. `pin_all`: pin every
    tensor first (the whole model fits the host RAM set aside); otherwise what is not pinned yet is pinned
    on the fly as it streams (`low_cpu_mem_usage`), a group at a time. Streamed weights are plain tensors
    (fp8 ones in `qwen_batch.memory.fp8_linear.Fp8Linear`): torchao's fp8 tensors cannot move between devices."""
    import torch
    from diffusers.hooks import apply_group_offloading

    on_gpu = device.startswith("cuda")
    if on_gpu and pin_all:
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
        low_cpu_mem_usage=on_gpu and not pin_all,
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
    encoder_pinned_bytes: int | None = None  # the encoder offloaded: host RAM to pin (None: all of it)


def decide_run_memory(
    mode: str,
    compile: str,
    compile_cache: str | None,
    batch_size: int | None,
    encode_batch_size: int,
    device: str,
    requests: list,
    task: str = GENERATE,
    fp8_every_linear: bool = False,
    transformer: WeightsSummary | None = None,
    controlnet_layers: int = 0,
    family: ModelFamily | None = None,
) -> RunMemory:
    """Resolve --memory-mode and --compile for the rows to generate; raises DoesNotFitError (a
    ConfigError: exit 2, nothing loaded) when no mode fits this GPU and host. `transformer` describes
    the transformer's weights (a --transformer file's kind and size; None: the model's own); `family` is the
    model's (its sizes and costs are planned for; None: the default family, Qwen-Image)."""
    from qwen_batch.families import default_family
    from qwen_batch.memory.planner import WeightsSummary, Workload, check_mode_for_weights, detect_machine, plan_memory

    if compile not in COMPILE_CHOICES:
        raise ConfigError(f"--compile {compile!r}: use one of {', '.join(COMPILE_CHOICES)}")
    family = family or default_family()
    weights = transformer or WeightsSummary.published(family.cost_constants())
    open_modes = check_mode_for_weights(mode, weights)
    adapters = any(request.loras for request in requests)
    if not device.startswith("cuda"):
        if mode in STREAMING_MODES:
            raise ConfigError(
                f"--memory-mode {mode} streams weights from host RAM to a GPU; on the CPU use auto or "
                f"{' or '.join(m for m in open_modes if m not in STREAMING_MODES)}"
            )
        chosen = open_modes[0] if mode == "auto" else mode
        return RunMemory(
            # The encoder follows a mode asked for (fp8 on the CPU stores it in fp8 too); auto keeps it as it is.
            encoder_mode=chosen if mode in (BF16, FP8) else BF16,
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
    job = Workload.for_requests(
        requests,
        task,
        batch_size,
        compile=compile != "off",
        weights=weights,
        controlnet_layers=controlnet_layers,
        family=family,
    )
    plan = plan_memory(detect_machine(device), job, mode, encode_batch_size)
    denoise = plan.denoise
    compiled = compile == "on" or (
        compile == "auto"
        and denoise.mode in (BF16, FP8)
        and (denoise.mode == BF16 or plan.machine.fp8_compute)
        and len(requests) >= COMPILE_MIN_IMAGES
    )
    if adapters and denoise.mode == SEQUENTIAL:
        raise ConfigError(
            "rows with LoRA adapters cannot run with --memory-mode sequential (accelerate's per-layer hooks "
            "would have to be rebuilt at every adapter switch): use --memory-mode offload, which streams the "
            "fused weights from host RAM"
        )
    pinned = (
        None if denoise.pinned_gib is None or not denoise.streamed_from_disk_gib else int(denoise.pinned_gib * 2**30)
    )
    _log_plan(plan)
    return RunMemory(
        encoder_mode=plan.encode.mode,
        denoiser=Placement(
            denoise.mode,
            compile=compiled,
            vae_tiling=denoise.vae_tiling,
            compile_cache=compile_cache,
            adapters=adapters,
            fp8_every_linear=fp8_every_linear,
            pinned_bytes=pinned,
        ),
        batch_size=denoise.batch_size,
        encode_batch_size=plan.encode.batch_size,
        plan=plan,
        encoder_pinned_bytes=_encoder_pinned_bytes(plan),
    )


def _log_plan(plan: MemoryPlan) -> None:
    """Say what the run chose and why, and warn when the host cannot give it that RAM right now: a process
    killed by the OOM killer leaves no message of its own."""
    from qwen_batch.memory.planner import available_host_gib

    machine = plan.machine
    for stage in (plan.encode, plan.denoise):
        log.info(
            "memory plan, %s: %s (%s); batch %d, peak GPU about %.1f GiB of %.0f, host RAM about %.1f GiB of %.0f",
            stage.stage,
            stage.mode,
            stage.how,
            stage.batch_size,
            stage.peak_gpu_gib,
            machine.gpu_gib,
            stage.host_gib,
            machine.host_gib,
        )
        for note in stage.notes:
            log.info("memory plan, %s: %s", stage.stage, note)
    available = available_host_gib()
    if available is not None and plan.host_gib > available:
        log.warning(
            "this run plans about %.1f GiB of host RAM, but only %.1f GiB are available now (other processes, or "
            "a container limit): the OOM killer may stop it. Free memory, give the container more, or set "
            "QWEN_BATCH_HOST_MEMORY_GIB to what it may use and the plan will fit that (offload pins less).",
            plan.host_gib,
            available,
        )


def _encoder_pinned_bytes(plan: MemoryPlan) -> int | None:
    """The offloaded encoder pins what its plan's host RAM allows beyond the process itself; None: all."""
    from qwen_batch.memory.planner import HOST_BASE_GIB

    if plan.encode.mode != OFFLOAD or not plan.encode.notes:  # no note: nothing is read back from disk
        return None
    return int((plan.encode.host_gib - HOST_BASE_GIB - plan.job.costs.DIT_LOAD_GIB) * 2**30)
