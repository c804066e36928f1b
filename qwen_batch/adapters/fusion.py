"""One adapter set at a time, fused into the transformer's weights, and taken out exactly.

Batches are keyed on their rows' adapter set (`Request.batch_key`) and the engine orders them so each
set's batches run together; before a batch runs, `AdapterFusion.use(set)` makes that set the one in
the weights. Switching sets:

1. **restore** the layers the previous set changed, from a copy of their original weights taken
   before the first fuse (exact: subtracting the delta again, as `unfuse_lora` does, leaves bf16
   rounding behind, and it would add up over a run's switches);
2. **fuse** through diffusers: `load_lora_weights` (its converter reads the kohya, ComfyUI and
   DiffSynth layouts; peft wraps the layers), `set_adapters(names, scales)`, `fuse_lora`, then
   `unload_lora_weights`, which removes peft's wrappers and keeps the fused weights. So a batch with an
   adapter costs what a batch without one costs, and the module tree is the one `torch.compile`
   traced: the weights change in place, and shapes never, so compiled blocks are not recompiled.

In fp8 mode the layers torchao quantized cannot take a fuse (peft refuses float8 weights), so their
bf16 weights are kept on the host (`QuantizedWeights`) and a switch installs them again, fuses in
bf16 and quantizes the changed layers anew: the same quantization as at load, of the fused weights.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen_batch.adapters.loras import LoraRef, adapter_targets, module_layout

if TYPE_CHECKING:
    import torch

    from qwen_batch.memory.placement import QuantizedWeights

log = logging.getLogger(__name__)

# A copy of the original weights stays on the GPU only if this share of its memory is still free after
# it (the next batch's activations need room); otherwise it goes to pinned host memory.
KEEP_FREE_SHARE = 0.3
ADAPTER_NAME_PREFIX = "qwen_batch_"


@dataclass
class FusionStats:
    switches: int = 0  # adapter sets made current (a set fused, or the weights restored)
    fuses: int = 0  # adapter sets fused
    seconds: float = 0.0  # all of the switching, and its parts:
    read_seconds: float = 0.0  # reading, hash-checking and converting the adapter files
    restore_seconds: float = 0.0  # putting the original weights back
    fuse_seconds: float = 0.0  # diffusers: load_lora_weights, set_adapters, fuse_lora, unload_lora_weights
    requantize_seconds: float = 0.0  # fp8: installing the bf16 weights and quantizing the fused ones


class AdapterFusion:
    """Keeps one adapter set fused into a pipeline's transformer (see the module's docstring)."""

    def __init__(self, pipe, quantized: QuantizedWeights | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        # Inference only. peft's injection turns requires_grad off on every weight it wraps; off from the
        # start, the first fuse changes nothing that compiled blocks are guarded on (no recompile).
        self.transformer.requires_grad_(False)
        self.quantized = quantized
        self.current: tuple[LoraRef, ...] = ()
        self.stats = FusionStats()
        self._layout: dict[str, tuple[int, int]] | None = None
        self._changed: set[str] = set()  # layers holding fused weights now
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # name -> (weight, bias)
        self._loaded = 0  # adapters loaded so far: each gets a fresh name

    @property
    def layout(self) -> dict[str, tuple[int, int]]:
        if self._layout is None:
            self._layout = module_layout(self.transformer)
        return self._layout

    def use(self, adapters: Sequence[LoraRef]) -> None:
        """Make `adapters` (with their scales) the set fused in the weights; nothing to do if it already is."""
        adapters = tuple(adapters)
        if adapters == self.current:
            return
        started = time.perf_counter()
        try:
            self._switch(adapters)
        except BaseException:
            self._recover()
            raise
        self.stats.switches += 1
        self.stats.fuses += bool(adapters)
        self.stats.seconds += time.perf_counter() - started
        log.info(
            "adapters: %s in %.2f s",
            ", ".join(f"{ref.name} x{ref.scale:g}" for ref in adapters) or "none (original weights)",
            time.perf_counter() - started,
        )

    def _switch(self, adapters: tuple[LoraRef, ...]) -> None:
        stats, clock = self.stats, _Clock(self.transformer)
        loaded = [adapter_targets(ref, self.layout) for ref in adapters]
        targets = set().union(*(changed for _, changed in loaded))
        stats.read_seconds += clock.lap()
        quantized = self.quantized.names if self.quantized else frozenset()
        self._restore(self._changed - quantized)
        stats.restore_seconds += clock.lap()
        requantize = (self._changed | targets) & quantized
        if requantize:
            self.quantized.install_originals(self.transformer, requantize)  # fuse in bf16, never into fp8
        stats.requantize_seconds += clock.lap()
        self._changed = set()
        self.current = ()
        if adapters:
            self._keep_originals(targets - quantized)
            self._fuse(adapters, [tensors for tensors, _ in loaded])
            self._changed = targets
            self.current = adapters
        stats.fuse_seconds += clock.lap()
        if requantize:
            self.quantized.requantize(self.transformer, requantize, fused=targets if adapters else set())
        stats.requantize_seconds += clock.lap()

    def _fuse(self, adapters: tuple[LoraRef, ...], tensors: list[dict[str, torch.Tensor]]) -> None:
        import torch

        names = []
        for state_dict in tensors:
            name = f"{ADAPTER_NAME_PREFIX}{self._loaded}"
            self._loaded += 1
            with warnings.catch_warnings():  # several adapters in one model is what a set is
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(state_dict, adapter_name=name)
            names.append(name)
        with torch.no_grad():
            self.pipe.set_adapters(names, adapter_weights=[ref.scale for ref in adapters])
            self.pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
        self.pipe.unload_lora_weights()  # peft's wrappers go, the fused weights stay

    def _module(self, name: str) -> torch.nn.Module:
        return self.transformer.get_submodule(name)

    def _keep_originals(self, names: set[str]) -> None:
        """Copy the original weights of `names` once; they are restored from here, never recomputed."""
        missing = [name for name in sorted(names) if name not in self._originals]
        if not missing:
            return
        import torch

        modules = [self._module(name) for name in missing]
        device = modules[0].weight.device
        needed = sum(
            module.weight.nbytes + (module.bias.nbytes if module.bias is not None else 0) for module in modules
        )
        place = device
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            if free - needed < KEEP_FREE_SHARE * total:
                place = torch.device("cpu")
        for name, module in zip(missing, modules, strict=True):
            self._originals[name] = (_copy(module.weight, place), _copy(module.bias, place))
        log.info(
            "adapters: original weights of %d layers kept on %s (%.2f GiB), to restore them exactly",
            len(missing),
            "the GPU" if place.type == "cuda" else "the host",
            needed / 2**30,
        )

    def _restore(self, names: set[str]) -> None:
        import torch

        with torch.no_grad():
            for name in names:
                module = self._module(name)
                weight, bias = self._originals[name]
                module.weight.data.copy_(weight, non_blocking=True)
                if bias is not None:
                    module.bias.data.copy_(bias, non_blocking=True)

    def _recover(self) -> None:
        """After a failed switch: no wrappers left, original weights back, no set current."""
        import contextlib

        with contextlib.suppress(Exception):
            self.pipe.unload_lora_weights()
        names = set(self._originals) & {name for name in self.layout}
        quantized = self.quantized.names if self.quantized else frozenset()
        with contextlib.suppress(Exception):
            self._restore(names - quantized)
        if self.quantized:
            with contextlib.suppress(Exception):
                self.quantized.install_originals(self.transformer, set(quantized))
                self.quantized.requantize(self.transformer, set(quantized), fused=set())
        self._changed, self.current = set(), ()


class _Clock:
    """Seconds between laps, the GPU's queued work included (a switch is rare: waiting costs nothing)."""

    def __init__(self, module: torch.nn.Module):
        self.cuda = any(parameter.is_cuda for parameter in module.parameters())
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _copy(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if tensor is None:
        return None
    copy = tensor.detach().to(device, copy=True)
    return copy.pin_memory() if device.type == "cpu" and tensor.is_cuda else copy
