"""Will it fit? Per stage: the memory mode, batch size, predicted peak GPU memory, host RAM and speed.

Pure arithmetic over Qwen-Image's sizes (counted from the published configs) and figures measured on
an H100 with full-size random weights (`bench/memory_tiers.py`, docs/memory.md). Nothing here imports
torch: `qwen-batch plan --gpu-memory 24 --host-memory 64` answers instantly on any machine;
`detect_machine` (separate, imports torch) reads the GPU and host this process runs on.

Peak GPU memory means what PyTorch's allocator holds at its peak (`torch.cuda.max_memory_allocated`);
a real card also spends some memory on the CUDA context, which `usable_gib` sets aside.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from qwen_batch.errors import ConfigError

GiB = 2**30
MEMORY_MODES = ("auto", "bf16", "fp8", "offload", "sequential")
TASKS = ("generate", "edit")

# --- The model (QwenImageTransformer2DModel and Qwen2.5-VL-7B, counted on the meta device) -------
DIT_PARAMS = 20_430_401_088
DIT_BLOCKS = 60
DIT_BLOCK_PARAMS = 339_831_296  # one QwenImageTransformerBlock
DIT_OUTSIDE_BLOCKS_PARAMS = DIT_PARAMS - DIT_BLOCKS * DIT_BLOCK_PARAMS  # embedders, norm_out, proj_out
# fp8 keeps in bf16 what is known to be sensitive: the last linear of the image MLP (`img_mlp.net.2`,
# as vLLM-Omni and SGLang do), and everything outside the 60 blocks (patch and text embedders, the
# timestep embedding, the output projection), which is 0.2% of the weights.
DIT_FP8_KEPT_BF16_PARAMS = DIT_BLOCKS * (3072 * 12288 + 3072)
ENCODER_PARAMS = 8_292_166_656  # language model 7.07 B, vision tower 0.68 B, lm_head 0.54 B
ENCODER_LM_HEAD_PARAMS = 544_997_376  # dropped when encoding: the pipeline reads hidden states only
ENCODER_EMBED_PARAMS = 544_997_376
VAE_PARAMS = 126_892_531
MAX_TEXT_TOKENS = 1024 + 34  # the pipeline's limit plus the chat-template tokens it drops afterwards
TYPICAL_TEXT_TOKENS = 256  # text tokens assumed for a denoise batch (prompt and negative padded alike)
EDIT_IMAGE_TEXT_TOKENS = 1400  # the vision tokens an edit's input image adds to the text (~1024x1024)

# --- Memory, measured (bench/qwen_image_gpu.py on an H100, bf16; docs/memory.md) ----------------------
# Activations of one transformer forward per sample row per token (image + text): the residual streams,
# q/k/v, the 4x MLP and its GELU, at the peak inside a block.
DIT_ACTIVATION_BYTES_PER_ROW_TOKEN = 110 * 1024
# VAE decode of one image, per output pixel; decoding goes one image at a time (VAE slicing).
VAE_DECODE_BYTES_PER_PIXEL = 4096
VAE_TILED_DECODE_BYTES = int(1.0 * GiB)  # 256-pixel tiles: independent of the image size
# Group offload keeps the blocks being computed, prefetched and not yet reclaimed on the GPU.
OFFLOAD_BLOCKS_ON_GPU = 3
# Sequential offload (accelerate) holds one leaf module at a time: the largest is a 3072x18432 linear.
SEQUENTIAL_GPU_WEIGHT_BYTES = 4 * 18432 * 3072 * 2
ENCODER_ACTIVATION_BYTES_PER_TOKEN = 400 * 1024  # 29 kept hidden states, the MLP, attention
ALLOCATOR_OVERHEAD_BYTES = int(0.5 * GiB)  # cuBLAS workspaces, rotary tables, latents, fragmentation
ALLOCATOR_OVERHEAD_FRACTION = 0.01
CUDA_CONTEXT_GIB = 0.6  # a real card's memory the allocator never sees
HOST_BASE_GIB = 4.0  # the Python process with torch, diffusers and CUDA loaded
# Pinned host memory comes from PyTorch's caching host allocator, which rounds every tensor up to a
# power of two: a block's 3072x3072 and 12288x3072 linears waste ~70%, the block ~50% overall.
PINNED_ROUNDING = 1.55
# Measured offload runs held 62-71 GiB of host RAM for the 38 GiB transformer: host caches, leftovers.
HOST_OFFLOAD_EXTRA_GIB = 8.0
HOST_MARGIN_FRACTION = 0.10  # keep this much of the host's RAM for the OS and page cache

# --- Speed, measured on an H100 80GB (1024x1024: 4096 image + 128 text tokens; docs/memory.md) ------
# Seconds per transformer forward per sample row, bench/results/qwen_image_gpu_h100.jsonl.
FORWARD_SECONDS = {
    ("bf16", False): 0.178,  # eager, 8 rows a forward (the recipe's 1-row forwards: 0.183)
    ("bf16", True): 0.139,  # regional torch.compile
    ("fp8", True): 0.118,  # torchao fp8 (dynamic activation, per-row scales), compiled, 2 rows a forward
    ("fp8", False): 0.221,  # torchao fp8 eager: the quantize kernels unfused, slower than bf16
    ("fp8-storage", False): 0.286,  # layerwise casting: fp8 weights upcast per layer (an earlier H100 run)
    ("fp8-storage", True): 0.286,
}
REFERENCE_TOKENS = 4096 + 128
H100_HOST_LINK_GBPS = 55.0  # pinned host-to-GPU copies, measured (PCIe 5.0 x16)
PCIE4_HOST_LINK_GBPS = 25.0  # PCIe 4.0 x16 in practice (32 GB/s on paper)
SEQUENTIAL_SECONDS_PER_FORWARD = 7.6  # accelerate sequential CPU offload, one forward, any batch
ENCODE_SECONDS_PER_PROMPT = 0.02
SPEED_BAND = (0.85, 1.25)  # the predicted seconds per image are a band: measured H100 figures +-


class DoesNotFitError(ConfigError):
    """No memory mode fits this GPU and host; the message says what is missing."""


@dataclass(frozen=True)
class Machine:
    """The GPU memory and host RAM to plan for (detected, or given with --gpu-memory/--host-memory)."""

    gpu_gib: float | None  # None: no CUDA GPU
    host_gib: float
    fp8_compute: bool = True  # compute capability >= 8.9 (Ada, Hopper, Blackwell): fp8 matmuls
    gpu_name: str = ""
    host_link_gbps: float = H100_HOST_LINK_GBPS

    @property
    def usable_gib(self) -> float:
        return 0.0 if self.gpu_gib is None else self.gpu_gib - CUDA_CONTEXT_GIB

    @property
    def host_usable_gib(self) -> float:
        return self.host_gib * (1 - HOST_MARGIN_FRACTION)


@dataclass(frozen=True)
class Job:
    """What one denoise batch looks like."""

    width: int = 1024
    height: int = 1024
    steps: int = 50
    true_cfg: bool = True
    task: str = "generate"
    batch_size: int | None = None  # None: chosen by the plan
    text_tokens: int = TYPICAL_TEXT_TOKENS
    compile: bool = True
    input_images: int = 1  # edits: input images per row (Edit-Plus takes several; each rides along as latents)

    @classmethod
    def for_requests(
        cls, requests: list, task: str = "generate", batch_size: int | None = None, compile: bool = True
    ) -> Job:
        """The job to plan for a set of manifest rows: their largest image (an edit row without a size
        comes out at about 1024x1024), their most steps, CFG if any row uses it."""
        largest = max(requests, key=lambda r: (r.width or 1024) * (r.height or 1024), default=None)
        return cls(
            input_images=max((len(r.images) for r in requests), default=1) or 1,
            width=(largest.width if largest else None) or 1024,
            height=(largest.height if largest else None) or 1024,
            steps=max((r.num_inference_steps for r in requests), default=50),
            true_cfg=any(r.uses_cfg for r in requests) or not requests,
            task=task,
            batch_size=batch_size,
            compile=compile,
        )

    @property
    def image_tokens(self) -> int:
        tokens = (self.width // 16) * (self.height // 16)
        # An edit's input images' latents ride along, each about the output's size (the pipelines resize
        # every input to about the output's area): 8,192 tokens for Edit at 1024x1024, 12,288 for Edit-Plus
        # with two inputs (measured, docs/benchmarks.md).
        return (1 + self.input_images) * tokens if self.task == "edit" else tokens

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens + (EDIT_IMAGE_TEXT_TOKENS if self.task == "edit" else 0)

    @property
    def rows_per_image(self) -> int:
        return 2 if self.true_cfg else 1  # conditional and unconditional rows share one forward


@dataclass(frozen=True)
class StagePlan:
    stage: str  # "encode" or "denoise"
    mode: str  # bf16, fp8, offload or sequential
    how: str  # what the mode does here, in words
    batch_size: int
    peak_gpu_gib: float
    host_gib: float
    seconds_per_image: tuple[float, float]  # encode: seconds per prompt
    seconds_per_image_pcie4: tuple[float, float] | None = None  # offload modes, at PCIe 4.0 x16
    vae_tiling: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemoryPlan:
    machine: Machine
    job: Job
    encode: StagePlan
    denoise: StagePlan

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        machine = self.machine
        gpu = f"{machine.gpu_gib:.0f} GiB GPU" + (f" ({machine.gpu_name})" if machine.gpu_name else "")
        lines = [
            f"plan for {gpu}, {machine.host_gib:.0f} GiB host RAM; {self.job.task} {self.job.width}x"
            f"{self.job.height}, {self.job.steps} steps, true CFG {'on' if self.job.true_cfg else 'off'}",
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


def forward_flops(tokens: int) -> float:
    """One transformer forward of one sample row: the 60 blocks' linears and attention."""
    return 2 * 12 * 3072**2 * tokens * DIT_BLOCKS + 4 * tokens**2 * 3072 * DIT_BLOCKS


