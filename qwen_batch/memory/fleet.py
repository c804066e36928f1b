"""Several GPUs: the mode each runs, the images per hour of the fan-out, and why (`qwen-batch plan --gpus N`).

Each GPU runs its own shard in its own process (the fan-out: `--shard K/N`, `qwen-image-fanout`), so a
fleet plan is a one-GPU plan (`qwen_batch.memory.planner`) made with each process's share of its host's RAM,
times the GPUs, times the scaling measured for the fan-out: 1.904x on 2 GPUs at 50 steps, model load
and encoding included (docs/scale-out.md), taken as the same 95% per GPU beyond 2 (not measured).

It also weighs the options against each other, which is the question a "dual-GPU setup" asks (two
cards too small for the bf16 model, 24 GiB each): fp8 on each GPU (lossy, the fastest that fits), or
bf16 with the weights streamed from host RAM on each (lossless, bound by the host link, and each
process pins its own copy of the weights). Pure arithmetic, no torch, as the planner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from qwen_batch.errors import ConfigError
from qwen_batch.memory.modes import AUTO, BF16, FP8, FP8_OFFLOAD, GGUF, OFFLOAD, SEQUENTIAL
from qwen_batch.memory.planner import LOSSLESS, MODES_FOR, DoesNotFitError, Machine, MemoryPlan, Workload, plan_memory

# docs/scale-out.md: 2 x H100, 26 mixed rows at 50 steps, launch to merged results: 1.909x and 1.898x.
MEASURED_SCALING = {2: 1.904}
PER_GPU_EFFICIENCY = MEASURED_SCALING[2] / 2
OPTION_LABELS = {
    BF16: "bf16, resident on each GPU",
    FP8: "fp8 on each GPU",
    GGUF: "the GGUF file's weights, resident on each GPU",
    OFFLOAD: "bf16 with the weights streamed from host RAM (offload) on each GPU",
    FP8_OFFLOAD: "fp8 weights streamed from host RAM (fp8-offload) on each GPU",
}


@dataclass(frozen=True)
class FleetOption:
    mode: str
    label: str
    lossless: bool
    plan: MemoryPlan | None  # None: it does not fit (see `refused`)
    images_per_hour: tuple[float, float] | None = None  # the whole fleet, a band like the planner's
    images_per_hour_pcie4: tuple[float, float] | None = None  # offload, with PCIe 4.0 x16 host links
    host_gib_per_host: float | None = None  # what the processes on one host need together
    refused: str = ""


@dataclass(frozen=True)
class FleetPlan:
    gpus: int
    gpus_per_host: int
    machine: Machine  # one GPU, and the whole host's RAM
    job: Workload
    chosen: FleetOption
    options: list[FleetOption]
    scaling: float  # the fan-out's speed-up over one GPU assumed here
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        machine, gpus = self.machine, self.gpus
        hosts = -(-gpus // self.gpus_per_host)
        lines = [
            f"fleet: {gpus} x {machine.gpu_gib:.0f} GiB GPU, {self.gpus_per_host} per host ({hosts} host"
            f"{'s' if hosts > 1 else ''} of {machine.host_gib:.0f} GiB RAM), one shard process per GPU",
            f"  each GPU: {self.chosen.label}, batch size {self.chosen.plan.denoise.batch_size}",
            f"  fan-out: {_rate(self.chosen.images_per_hour)} images/hour on an H100-class GPU each "
            f"({self.scaling:.2f}x one GPU)",
            "  options:",
        ]
        for option in self.options:
            if option.plan is None:
                lines.append(f"    {option.label}: does not fit ({option.refused})")
                continue
            pcie4 = f"; {_rate(option.images_per_hour_pcie4)} over PCIe 4.0 x16" if option.images_per_hour_pcie4 else ""
            lines.append(
                f"    {option.label}: {_rate(option.images_per_hour)} images/hour{pcie4}; "
                f"{'lossless' if option.lossless else 'lossy (fp8)'}; peak GPU {option.plan.denoise.peak_gpu_gib:.1f} GiB; "
                f"host RAM {option.host_gib_per_host:.0f} GiB per host"
            )
        lines += [f"  why: {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _rate(band: tuple[float, float] | None) -> str:
    return "n/a" if band is None else f"{band[0]:,.0f}-{band[1]:,.0f}"


def scaling(gpus: int) -> float:
    """The fan-out's speed-up over one GPU: measured at 2, the same efficiency per GPU assumed beyond."""
    return 1.0 if gpus == 1 else MEASURED_SCALING.get(gpus, gpus * PER_GPU_EFFICIENCY)


