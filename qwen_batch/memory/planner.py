"""Will it fit? Per stage: the memory mode, batch size, predicted peak GPU memory, host RAM and speed.

Pure arithmetic over the model family's sizes (counted from the published configs) and figures measured with
full-size random weights (bench/, docs/memory.md): Qwen-Image's by default, another family's where the
`Workload` names it (`Workload.family`; Qwen-Image-2.1's timings are estimates, see its costs module). Nothing
here imports torch: `qwen-batch plan --gpu-memory 24 --host-memory 64` answers instantly on any machine;
`detect_machine` (separate, imports torch) reads the GPU and host this process runs on.

Peak GPU memory means what PyTorch's allocator holds at its peak (`torch.cuda.max_memory_allocated`);
a real card also spends some memory on the CUDA context, which `usable_gib` sets aside.

Host RAM means the process's own memory: what it allocates, and the pinned memory offload streams from.
The checkpoint itself is memory-mapped and read block by block straight to where each block lives
(`qwen_batch.memory.streamed_load`), so loading costs one block's pages, not a copy of the model, and the file's
pages that the page cache keeps are the kernel's to drop. What cannot be pinned of what offload streams is
read back from the checkpoint at every step, at the disk's speed (`Machine.disk_gbps`).

The transformer's weights may also come from one file (`--transformer`): fp8 (as stored) or GGUF
(quantized, e.g. 4-bit): `WeightsSummary` says what they are, and the modes open to them follow.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.families import EDIT, GENERATE, default_family
from qwen_batch.memory.modes import (
    AUTO,
    BF16,
    FLOAT_WEIGHTS,
    FP8,
    FP8_OFFLOAD,
    FP8_WEIGHTS,
    GGUF,
    GGUF_WEIGHTS,
    MEMORY_MODES,
    OFFLOAD,
    SEQUENTIAL,
    STREAMING_MODES,
)
from qwen_batch.pipeline.step_cache.spec import FirstBlock, parse_step_cache

if TYPE_CHECKING:
    from qwen_batch.families import ModelFamily

GiB = 2**30
# The default model's sizes and measured costs (Qwen-Image's: qwen_batch/families/qwen_image/costs.py): what a
# `Workload` plans for unless it names another family. The estimates read their job's (`Workload.costs`).
DEFAULT_FAMILY = default_family().name
COSTS = default_family().cost_constants()
# The modes open to each kind of transformer weights, fastest resident first.
MODES_FOR = {
    FLOAT_WEIGHTS: (BF16, FP8, OFFLOAD, FP8_OFFLOAD, SEQUENTIAL),
    FP8_WEIGHTS: (FP8, OFFLOAD),
    GGUF_WEIGHTS: (GGUF, OFFLOAD),
}
LOSSLESS = {BF16: True, OFFLOAD: True, SEQUENTIAL: True, FP8: False, FP8_OFFLOAD: False, GGUF: False}
TASKS = (GENERATE, EDIT)


# --- Memory, measured (bench/memory_tiers.py on an H100, bf16; docs/memory.md) ------------------------
# Group offload keeps the blocks being computed, prefetched and not yet reclaimed on the GPU.
OFFLOAD_BLOCKS_ON_GPU = 3
ALLOCATOR_OVERHEAD_BYTES = int(0.5 * GiB)  # cuBLAS workspaces, rotary tables, latents, fragmentation
ALLOCATOR_OVERHEAD_FRACTION = 0.01
CUDA_CONTEXT_GIB = 0.6  # a real card's memory the allocator never sees

# --- Host RAM ----------------------------------------------------------------------------------------
HOST_BASE_GIB = 4.0  # the Python process with torch, diffusers and CUDA loaded, and its working memory
# What offload pins on the fly for blocks beyond its budget: a few blocks, rounded up to powers of two
# by PyTorch's pinned allocator.
STAGING_BLOCKS = 3
PINNED_ROUNDING = 2.0
PINNED_SLAB_GIB = 0.25  # the pinned arena's last, partly used slab (qwen_batch.memory.pinned_arena)
HOST_MARGIN_FRACTION = 0.10  # keep this much of the host's RAM for the OS and the page cache

# --- Speed of the machine (the model's own figures: the family's costs) ---------------------------
H100_HOST_LINK_GBPS = 55.0  # pinned host-to-GPU copies, measured (PCIe 5.0 x16)
PCIE4_HOST_LINK_GBPS = 25.0  # PCIe 4.0 x16 in practice (32 GB/s on paper)
# Reading weights that are not pinned back from the checkpoint file at every step: a local NVMe disk read
# through page faults, one reader. Conservative: a cloud volume can be slower (an EBS gp3 volume's
# default is 0.125 GB/s): pass --disk-gbps, or QWEN_BATCH_DISK_GBPS.
DISK_GBPS = 1.0
SPEED_BAND = (0.85, 1.25)  # the predicted seconds per image are a band: measured H100 figures +-


class DoesNotFitError(ConfigError):
    """No memory mode fits this GPU and host; the message says what is missing."""


@cache
def family_costs(name: str) -> ModuleType:
    """The planner's constants of the model family named `name` (`ModelFamily.name`)."""
    from qwen_batch.families import _families  # the registry: a Workload names its family by name (plain data)

    for family in _families():
        if family.name == name:
            return family.cost_constants()
    raise ConfigError(f"no model family {name!r}")


@dataclass(frozen=True)
class Machine:
    """The GPU memory and host RAM to plan for (detected, or given with --gpu-memory/--host-memory)."""

    gpu_gib: float | None  # None: no CUDA GPU
    host_gib: float
    fp8_compute: bool = True  # compute capability >= 8.9 (Ada, Hopper, Blackwell): fp8 matmuls
    gpu_name: str = ""
    host_link_gbps: float = H100_HOST_LINK_GBPS
    disk_gbps: float = DISK_GBPS

    @property
    def usable_gib(self) -> float:
        return 0.0 if self.gpu_gib is None else self.gpu_gib - CUDA_CONTEXT_GIB

    @property
    def host_usable_gib(self) -> float:
        return self.host_gib * (1 - HOST_MARGIN_FRACTION)