def dit_weight_bytes(mode: str, fp8_compute: bool = True) -> int:
    """Transformer bytes resident on the GPU in `mode`."""
    if mode == "bf16":
        return DIT_PARAMS * 2
    if mode == "fp8":
        fp8 = DIT_BLOCKS * DIT_BLOCK_PARAMS - DIT_FP8_KEPT_BF16_PARAMS
        scales = DIT_BLOCKS * 4 * (2 * 18432 + 8 * 3072 + 2 * 12288 + 3072) if fp8_compute else 0
        return fp8 + 2 * (DIT_PARAMS - fp8) + scales
    if mode == "offload":
        return 2 * (DIT_OUTSIDE_BLOCKS_PARAMS + OFFLOAD_BLOCKS_ON_GPU * DIT_BLOCK_PARAMS)
    if mode == "sequential":
        return SEQUENTIAL_GPU_WEIGHT_BYTES
    raise ValueError(mode)


def vae_decode_bytes(job: Job, tiled: bool) -> int:
    return VAE_TILED_DECODE_BYTES if tiled else VAE_DECODE_BYTES_PER_PIXEL * job.width * job.height


def denoise_peak_gib(mode: str, batch: int, job: Job, tiled: bool, fp8_compute: bool = True) -> float:
    """Peak allocator memory of the denoise stage: weights plus the larger of the step loop's
    activations and one image's VAE decode (they never coincide), plus the allocator's own."""
    rows = batch * job.rows_per_image
    activations = rows * job.tokens * DIT_ACTIVATION_BYTES_PER_ROW_TOKEN
    working = max(activations, vae_decode_bytes(job, tiled)) + 2 * VAE_PARAMS
    total = dit_weight_bytes(mode, fp8_compute) + working + ALLOCATOR_OVERHEAD_BYTES
    return total * (1 + ALLOCATOR_OVERHEAD_FRACTION) / GiB