def plan_fleet(
    machine: Machine, job: Workload, gpus: int, mode: str = AUTO, gpus_per_host: int | None = None
) -> FleetPlan:
    """The plan for `gpus` GPUs like `machine`'s, `gpus_per_host` of them sharing one host's RAM (default:
    all of them, as in a dual-GPU workstation). Raises DoesNotFitError when no mode fits one process."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: use 1 or more")
    per_host = min(gpus_per_host or gpus, gpus)
    if per_host < 1:
        raise ConfigError(f"--gpus-per-host {gpus_per_host}: use 1 or more")
    process = replace(machine, host_gib=machine.host_gib / per_host)  # each process's share of its host
    speedup = scaling(gpus)
    candidates = [mode for mode in MODES_FOR[job.weights.kind] if mode != SEQUENTIAL]
    options = [_option(candidate, process, job, speedup, per_host) for candidate in candidates]
    chosen_plan = plan_memory(process, job, mode)  # the one-GPU planner's own choice (or refusal)
    chosen = next((o for o in options if o.mode == chosen_plan.denoise.mode), None)
    chosen = chosen or _option(chosen_plan.denoise.mode, process, job, speedup, per_host)
    return FleetPlan(
        gpus=gpus,
        gpus_per_host=per_host,
        machine=machine,
        job=job,
        chosen=chosen,
        options=options,
        scaling=speedup,
        reasons=_reasons(chosen, options, gpus, per_host, speedup),
    )


def _option(mode: str, process: Machine, job: Workload, speedup: float, per_host: int) -> FleetOption:
    label, lossless = OPTION_LABELS.get(mode, f"{mode} on each GPU"), LOSSLESS[mode]
    try:
        plan = plan_memory(process, job, mode)
    except DoesNotFitError as error:
        return FleetOption(mode, label, lossless, None, refused=_short(str(error), process, per_host))
    denoise = plan.denoise
    return FleetOption(
        mode=mode,
        label=label,
        lossless=lossless,
        plan=plan,
        images_per_hour=_fleet_rate(denoise.seconds_per_image, speedup),
        images_per_hour_pcie4=_fleet_rate(denoise.seconds_per_image_pcie4, speedup),
        host_gib_per_host=round(max(denoise.host_gib, plan.encode.host_gib) * per_host, 1),
    )


def _fleet_rate(seconds: tuple[float, float] | None, speedup: float) -> tuple[float, float] | None:
    if seconds is None:
        return None
    low, high = seconds
    return round(3600 / high * speedup, 1), round(3600 / low * speedup, 1)


def _short(error: str, process: Machine, per_host: int) -> str:
    """The planner's refusal, with the host RAM put as each process's share when several share a host."""
    reason = error.split(": ", 1)[-1].split(". Try ", 1)[0].rstrip(".")
    if per_host > 1 and "host RAM" in reason:
        reason += f" (each of {per_host} processes on a host gets {process.host_gib:.0f} GiB of its RAM)"
    return reason


def _reasons(chosen: FleetOption, options: list[FleetOption], gpus: int, per_host: int, speedup: float) -> list[str]:
    fitting = [option for option in options if option.plan is not None]
    reasons = []
    if fitting:
        fastest = max(fitting, key=lambda option: option.images_per_hour[0])
        if fastest is chosen:
            reasons.append(
                f"{fastest.label} is the fastest that fits: {_rate(fastest.images_per_hour)} images/hour for the "
                f"{gpus} GPU{'s' if gpus > 1 else ''}"
            )
        elif chosen.plan is not None:
            why = "it keeps images bf16-exact where they fit" if chosen.lossless else "--memory-mode asked for it"
            reasons.append(
                f"{chosen.label} is the plan ({why}); {fastest.label} would be faster, "
                f"{_rate(fastest.images_per_hour)} images/hour, with --memory-mode {fastest.mode}"
            )
        exact = [option for option in fitting if option.lossless]
        if not fastest.lossless and exact:
            best = max(exact, key=lambda option: option.images_per_hour[0])
            slower = fastest.images_per_hour[0] / best.images_per_hour[0]
            reasons.append(
                f"for bf16-exact images, {best.label}: {_rate(best.images_per_hour)} images/hour, "
                f"{slower:.1f}x fewer than fp8 (fp8 rounds every block's weights and activations)"
            )
    offload = next((option for option in options if option.mode == OFFLOAD), None)
    if offload is not None and offload.plan is not None:
        denoise = offload.plan.denoise
        if denoise.streamed_from_disk_gib:
            reasons.append(
                f"offload copies the whole transformer to each GPU at every step and serves a batch of "
                f"{denoise.batch_size} with it; with each process's share of the RAM, {denoise.streamed_from_disk_gib:.0f} "
                "GiB of it are read back from disk at every step, which bounds it"
            )
        else:
            reasons.append(
                "offload copies the whole transformer to each GPU at every step and serves a batch "
                f"of {denoise.batch_size} with it: bound by the host link "
                f"({_rate(offload.images_per_hour_pcie4)} images/hour at PCIe 4.0 x16; two cards on one consumer "
                "board often get x8 lanes each, half that link)"
            )
        if per_host > 1:
            reasons.append(
                f"each offload process pins its own copy of the weights: {per_host} processes on a host need "
                f"{offload.host_gib_per_host:.0f} GiB of its RAM together"
            )
    elif offload is not None:
        reasons.append(f"{offload.label} does not fit: {offload.refused}")
    if per_host > 1:
        reasons.append(
            "loading reads the checkpoint block by block straight to each GPU (no host copy of the model), so "
            f"the {per_host} processes on a host need no staggering: their RAM above is all they hold, loads included"
        )
    if gpus > 1:
        reasons.append(
            f"the fan-out scales {speedup:.2f}x over one GPU: measured 1.90x on 2 H100s with load and encode "
            "included (docs/scale-out.md); beyond 2, the same 95% per GPU is assumed, not measured"
        )
    reasons.append(
        "speeds are the planner's H100 figures (docs/memory.md); on a slower card every mode's compute grows: "
        "offload can then hide its copies behind it, but never runs faster than bf16 compute, which fp8 "
        "matmuls beat"
    )
    return reasons