@dataclass(frozen=True)
class WeightsSummary:
    """The transformer's weights as stored: the model's own (bf16), or the file given with --transformer."""

    kind: str = FLOAT_WEIGHTS  # float (bf16 and such), fp8 (the blocks' linears in fp8) or gguf
    nbytes: int = COSTS.DIT_PARAMS * 2
    block_nbytes: int = COSTS.DIT_BLOCK_PARAMS * 2
    label: str = "the model's own transformer (bf16)"

    @classmethod
    def published(cls, costs: ModuleType = COSTS) -> WeightsSummary:
        """The model's own transformer, in bf16: the sizes of the family whose constants `costs` are."""
        nbytes = costs.DIT_PARAMS * 2
        label = f"the model's own transformer ({costs.MODEL_NAME}, bf16, {nbytes / 1e9:.1f} GB)"
        return cls(FLOAT_WEIGHTS, nbytes, costs.DIT_BLOCK_PARAMS * 2, label)

    @classmethod
    def of(cls, weights) -> WeightsSummary:
        """From a `qwen_batch.weights.transformer_file.TransformerWeights` (its header, read)."""
        if weights.file is None:
            return cls(weights.kind, weights.nbytes, weights.block_nbytes(), "the model's own transformer")
        label = f"{weights.file.name} ({weights.file.storage}, {weights.nbytes / 1e9:.1f} GB)"
        return cls(weights.kind, weights.nbytes, weights.block_nbytes(), label)

    @classmethod
    def gguf_file(cls, quant: str, costs: ModuleType = COSTS) -> WeightsSummary:
        """One of the family's known GGUF files (`GGUF_FILE_GB`: city96's for Qwen-Image), by its quantization:
        for suggestions."""
        nbytes = int(costs.GGUF_FILE_GB[quant] * 1e9)
        return cls(
            GGUF_WEIGHTS, nbytes, nbytes // costs.DIT_BLOCKS, f"a {quant} GGUF file ({costs.GGUF_FILE_GB[quant]} GB)"
        )