def encoder_weight_bytes(mode: str) -> int:
    kept = ENCODER_PARAMS - ENCODER_LM_HEAD_PARAMS
    if mode == "bf16":
        return kept * 2
    if mode == "fp8":
        # Layerwise casting: linears in fp8, the embedding table and norms in bf16.
        return (kept - ENCODER_EMBED_PARAMS) + 2 * ENCODER_EMBED_PARAMS
    if mode == "offload":
        return 3 * ENCODER_EMBED_PARAMS * 2  # leaf-level: the largest leaves, current and prefetched
    raise ValueError(mode)


def encode_peak_gib(mode: str, batch: int, job: Job) -> float:
    # Encoding sorts texts by length, so the worst batch is `batch` texts at the token limit.
    tokens = batch * (MAX_TEXT_TOKENS + (EDIT_IMAGE_TEXT_TOKENS if job.task == "edit" else 0))
    vision = GiB if job.task == "edit" else 0
    total = encoder_weight_bytes(mode) + tokens * ENCODER_ACTIVATION_BYTES_PER_TOKEN + vision + ALLOCATOR_OVERHEAD_BYTES
    return total * (1 + ALLOCATOR_OVERHEAD_FRACTION) / GiB


def denoise_seconds_per_image(mode: str, batch: int, job: Job, machine: Machine, link_gbps: float) -> float:
    scale = forward_flops(job.tokens) / forward_flops(REFERENCE_TOKENS)
    rows = batch * job.rows_per_image
    if mode in ("bf16", "fp8"):
        kind = "fp8" if mode == "fp8" and machine.fp8_compute else ("fp8-storage" if mode == "fp8" else "bf16")
        return job.steps * job.rows_per_image * FORWARD_SECONDS[(kind, job.compile)] * scale
    if mode == "offload":
        # Each step streams every block once for the whole batch; copies overlap the compute.
        transfer = DIT_PARAMS * 2 / (link_gbps * 1e9)
        compute = rows * FORWARD_SECONDS[("bf16", False)] * scale
        return job.steps * max(transfer, compute) / batch
    transfer = SEQUENTIAL_SECONDS_PER_FORWARD * H100_HOST_LINK_GBPS / link_gbps
    return job.steps * max(transfer, rows * FORWARD_SECONDS[("bf16", False)] * scale) / batch


def _band(seconds: float) -> tuple[float, float]:
    return round(seconds * SPEED_BAND[0], 2), round(seconds * SPEED_BAND[1], 2)


# --- Choices ------------------------------------------------------------------------------------------


def denoise_host_gib(mode: str) -> float:
    """Host RAM of the denoise stage. Every mode loads the bf16 transformer into host memory first
    (`from_pretrained`, then moved or quantized module by module); offload keeps it there, pinned."""
    if mode == "offload":
        return DIT_PARAMS * 2 * PINNED_ROUNDING / GiB + HOST_BASE_GIB + HOST_OFFLOAD_EXTRA_GIB
    return DIT_PARAMS * 2 / GiB + HOST_BASE_GIB


def encode_host_gib(mode: str = "bf16") -> float:
    pinned = PINNED_ROUNDING if mode == "offload" else 1.0
    return ENCODER_PARAMS * 2 * pinned / GiB + HOST_BASE_GIB


def _largest_batch(peak, usable: float, limit: int) -> int:
    """The largest batch in 1..limit whose peak fits `usable` GiB, 0 if none."""
    return max((batch for batch in range(1, limit + 1) if peak(batch) <= usable), default=0)


def plan_denoise(machine: Machine, job: Job, mode: str = "auto") -> StagePlan:
    usable = machine.usable_gib
    tried: list[str] = []
    candidates = ("bf16", "fp8", "offload", "sequential") if mode == "auto" else (mode,)
    for candidate in candidates:
        for tiled in (False, True) if candidate != "bf16" else (False,):

            def peak(batch: int, candidate: str = candidate, tiled: bool = tiled) -> float:
                return denoise_peak_gib(candidate, batch, job, tiled, machine.fp8_compute)

            # Resident modes gain little past 4 images a batch; offload raises the batch so that one
            # pass over the weights serves more images (until the copies hide behind the compute).
            limit = job.batch_size or (4 if candidate in ("bf16", "fp8") else _offload_batch_limit(job, machine))
            batch = job.batch_size if job.batch_size and peak(job.batch_size) <= usable else 0
            if not job.batch_size:
                batch = _largest_batch(peak, usable, limit)
            if batch:
                break
        if not batch:
            needed = peak(job.batch_size or 1)
            tried.append(f"{candidate} needs about {needed:.1f} GiB of GPU memory at batch {job.batch_size or 1}")
            continue
        host = denoise_host_gib(candidate)
        if host > machine.host_usable_gib:
            tried.append(f"{candidate} needs about {host:.0f} GiB of host RAM; this machine has {machine.host_gib:.0f}")
            continue
        return _denoise_stage(candidate, batch, tiled, job, machine)
    gpu = "no CUDA GPU" if machine.gpu_gib is None else f"a {machine.gpu_gib:.0f} GiB GPU"
    raise DoesNotFitError(
        f"Qwen-Image's denoise stage does not fit {gpu} with {machine.host_gib:.0f} GiB of host RAM: "
        + "; ".join(tried)
        + (". Try a smaller --batch-size or --memory-mode auto." if job.batch_size or mode != "auto" else ".")
    )