@dataclass(frozen=True)
class Workload:
    """What one denoise batch looks like, the model family it runs (its sizes and costs: `costs`), and the
    transformer weights it runs with."""

    width: int = 1024
    height: int = 1024
    steps: int = 50
    true_cfg: bool = True
    task: str = GENERATE
    batch_size: int | None = None  # None: chosen by the plan
    text_tokens: int | None = None  # None: the family's typical prompt (TYPICAL_TEXT_TOKENS)
    compile: bool = True
    input_images: int = 1  # edits: input images per row (Edit-Plus takes several; each rides along as latents)
    weights: WeightsSummary | None = None  # None: the family's own transformer (`WeightsSummary.published`)
    adapters: bool = False  # rows fuse LoRA adapters: fp8-offload's fp8 copy cannot take a fuse
    # ControlNet rows: the ControlNet's blocks (InstantX's Union: 5), resident in bf16 beside the transformer,
    # and the most control images a row has (the ControlNet runs once per image and step on the batch's rows).
    controlnet_layers: int = 0
    control_images: int = 0
    first_block_cache: bool = False  # rows with a first-block step cache: its state beside the activations
    # Qwen-Image-2.1 rows: the most condition images a row brings, each CONDITION_IMAGE_TOKENS in the row's prefix.
    condition_images: int = 0
    family: str = DEFAULT_FAMILY  # the model family planned for (`ModelFamily.name`)

    def __post_init__(self) -> None:
        costs = self.costs
        if self.text_tokens is None:
            object.__setattr__(self, "text_tokens", costs.TYPICAL_TEXT_TOKENS)
        if self.weights is None:
            object.__setattr__(self, "weights", WeightsSummary.published(costs))

    @property
    def costs(self) -> ModuleType:
        """The family's sizes and measured costs (`ModelFamily.cost_constants`)."""
        return family_costs(self.family)

    @classmethod
    def for_requests(
        cls,
        requests: list,
        task: str = GENERATE,
        batch_size: int | None = None,
        compile: bool = True,
        weights: WeightsSummary | None = None,
        controlnet_layers: int = 0,
        family: ModelFamily | None = None,
    ) -> Workload:
        """The job to plan for a set of manifest rows of a model family (None: the default one): their largest
        image (an edit row without a size comes out at about 1024x1024), their most steps, CFG if any row uses
        it. A family that takes condition images (Qwen-Image-2.1) reads a row's images as those, not as edits."""
        name = family.name if family is not None else DEFAULT_FAMILY
        conditions = bool(family_costs(name).CONDITION_IMAGE_TOKENS)
        largest = max(requests, key=lambda r: (r.width or 1024) * (r.height or 1024), default=None)
        return cls(
            input_images=max((len(r.images) for r in requests), default=1) or 1,
            width=(largest.width if largest else None) or 1024,
            height=(largest.height if largest else None) or 1024,
            steps=max((r.num_inference_steps for r in requests), default=50),
            true_cfg=any(r.uses_cfg for r in requests) or not requests,
            task=GENERATE if conditions else task,
            batch_size=batch_size,
            compile=compile,
            weights=weights,
            adapters=any(r.loras for r in requests),
            control_images=max((len(getattr(r, "controls", ())) for r in requests), default=0),
            controlnet_layers=controlnet_layers if any(getattr(r, "controls", ()) for r in requests) else 0,
            first_block_cache=any(
                isinstance(parse_step_cache(getattr(r, "step_cache", None)), FirstBlock) for r in requests
            ),
            condition_images=max((len(r.images) for r in requests), default=0) if conditions else 0,
            family=name,
        )

    @property
    def controlnet_bytes(self) -> int:
        """The ControlNet's bf16 weights: its blocks (copies of the transformer's), one output linear each,
        and embedders as the transformer's."""
        return self.controlnet_gpu_bytes(BF16)

    def controlnet_gpu_bytes(self, mode: str) -> int:
        """The ControlNet's bytes on the GPU when the transformer runs in `mode`: it is placed as the
        transformer is (`ControlNetSource.load`): its block linears in fp8 under fp8 (the image MLP's last one
        kept), streamed a block at a time under the offload modes, bf16 otherwise (a GGUF file is the
        transformer's alone)."""
        layers, costs = self.controlnet_layers, self.costs
        if not layers:
            return 0
        outside = (
            costs.DIT_OUTSIDE_BLOCKS_PARAMS + layers * costs.DIT_HIDDEN**2
        )  # embedders, and one output linear a block
        if mode == FP8:
            kept = layers * costs.DIT_FP8_KEPT_BF16_PARAMS // costs.DIT_BLOCKS
            fp8 = layers * costs.DIT_BLOCK_PARAMS - kept
            return fp8 + 2 * (outside + kept)
        if mode in (OFFLOAD, FP8_OFFLOAD):
            return 2 * (outside + min(layers, OFFLOAD_BLOCKS_ON_GPU) * costs.DIT_BLOCK_PARAMS)
        if mode == SEQUENTIAL:
            return 0
        return 2 * (outside + layers * costs.DIT_BLOCK_PARAMS)

    def controlnet_residual_bytes(self, batch: int) -> int:
        """The ControlNet's residuals, held through the transformer's forward: one per ControlNet block, the
        image stream's size, for the batch's rows (each row's scaled sum), and again for both CFG halves where
        the forward runs them joint (`denoise.blocks._for_rows` concatenates the copies). Measured on an H200 (fp8,
        batch 4, CFG, 1024x1024, bench/results/conditions_h200.jsonl, controlnet-fp8): the ControlNet's fp8 weights
        (1.9 GB) left 1.4 GiB of the denoise peak unexplained; these residuals are 1.4 GiB there."""
        if not self.controlnet_layers:
            return 0
        rows = batch + (batch * self.rows_per_image if self.rows_per_image > 1 else 0)
        return self.controlnet_layers * rows * self.image_tokens * self.costs.DIT_HIDDEN * 2

    @property
    def image_tokens(self) -> int:
        tokens = (self.width // 16) * (self.height // 16)
        # An edit's input images' latents ride along, each about the output's size (the pipelines resize
        # every input to about the output's area): 8,192 tokens for Edit at 1024x1024, 12,288 for Edit-Plus
        # with two inputs (measured, docs/benchmarks.md).
        return (1 + self.input_images) * tokens if self.task == EDIT else tokens

    @property
    def prefix_tokens(self) -> int:
        """What precedes a row's image in its sequence: its text, and its condition images' latent tokens (2.1
        caches their keys and values after the first step; Qwen-Image runs the text at every step)."""
        return self.text_tokens + self.condition_images * self.costs.CONDITION_IMAGE_TOKENS

    @property
    def tokens(self) -> int:
        edit = self.costs.EDIT_IMAGE_TEXT_TOKENS if self.task == EDIT else 0
        return self.image_tokens + self.prefix_tokens + edit

    @property
    def rows_per_image(self) -> int:
        return 2 if self.true_cfg else 1  # conditional and unconditional rows share one forward


@dataclass(frozen=True)
class StagePlan:
    stage: str  # "encode" or "denoise"
    mode: str  # bf16, fp8, gguf, offload, fp8-offload or sequential
    how: str  # what the mode does here, in words
    batch_size: int
    peak_gpu_gib: float
    host_gib: float
    seconds_per_image: tuple[float, float]  # encode: seconds per prompt
    seconds_per_image_pcie4: tuple[float, float] | None = None  # offload modes, at PCIe 4.0 x16
    vae_tiling: bool = False
    notes: list[str] = field(default_factory=list)
    pinned_gib: float | None = None  # offload modes: host RAM pinned for the weights that stream
    streamed_from_disk_gib: float = 0.0  # offload modes: what is read back from the checkpoint every step


@dataclass(frozen=True)
class MemoryPlan:
    machine: Machine
    job: Workload
    encode: StagePlan
    denoise: StagePlan

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def host_gib(self) -> float:
        """The run's host RAM at its peak: the larger stage (they never overlap)."""
        return max(self.encode.host_gib, self.denoise.host_gib)

    def report(self) -> str:
        machine = self.machine
        gpu = f"{machine.gpu_gib:.0f} GiB GPU" + (f" ({machine.gpu_name})" if machine.gpu_name else "")
        lines = [
            f"plan for {gpu}, {machine.host_gib:.0f} GiB host RAM; {self.job.task} {self.job.width}x"
            f"{self.job.height}, {self.job.steps} steps, true CFG {'on' if self.job.true_cfg else 'off'}; "
            f"transformer: {self.job.weights.label}",
        ]
        for stage in (self.encode, self.denoise):
            unit = "s/prompt" if stage.stage == "encode" else "s/image"
            low, high = stage.seconds_per_image
            lines += [
                f"  {stage.stage}: {stage.mode} ({stage.how})",
                f"    batch size {stage.batch_size}, peak GPU about {stage.peak_gpu_gib:.1f} GiB, "
                f"host RAM about {stage.host_gib:.0f} GiB",
                f"    {low:.2f}-{high:.2f} {unit} on an H100"
                + (
                    f"; {stage.seconds_per_image_pcie4[0]:.1f}-{stage.seconds_per_image_pcie4[1]:.1f} {unit} "
                    "over PCIe 4.0 x16"
                    if stage.seconds_per_image_pcie4
                    else ""
                ),
            ]
            lines += [f"    note: {note}" for note in stage.notes]
        return "\n".join(lines)


# --- Arithmetic ---------------------------------------------------------------------------------------


def forward_flops(tokens: int, costs: ModuleType = COSTS, pairs: float | None = None) -> float:
    """One transformer forward of one sample row over `tokens` tokens: the blocks' linears, and attention over
    `pairs` query-key pairs (every pair, `tokens**2`, unless given)."""
    pairs = tokens**2 if pairs is None else pairs
    linears = 2 * costs.DIT_LINEAR_PARAMS_PER_TOKEN * tokens * costs.DIT_BLOCKS
    return linears + 4 * pairs * costs.DIT_HIDDEN * costs.DIT_BLOCKS


def row_forward_flops(job: Workload) -> float:
    """One sample row's forward, on average over the job's steps. With a prefix KV cache (Qwen-Image-2.1) the
    first step runs the row's whole sequence (its prefix attends block-causally: about half of its pairs), and
    every later step only the image tokens, attending to the cached prefix and to themselves."""
    costs = job.costs
    if not costs.PREFIX_KV_BYTES_PER_TOKEN:
        return forward_flops(job.tokens, costs)
    image, prefix = job.image_tokens, job.prefix_tokens
    first = forward_flops(image + prefix, costs, pairs=prefix**2 / 2 + image * (prefix + image))
    later = forward_flops(image, costs, pairs=image * (prefix + image))
    steps = max(job.steps, 1)
    return (first + (steps - 1) * later) / steps


def streamed_bytes(mode: str, weights: WeightsSummary, costs: ModuleType = COSTS) -> tuple[int, int]:
    """What a streaming mode moves to the GPU at every step: (all of it, one block of it)."""
    if mode == FP8_OFFLOAD:
        total = (
            costs.DIT_BLOCKS * costs.DIT_BLOCK_PARAMS + costs.DIT_FP8_KEPT_BF16_PARAMS + costs.DIT_FP8_SCALE_BYTES // 2
        )
        return total, total // costs.DIT_BLOCKS
    return weights.nbytes - 2 * costs.DIT_OUTSIDE_BLOCKS_PARAMS, weights.block_nbytes


def dit_weight_bytes(
    mode: str, fp8_compute: bool = True, weights: WeightsSummary | None = None, costs: ModuleType = COSTS
) -> int:
    """Transformer bytes resident on the GPU in `mode` (for streaming modes: what is there at a time)."""
    weights = weights or WeightsSummary.published(costs)
    outside = 2 * costs.DIT_OUTSIDE_BLOCKS_PARAMS
    if mode == BF16:
        return costs.DIT_PARAMS * 2
    if mode == FP8:
        if weights.kind == FP8_WEIGHTS:  # the file's fp8 weights as stored, with one scale per row
            return weights.nbytes + costs.DIT_FP8_SCALE_BYTES
        fp8 = costs.DIT_BLOCKS * costs.DIT_BLOCK_PARAMS - costs.DIT_FP8_KEPT_BF16_PARAMS
        return fp8 + 2 * (costs.DIT_PARAMS - fp8) + (costs.DIT_FP8_SCALE_BYTES if fp8_compute else 0)
    if mode == GGUF:  # quantized bytes, and one layer dequantized at a time
        return weights.nbytes + costs.DIT_LARGEST_LINEAR_BYTES
    if mode in (OFFLOAD, FP8_OFFLOAD):
        _, block = streamed_bytes(mode, weights, costs)
        dequantized = costs.DIT_LARGEST_LINEAR_BYTES if mode == FP8_OFFLOAD or weights.kind != FLOAT_WEIGHTS else 0
        return outside + OFFLOAD_BLOCKS_ON_GPU * block + dequantized
    if mode == SEQUENTIAL:
        return costs.SEQUENTIAL_GPU_WEIGHT_BYTES
    raise ValueError(mode)


def vae_decode_bytes(job: Workload, tiled: bool) -> int:
    costs = job.costs
    return costs.VAE_TILED_DECODE_BYTES if tiled else costs.VAE_DECODE_BYTES_PER_PIXEL * job.width * job.height


def denoise_peak_gib(mode: str, batch: int, job: Workload, tiled: bool, fp8_compute: bool = True) -> float:
    """Peak allocator memory of the denoise stage: weights plus the larger of the step loop's
    activations and one image's VAE decode (they never coincide), plus the allocator's own."""
    costs = job.costs
    rows = batch * job.rows_per_image
    if costs.PREFIX_KV_BYTES_PER_TOKEN:
        # The first step runs each forward row alone over its whole sequence and caches its prefix's keys and
        # values; every later step runs all rows over their image tokens, each attending to its cached prefix
        # (concatenated with its own keys and values, a block at a time). The caches live until the batch's
        # images are decoded.
        first = job.tokens * costs.DIT_ACTIVATION_BYTES_PER_ROW_TOKEN
        later = rows * (
            job.image_tokens * costs.DIT_ACTIVATION_BYTES_PER_ROW_TOKEN
            + job.prefix_tokens * costs.PREFIX_ATTENTION_BYTES_PER_ROW_TOKEN
        )
        activations = max(first, later)
        prefix_cache = rows * job.prefix_tokens * costs.PREFIX_KV_BYTES_PER_TOKEN * costs.PREFIX_KV_COPIES
    else:
        activations, prefix_cache = rows * job.tokens * costs.DIT_ACTIVATION_BYTES_PER_ROW_TOKEN, 0
    state = rows * job.image_tokens * costs.FIRST_BLOCK_STATE_BYTES_PER_ROW_TOKEN if job.first_block_cache else 0
    forward = activations + job.controlnet_residual_bytes(batch)  # the residuals live through the forward
    working = max(forward, vae_decode_bytes(job, tiled)) + 2 * costs.VAE_PARAMS + state + prefix_cache
    weights = dit_weight_bytes(mode, fp8_compute, job.weights, costs) + job.controlnet_gpu_bytes(mode)
    total = weights + working + ALLOCATOR_OVERHEAD_BYTES
    return total * (1 + ALLOCATOR_OVERHEAD_FRACTION) / GiB


def encoder_weight_bytes(mode: str, costs: ModuleType = COSTS) -> int:
    kept = costs.ENCODER_PARAMS - costs.ENCODER_LM_HEAD_PARAMS
    if mode == BF16:
        return kept * 2
    if mode == FP8:
        # Layerwise casting: linears in fp8, the embedding table and norms in bf16.
        return (kept - costs.ENCODER_EMBED_PARAMS) + 2 * costs.ENCODER_EMBED_PARAMS
    if mode == OFFLOAD:
        return 3 * costs.ENCODER_EMBED_PARAMS * 2  # leaf-level: the largest leaves, current and prefetched
    raise ValueError(mode)


def encode_peak_gib(mode: str, batch: int, job: Workload) -> float:
    costs = job.costs
    # Encoding sorts texts by length, so the worst batch is `batch` texts at the token limit; a prompt with
    # condition images (2.1) is encoded alone with them, each adding its vision tokens.
    tokens = batch * (costs.MAX_TEXT_TOKENS + (costs.EDIT_IMAGE_TEXT_TOKENS if job.task == EDIT else 0))
    if job.condition_images:
        tokens = max(tokens, costs.MAX_TEXT_TOKENS + job.condition_images * costs.EDIT_IMAGE_TEXT_TOKENS)
    activations = tokens * costs.ENCODER_ACTIVATION_BYTES_PER_TOKEN
    if job.condition_images:  # their latents are encoded first, by the VAE beside the encoder
        activations = max(activations, costs.CONDITION_IMAGE_ENCODE_BYTES)
    vision = GiB if job.task == EDIT or job.condition_images else 0
    total = (
        encoder_weight_bytes(mode, costs)
        + activations
        + vision
        + costs.ENCODE_STAGE_VAE_BYTES
        + ALLOCATOR_OVERHEAD_BYTES
    )
    return total * (1 + ALLOCATOR_OVERHEAD_FRACTION) / GiB


@dataclass(frozen=True)
class HostStreaming:
    """How a streaming mode's weights sit in host memory: pinned, and read back from disk every step."""

    pinned: int  # bytes in the pinned arena
    from_disk: int  # bytes re-read from the checkpoint at every step
    host_gib: float  # the process's host RAM with it

    def transfer_seconds(self, machine: Machine, link_gbps: float) -> float:
        return self.pinned / (link_gbps * 1e9) + self.from_disk / (machine.disk_gbps * 1e9)


def host_streaming(
    mode: str, machine: Machine, weights: WeightsSummary, costs: ModuleType = COSTS
) -> HostStreaming | None:
    """Pin what the host can spare of what streams, read the rest from disk; None when even that does not
    fit (fp8-offload keeps all of its fp8 copy in host memory: it exists nowhere else)."""
    total, block = streamed_bytes(mode, weights, costs)
    fixed = HOST_BASE_GIB + costs.DIT_LOAD_GIB + PINNED_SLAB_GIB
    staging = STAGING_BLOCKS * block * PINNED_ROUNDING / GiB
    spare = machine.host_usable_gib - fixed
    if total / GiB <= spare:
        return HostStreaming(total, 0, fixed + total / GiB)
    if mode == FP8_OFFLOAD or spare - staging <= 0:
        return None
    pinned = int((spare - staging) * GiB)
    return HostStreaming(pinned, total - pinned, fixed + staging + pinned / GiB)


def denoise_host_gib(
    mode: str, machine: Machine | None = None, weights: WeightsSummary | None = None, costs: ModuleType = COSTS
) -> float | None:
    """Host RAM of the denoise stage in `mode`; None when it cannot fit this host at all."""
    weights = weights or WeightsSummary.published(costs)
    if mode in (OFFLOAD, FP8_OFFLOAD):
        machine = machine or Machine(gpu_gib=None, host_gib=1e6)
        streaming = host_streaming(mode, machine, weights, costs)
        return None if streaming is None else streaming.host_gib
    return HOST_BASE_GIB + costs.DIT_LOAD_GIB


def encode_host_gib(mode: str = BF16, machine: Machine | None = None, costs: ModuleType = COSTS) -> float | None:
    """Host RAM of the encode stage: resident modes load through the GPU; offload pins what it can."""
    if mode == BF16:
        return HOST_BASE_GIB + costs.ENCODER_LOAD_GIB
    if mode == FP8:
        return HOST_BASE_GIB + costs.ENCODER_MAPPED_LOAD_GIB
    machine = machine or Machine(gpu_gib=None, host_gib=1e6)
    weights = (costs.ENCODER_PARAMS - costs.ENCODER_LM_HEAD_PARAMS) * 2 / GiB
    spare = machine.host_usable_gib - HOST_BASE_GIB - costs.DIT_LOAD_GIB
    return HOST_BASE_GIB + costs.DIT_LOAD_GIB + min(weights, max(spare, 0.0))


def dit_compute_seconds(mode: str, rows: int, job: Workload, machine: Machine) -> float:
    """GPU seconds of one forward of `rows` sample rows, and of dequantizing the weights where a mode does."""
    costs = job.costs
    scale = row_forward_flops(job) / forward_flops(costs.REFERENCE_TOKENS, costs)
    kind = job.weights.kind
    if mode == BF16:
        return rows * costs.FORWARD_SECONDS[(BF16, job.compile)] * scale
    if mode == FP8:
        if machine.fp8_compute:
            overhead = 0.0 if job.compile else costs.FP8_EAGER_SECONDS_PER_FORWARD
            return rows * costs.FORWARD_SECONDS[(FP8, job.compile)] * scale + overhead
        if kind == FP8_WEIGHTS:  # the file's fp8 upcast as used (torchao weight-only)
            return (
                rows * costs.FORWARD_SECONDS[(BF16, job.compile)] * scale
                + costs.DEQUANT_SECONDS_PER_FORWARD[FP8_WEIGHTS]
            )
        return rows * costs.FORWARD_SECONDS[("fp8-storage", job.compile)] * scale
    eager = rows * costs.FORWARD_SECONDS[(BF16, False)] * scale
    if mode == GGUF or (mode == OFFLOAD and kind == GGUF_WEIGHTS):
        return eager + costs.DEQUANT_SECONDS_PER_FORWARD[GGUF_WEIGHTS]
    if mode == FP8_OFFLOAD or (mode == OFFLOAD and kind == FP8_WEIGHTS):
        return eager + costs.DEQUANT_SECONDS_PER_FORWARD[FP8_WEIGHTS]
    return eager


def denoise_seconds_per_image(mode: str, batch: int, job: Workload, machine: Machine, link_gbps: float) -> float:
    costs = job.costs
    rows = batch * job.rows_per_image
    compute = dit_compute_seconds(mode, rows, job, machine)
    # ControlNet rows: its blocks run in bf16 on the conditional rows, once per control image and step.
    control = (
        job.control_images * batch * costs.FORWARD_SECONDS[(BF16, False)] * job.controlnet_layers / costs.DIT_BLOCKS
    )
    if mode in (BF16, FP8, GGUF):
        # Weights where they lie (bf16, fp8 matmuls): a CFG batch's halves run as two forwards (each half at
        # its own text length; denoise.text.CFG_LAYOUT), so what a forward costs whatever its rows
        # (eager fp8's quantization) is paid twice a step.
        if mode == BF16 or (mode == FP8 and machine.fp8_compute):
            halves = job.rows_per_image
            compute = halves * dit_compute_seconds(mode, rows // halves, job, machine)
        return job.steps * (compute + control) / batch
    if mode in (OFFLOAD, FP8_OFFLOAD):
        # Each step streams every block once for the whole batch; pinned copies overlap the compute, reads
        # from disk hold the host thread that feeds the GPU.
        streaming = host_streaming(mode, machine, job.weights, costs)
        transfer = streaming.transfer_seconds(machine, link_gbps) if streaming else math.inf
        return job.steps * (max(transfer, compute) + control) / batch
    transfer = costs.SEQUENTIAL_SECONDS_PER_FORWARD * H100_HOST_LINK_GBPS / link_gbps
    return job.steps * (max(transfer, compute) + control) / batch


def _band(seconds: float) -> tuple[float, float]:
    return round(seconds * SPEED_BAND[0], 2), round(seconds * SPEED_BAND[1], 2)


# --- Choices ------------------------------------------------------------------------------------------


def _largest_batch(peak, usable: float, limit: int) -> int:
    """The largest batch in 1..limit whose peak fits `usable` GiB, 0 if none."""
    return max((batch for batch in range(1, limit + 1) if peak(batch) <= usable), default=0)


def _fit(candidate: str, machine: Machine, job: Workload) -> tuple[StagePlan | None, str]:
    """The plan for one mode, or why it does not fit."""
    usable = machine.usable_gib
    for tiled in (False, True) if candidate != BF16 else (False,):

        def peak(batch: int, tiled: bool = tiled) -> float:
            return denoise_peak_gib(candidate, batch, job, tiled, machine.fp8_compute)

        # Resident modes gain little past 4 images a batch; streaming modes raise the batch so that one
        # pass over the weights serves more images (until the copies hide behind the compute).
        resident = candidate in (BF16, FP8, GGUF)
        limit = job.batch_size or (4 if resident else _offload_batch_limit(candidate, job, machine))
        batch = job.batch_size if job.batch_size and peak(job.batch_size) <= usable else 0
        if not job.batch_size:
            batch = _largest_batch(peak, usable, limit)
        if batch:
            break
    if not batch:
        needed = peak(job.batch_size or 1)
        return None, f"{candidate} needs about {needed:.1f} GiB of GPU memory at batch {job.batch_size or 1}"
    host = denoise_host_gib(candidate, machine, job.weights, job.costs)
    if host is None or host > machine.host_usable_gib:
        streamed = streamed_bytes(candidate, job.weights, job.costs)[0]
        needed = host or (HOST_BASE_GIB + job.costs.DIT_LOAD_GIB + streamed / GiB)
        return None, f"{candidate} needs about {needed:.0f} GiB of host RAM; this machine has {machine.host_gib:.0f}"
    return _denoise_stage(candidate, batch, tiled, job, machine), ""


def check_mode_for_weights(mode: str, weights: WeightsSummary) -> tuple[str, ...]:
    """The modes open to these transformer weights; ConfigError if `mode` is not one of them (fp8 or GGUF
    files carry their own quantization: no bf16 mode to run them in)."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"--memory-mode {mode!r}: use one of {', '.join(MEMORY_MODES)}")
    open_modes = MODES_FOR[weights.kind]
    if mode != AUTO and mode not in open_modes:
        raise ConfigError(
            f"--memory-mode {mode}: the transformer's weights are {weights.kind} ({weights.label}); with them use "
            f"auto, {', '.join(open_modes)}"
        )
    return open_modes


def plan_denoise(machine: Machine, job: Workload, mode: str = AUTO) -> StagePlan:
    """The first resident mode that fits (lossless first), else the fastest streaming one."""
    kind, costs = job.weights.kind, job.costs
    check_mode_for_weights(mode, job.weights)
    if mode == FP8_OFFLOAD and job.adapters:
        raise ConfigError(
            "rows with LoRA adapters cannot run with --memory-mode fp8-offload (its fp8 copy of the weights cannot "
            "take a fuse): use --memory-mode offload or auto"
        )
    candidates = MODES_FOR[kind] if mode == AUTO else (mode,)
    candidates = tuple(c for c in candidates if not (job.adapters and c == FP8_OFFLOAD))
    tried: list[str] = []
    streaming: list[StagePlan] = []
    for candidate in candidates:
        plan, refused = _fit(candidate, machine, job)
        if plan is None:
            tried.append(refused)
        elif candidate not in STREAMING_MODES:
            return plan
        else:
            streaming.append(plan)
    if streaming:
        chosen = _fastest_streaming(streaming)
        if mode == AUTO and kind == FLOAT_WEIGHTS and chosen.streamed_from_disk_gib:
            hint = _suggestion(machine, job, faster_than=chosen.seconds_per_image[0])
            chosen = replace(chosen, notes=[*chosen.notes, hint.strip()] if hint else chosen.notes)
        return chosen
    gpu = "no CUDA GPU" if machine.gpu_gib is None else f"a {machine.gpu_gib:.0f} GiB GPU"
    hint = _suggestion(machine, job) if mode == AUTO and kind == FLOAT_WEIGHTS else ""
    raise DoesNotFitError(
        f"{costs.MODEL_NAME}'s denoise stage does not fit {gpu} with {machine.host_gib:.0f} GiB of host RAM: "
        + "; ".join(tried)
        + (". Try a smaller --batch-size or --memory-mode auto" if job.batch_size or mode != AUTO else "")
        + "."
        + hint
    )


def _fastest_streaming(plans: list[StagePlan]) -> StagePlan:
    """The fastest streaming plan; a lossless one when it is within 5% of the fastest (sequential only when
    nothing else fits)."""
    usable = [plan for plan in plans if plan.mode != SEQUENTIAL] or plans
    fastest = min(usable, key=lambda plan: plan.seconds_per_image[0])
    exact = [plan for plan in usable if LOSSLESS[plan.mode]]
    best_exact = min(exact, key=lambda plan: plan.seconds_per_image[0], default=None)
    if best_exact is not None and best_exact.seconds_per_image[0] <= 1.05 * fastest.seconds_per_image[0]:
        return best_exact
    return fastest


def _suggestion(machine: Machine, job: Workload, faster_than: float | None = None) -> str:
    """When the model's own weights do not fit (or only streaming from disk): the largest GGUF file that
    would run, and how fast (only if it is at least 1.5x faster than `faster_than`)."""
    for quant in job.costs.GGUF_FILE_GB:  # largest (best quality) first; none known: no suggestion
        trial = replace(job, weights=WeightsSummary.gguf_file(quant, job.costs))
        try:
            plan = plan_denoise(machine, trial)
        except ConfigError:
            continue
        low, high = plan.seconds_per_image
        if plan.streamed_from_disk_gib or (faster_than is not None and 1.5 * low > faster_than):
            continue
        return (
            f" A quantized transformer file fits better: {trial.weights.label} (city96's Qwen-Image GGUF files) runs "
            f"{plan.mode} here at about {low:.0f}-{high:.0f} s per image (--transformer FILE.gguf; images differ "
            "from bf16's)."
        )
    return ""


def _offload_batch_limit(mode: str, job: Workload, machine: Machine) -> int:
    """Enough images per batch that computing one step takes as long as streaming the weights once
    (at this host link, and at PCIe 4.0, with what must come from disk), at most 8."""
    per_image = dit_compute_seconds(mode, job.rows_per_image, job, machine)
    streaming = host_streaming(mode, machine, job.weights, job.costs)
    if streaming is None:
        return 1
    transfer = streaming.transfer_seconds(machine, min(machine.host_link_gbps, PCIE4_HOST_LINK_GBPS))
    return max(1, min(8, math.ceil(transfer / per_image)))


def _denoise_stage(mode: str, batch: int, tiled: bool, job: Workload, machine: Machine) -> StagePlan:
    weights = job.weights
    stored = "fp8 as stored in the file" if weights.kind == FP8_WEIGHTS else ""
    # What fp8 leaves in bf16 (placement.FP8_KEPT_BF16): Qwen-Image keeps one linear of each block too.
    kept = (
        "img_mlp's last linear and the embedders"
        if job.costs.DIT_FP8_KEPT_BF16_PARAMS
        else "the layers outside the blocks (embedders, modulation, output)"
    )
    how = {
        BF16: "transformer resident in bf16",
        FP8: (
            f"transformer {stored or 'linears in fp8'} through torchao (dynamic activation, per-row scales)"
            + ("" if stored else f", {kept} in bf16")
            if machine.fp8_compute
            else f"transformer {stored or 'linears stored in fp8'}, computed in bf16 ("
            + ("upcast layer by layer" if stored else "layerwise casting")
            + "; this GPU has no fp8 matmuls)"
            + ("" if stored else f", {kept} in bf16")
        ),
        GGUF: f"transformer {weights.label} resident, dequantized layer by layer as it runs",
        OFFLOAD: f"transformer ({'bf16' if weights.kind == FLOAT_WEIGHTS else weights.label}) streamed to the "
        "GPU block by block on a side stream (diffusers group offload), one pass over the weights per step for "
        "the whole batch",
        FP8_OFFLOAD: "transformer linears quantized once to fp8 (per-row scales) and streamed to the GPU block by "
        "block, computed in bf16: half the bytes of offload, one pass per step for the whole batch",
        SEQUENTIAL: "every layer copied to the GPU when it runs (accelerate sequential CPU offload)",
    }[mode]
    notes = []
    if tiled:
        notes.append("the VAE decodes in tiles (an untiled decode would not fit); seams may differ slightly")
    if mode == FP8 and not job.compile and machine.fp8_compute:
        notes.append("fp8 without compile is slower than bf16: leave compile on")
    pinned_gib, from_disk_gib = None, 0.0
    if mode in (OFFLOAD, FP8_OFFLOAD):
        streaming = host_streaming(mode, machine, weights, job.costs)
        pinned_gib, from_disk_gib = streaming.pinned / GiB, streaming.from_disk / GiB
        if streaming.from_disk:
            notes.append(
                f"host RAM pins {pinned_gib:.1f} GiB of the {(streaming.pinned + streaming.from_disk) / GiB:.1f} GiB "
                f"that stream; the other {from_disk_gib:.1f} GiB are read back from the checkpoint file at every "
                f"step, at about {machine.disk_gbps:g} GB/s (--disk-gbps): more RAM, or a smaller file, is faster"
            )
        else:
            notes.append(f"pins {pinned_gib:.1f} GiB of host RAM for the weights that stream (nothing read from disk)")
    seconds = denoise_seconds_per_image(mode, batch, job, machine, machine.host_link_gbps)
    pcie4 = None
    if mode in STREAMING_MODES:
        pcie4 = _band(denoise_seconds_per_image(mode, batch, job, machine, PCIE4_HOST_LINK_GBPS))
    return StagePlan(
        stage="denoise",
        mode=mode,
        how=how,
        batch_size=batch,
        peak_gpu_gib=round(denoise_peak_gib(mode, batch, job, tiled, machine.fp8_compute), 1),
        host_gib=round(denoise_host_gib(mode, machine, weights, job.costs), 1),
        seconds_per_image=_band(seconds),
        seconds_per_image_pcie4=pcie4,
        vae_tiling=tiled,
        notes=notes,
        pinned_gib=None if pinned_gib is None else round(pinned_gib, 2),
        streamed_from_disk_gib=round(from_disk_gib, 1),
    )


def plan_encode(machine: Machine, job: Workload, mode: str = AUTO, batch_size: int = 16) -> StagePlan:
    """The text encoder picks its own mode: bf16 when it fits, else fp8 storage, else offload."""
    usable, costs = machine.usable_gib, job.costs
    candidates = (BF16, FP8, OFFLOAD) if mode in (AUTO, SEQUENTIAL, GGUF, FP8_OFFLOAD) else (mode,)
    tried = []
    for candidate in candidates:
        batch = _largest_batch(lambda b, c=candidate: encode_peak_gib(c, b, job), usable, batch_size)
        if not batch:
            tried.append(f"{candidate} needs about {encode_peak_gib(candidate, 1, job):.1f} GiB of GPU memory")
            continue
        host = encode_host_gib(candidate, machine, costs)
        if host > machine.host_usable_gib:
            tried.append(f"{candidate} needs about {host:.0f} GiB of host RAM; this machine has {machine.host_gib:.0f}")
            continue
        how = {
            BF16: "text encoder loaded straight to the GPU in bf16",
            FP8: "text encoder linears stored in fp8, computed in bf16 (layerwise casting), cast layer by layer "
            "on the GPU as it loads",
            OFFLOAD: "text encoder streamed from host RAM layer by layer (group offload)",
        }[candidate]
        seconds = costs.ENCODE_SECONDS_PER_PROMPT * (1.5 if candidate == FP8 else 1.0)
        notes = []
        if candidate == OFFLOAD:
            weights = (costs.ENCODER_PARAMS - costs.ENCODER_LM_HEAD_PARAMS) * 2
            pinned = (host - HOST_BASE_GIB - costs.DIT_LOAD_GIB) * GiB
            from_disk = max(0.0, weights - pinned)
            seconds = max(
                seconds, (pinned / (machine.host_link_gbps * 1e9) + from_disk / (machine.disk_gbps * 1e9)) / batch
            )
            if from_disk:
                notes.append(
                    f"{from_disk / GiB:.1f} GiB of the encoder are read back from disk for every batch of prompts"
                )
        return StagePlan(
            stage="encode",
            mode=candidate,
            how=how,
            batch_size=batch,
            peak_gpu_gib=round(encode_peak_gib(candidate, batch, job), 1),
            host_gib=round(host, 1),
            seconds_per_image=_band(seconds),
            notes=notes,
        )
    raise DoesNotFitError(
        f"the text encoder does not fit a {machine.gpu_gib:.0f} GiB GPU with {machine.host_gib:.0f} GiB of "
        "host RAM: " + "; ".join(tried)
    )


def plan_memory(machine: Machine, job: Workload, mode: str = AUTO, encode_batch_size: int = 16) -> MemoryPlan:
    """Both stages' plans, or DoesNotFitError saying why nothing fits. `mode` applies to the
    transformer; the text encoder chooses its own unless `mode` forces one it can use."""
    check_mode_for_weights(mode, job.weights)
    if job.task not in TASKS:
        raise ConfigError(f"--task {job.task!r}: use one of {', '.join(TASKS)}")
    if job.batch_size is not None and job.batch_size < 1:
        raise ConfigError(f"--batch-size {job.batch_size}: use 1 or more")
    if machine.gpu_gib is None:
        raise DoesNotFitError(
            "no CUDA GPU: the memory modes plan for a GPU; pass --gpu-memory GiB to plan for one, "
            "or run on the CPU with the tiny model"
        )
    denoise = plan_denoise(machine, job, mode)
    encode = plan_encode(machine, job, mode if mode in (BF16, FP8, OFFLOAD) else AUTO, encode_batch_size)
    return MemoryPlan(machine=machine, job=job, encode=encode, denoise=denoise)


# --- This machine -------------------------------------------------------------------------------------


def host_memory_gib() -> float:
    """Total RAM of this machine, or the memory limit of this process's cgroup when that is smaller (a
    container's or a Kubernetes pod's limit: going over it gets the process killed)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit()
    return min(total, limit if limit is not None else total) / GiB


def available_host_gib() -> float | None:
    """RAM this process can still take without the OOM killer stepping in: the kernel's MemAvailable, or what
    is left under its cgroup's limit when that is less. None where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    limit, used = cgroup_memory_limit(), _cgroup_memory_used()
    if limit is not None and used is not None:
        available = min(available if available is not None else limit, limit - used)
    return None if available is None else available / GiB


def _cgroup_memory_used() -> int | None:
    """What the cgroup holds that the kernel cannot simply drop: its usage less the inactive page cache (as
    `docker stats` counts it). A checkpoint just read fills the group's page cache up to its limit; those
    pages are reclaimed on demand and are no reason to warn of the OOM killer."""
    for candidate in _cgroup_files("memory.current", "memory.usage_in_bytes"):
        try:
            with open(candidate) as handle:
                used = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        folder, _, name = candidate.rpartition("/")
        inactive = "inactive_file" if name == "memory.current" else "total_inactive_file"
        return used - _stat_field(f"{folder}/memory.stat", inactive)
    return None


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path) as lines:
            for line in lines:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_files(v2_name: str, v1_name: str) -> list[str]:
    """Where this process's cgroup keeps a memory file: cgroup v2's `v2_name`, or v1's `v1_name`."""
    try:
        with open("/proc/self/cgroup") as lines:
            entries = [line.strip().split(":", 2) for line in lines if line.count(":") >= 2]
    except OSError:
        return []
    candidates = []
    for _, controllers, path in entries:
        if controllers == "":  # v2: one unified hierarchy
            candidates.append(f"/sys/fs/cgroup{path.rstrip('/')}/{v2_name}")
            candidates.append(f"/sys/fs/cgroup/{v2_name}")  # a namespaced view shows the process's own at the root
        elif "memory" in controllers.split(","):
            candidates.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/{v1_name}")
            candidates.append(f"/sys/fs/cgroup/memory/{v1_name}")
    return candidates


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (cgroup v2's memory.max, or v1's limit_in_bytes), None
    when there is none."""
    candidates = _cgroup_files("memory.max", "memory.limit_in_bytes")
    for candidate in candidates:
        try:
            with open(candidate) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < 2**60 else None  # v1 writes a huge number for "no limit"
    return None


GPU_MEMORY_ENV = "QWEN_BATCH_GPU_MEMORY_GIB"  # plan for less GPU memory than the card has (a shared GPU)
HOST_MEMORY_ENV = "QWEN_BATCH_HOST_MEMORY_GIB"  # plan for this much host RAM (a VM whose RAM grows on use)
DISK_SPEED_ENV = "QWEN_BATCH_DISK_GBPS"  # how fast weights read back from the checkpoint's disk


def env_number(name: str, unit: str) -> float | None:
    """A number from the environment variable `name` (None when unset); ConfigError naming it when not a number."""
    if not os.environ.get(name):
        return None
    try:
        return float(os.environ[name])
    except ValueError:
        raise ConfigError(f"{name}={os.environ[name]!r}: give {unit} as a number") from None


def detect_machine(
    device: str = "cuda", gpu_gib: float | None = None, host_gib: float | None = None, disk_gbps: float | None = None
) -> Machine:
    """The machine this process runs on; `gpu_gib`/`host_gib` (or $QWEN_BATCH_GPU_MEMORY_GIB and
    $QWEN_BATCH_HOST_MEMORY_GIB) override what is detected."""
    import torch

    gpu_gib = gpu_gib if gpu_gib is not None else env_number(GPU_MEMORY_ENV, "GiB")
    name, fp8 = "", True
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        name = properties.name
        fp8 = (properties.major, properties.minor) >= (8, 9)
        if gpu_gib is None:
            gpu_gib = properties.total_memory / GiB
    host_gib = host_gib if host_gib is not None else env_number(HOST_MEMORY_ENV, "GiB")
    disk_gbps = disk_gbps if disk_gbps is not None else env_number(DISK_SPEED_ENV, "GB/s")
    return Machine(
        gpu_gib=gpu_gib,
        host_gib=host_gib if host_gib is not None else host_memory_gib(),
        fp8_compute=fp8,
        gpu_name=name,
        disk_gbps=disk_gbps or DISK_GBPS,
    )