def _offload_batch_limit(job: Job, machine: Machine) -> int:
    """Enough images per batch that computing one step takes as long as streaming the weights once
    (at this host link, and at PCIe 4.0), at most 8."""
    scale = forward_flops(job.tokens) / forward_flops(REFERENCE_TOKENS)
    per_row = FORWARD_SECONDS[("bf16", False)] * scale
    transfer = DIT_PARAMS * 2 / (min(machine.host_link_gbps, PCIE4_HOST_LINK_GBPS) * 1e9)
    return max(1, min(8, math.ceil(transfer / (per_row * job.rows_per_image))))


def _denoise_stage(mode: str, batch: int, tiled: bool, job: Job, machine: Machine) -> StagePlan:
    how = {
        "bf16": "transformer resident in bf16",
        "fp8": "transformer linears in fp8 through torchao (dynamic activation, per-row scales), img_mlp's last "
        "linear and the embedders in bf16"
        if machine.fp8_compute
        else "transformer linears stored in fp8, computed in bf16 (layerwise casting; this GPU has no fp8 "
        "matmuls), img_mlp's last linear and the embedders in bf16",
        "offload": "transformer in pinned host RAM, streamed to the GPU block by block on a side stream "
        "(diffusers group offload), one pass over the weights per step for the whole batch",
        "sequential": "every layer copied to the GPU when it runs (accelerate sequential CPU offload)",
    }[mode]
    notes = []
    if tiled:
        notes.append("the VAE decodes in tiles (an untiled decode would not fit); seams may differ slightly")
    if mode == "fp8" and not job.compile and machine.fp8_compute:
        notes.append("fp8 without compile is slower than bf16: leave compile on")
    seconds = denoise_seconds_per_image(mode, batch, job, machine, machine.host_link_gbps)
    pcie4 = None
    if mode in ("offload", "sequential"):
        pcie4 = _band(denoise_seconds_per_image(mode, batch, job, machine, PCIE4_HOST_LINK_GBPS))
    return StagePlan(
        stage="denoise",
        mode=mode,
        how=how,
        batch_size=batch,
        peak_gpu_gib=round(denoise_peak_gib(mode, batch, job, tiled, machine.fp8_compute), 1),
        host_gib=round(denoise_host_gib(mode), 1),
        seconds_per_image=_band(seconds),
        seconds_per_image_pcie4=pcie4,
        vae_tiling=tiled,
        notes=notes,
    )


def plan_encode(machine: Machine, job: Job, mode: str = "auto", batch_size: int = 16) -> StagePlan:
    """The text encoder picks its own mode: bf16 when it fits, else fp8 storage, else offload."""
    usable = machine.usable_gib
    candidates = ("bf16", "fp8", "offload") if mode in ("auto", "sequential") else (mode,)
    tried = []
    for candidate in candidates:
        batch = _largest_batch(lambda b, c=candidate: encode_peak_gib(c, b, job), usable, batch_size)
        if not batch:
            tried.append(f"{candidate} needs about {encode_peak_gib(candidate, 1, job):.1f} GiB of GPU memory")
            continue
        host = encode_host_gib(candidate)
        if host > machine.host_usable_gib:
            tried.append(f"{candidate} needs about {host:.0f} GiB of host RAM; this machine has {machine.host_gib:.0f}")
            continue
        how = {
            "bf16": "text encoder resident in bf16",
            "fp8": "text encoder linears stored in fp8, computed in bf16 (layerwise casting)",
            "offload": "text encoder streamed from pinned host RAM layer by layer (group offload)",
        }[candidate]
        seconds = ENCODE_SECONDS_PER_PROMPT * (1.5 if candidate == "fp8" else 1.0)
        if candidate == "offload":
            seconds = max(seconds, ENCODER_PARAMS * 2 / (machine.host_link_gbps * 1e9) / batch)
        return StagePlan(
            stage="encode",
            mode=candidate,
            how=how,
            batch_size=batch,
            peak_gpu_gib=round(encode_peak_gib(candidate, batch, job), 1),
            host_gib=round(encode_host_gib(candidate), 1),
            seconds_per_image=_band(seconds),
        )
    raise DoesNotFitError(
        f"the text encoder does not fit a {machine.gpu_gib:.0f} GiB GPU with {machine.host_gib:.0f} GiB of "
        "host RAM: " + "; ".join(tried)
    )


def plan_memory(machine: Machine, job: Job, mode: str = "auto", encode_batch_size: int = 16) -> MemoryPlan:
    """Both stages' plans, or DoesNotFitError saying why nothing fits. `mode` applies to the
    transformer; the text encoder chooses its own unless `mode` forces one it can use."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"--memory-mode {mode!r}: use one of {', '.join(MEMORY_MODES)}")
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
    encode = plan_encode(machine, job, mode if mode in ("bf16", "fp8", "offload") else "auto", encode_batch_size)
    return MemoryPlan(machine=machine, job=job, encode=encode, denoise=denoise)


# --- This machine -------------------------------------------------------------------------------------


def host_memory_gib() -> float:
    """Total RAM of this machine (or of its cgroup, when that is smaller)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            text = limit.read().strip()
        if text != "max":
            total = min(total, int(text))
    except (OSError, ValueError):
        pass
    return total / GiB


GPU_MEMORY_ENV = "QWEN_BATCH_GPU_MEMORY_GIB"  # plan for less GPU memory than the card has (a shared GPU)
HOST_MEMORY_ENV = "QWEN_BATCH_HOST_MEMORY_GIB"  # plan for this much host RAM (a VM whose RAM grows on use)


def detect_machine(device: str = "cuda", gpu_gib: float | None = None, host_gib: float | None = None) -> Machine:
    """The machine this process runs on; `gpu_gib`/`host_gib` (or $QWEN_BATCH_GPU_MEMORY_GIB) override
    what is detected."""
    import torch

    if gpu_gib is None and os.environ.get(GPU_MEMORY_ENV):
        try:
            gpu_gib = float(os.environ[GPU_MEMORY_ENV])
        except ValueError:
            raise ConfigError(f"{GPU_MEMORY_ENV}={os.environ[GPU_MEMORY_ENV]!r}: give GiB as a number") from None

    name, fp8 = "", True
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        name = properties.name
        fp8 = (properties.major, properties.minor) >= (8, 9)
        if gpu_gib is None:
            gpu_gib = properties.total_memory / GiB
    if host_gib is None and os.environ.get(HOST_MEMORY_ENV):
        try:
            host_gib = float(os.environ[HOST_MEMORY_ENV])
        except ValueError:
            raise ConfigError(f"{HOST_MEMORY_ENV}={os.environ[HOST_MEMORY_ENV]!r}: give GiB as a number") from None
    return Machine(
        gpu_gib=gpu_gib,
        host_gib=host_gib if host_gib is not None else host_memory_gib(),
        fp8_compute=fp8,
        gpu_name=name,
    )
