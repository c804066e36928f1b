"""What the benchmarks measure with: CUDA-event timers of a module's forwards, GPU busy and clocks, host
memory peaks, wall time of a method's calls, image differences, and the GPU's own rates.

Every timer here adds no host sync inside the timed loop (CUDA events, read once it ends).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qwen_batch.memory.planner import forward_flops

FULL_STEPS = 50  # the steps every per-image figure is given at (extrapolated when fewer ran)


class ForwardTimer:
    """Times every transformer forward with CUDA events (no host sync in the loop) and notes its shape."""

    def __init__(self, transformer: torch.nn.Module):
        self.spans: list[tuple[object, object]] = []
        self.shapes: list[tuple[int, int, int]] = []  # (rows, image tokens, text tokens)
        self.cuda = torch.cuda.is_available()
        self.handles = [
            transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            transformer.register_forward_hook(self._after),
        ]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, module, args, kwargs):
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        self.shapes.append((hidden.shape[0], hidden.shape[1], text.shape[1]))
        self._start = self._mark()

    def _after(self, module, args, output):
        self.spans.append((self._start, self._mark()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in self.spans]
        return [end - start for start, end in self.spans]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RssPeak:
    """Peak resident host memory of this process, sampled every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return round(max(self.peak, self.process.memory_info().rss) / 2**30, 1)


class BatchTimer:
    """GPU idle time between batches, from CUDA events recorded as `ImageGenerator.generate` is entered
    and left. An event completes when the GPU reaches it: an entry event that completes later than the
    previous exit event means the GPU had run out of queued work and waited for the host. Idle inside a
    batch (a host-bound step loop) would not show here; the NVML samples (GpuUtilization) cover it."""

    def __init__(self):
        from qwen_batch.pipeline.denoise import ImageGenerator

        self.owner, self.original = ImageGenerator, ImageGenerator.generate
        self.events: list[tuple[object, object]] = []
        self.host_times: list[tuple[float, float]] = []
        timer = self

        def generate(generator, *args, **kwargs):
            entered, host_entered = timer._event(), time.time()
            images = timer.original(generator, *args, **kwargs)
            timer.events.append((entered, timer._event()))
            timer.host_times.append((host_entered, time.time()))
            return images

        ImageGenerator.generate = generate

    @staticmethod
    def _event():
        if not torch.cuda.is_available():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def remove(self) -> None:
        self.owner.generate = self.original

    def host_window(self) -> tuple[float, float]:
        """Host clock from the second batch's start to the last batch's return (the first carries warm-up)."""
        if len(self.host_times) < 2:
            return (0.0, 0.0)
        return self.host_times[1][0], self.host_times[-1][1]

    def figures(self) -> dict:
        if not self.events or self.events[0][0] is None:
            return {}
        torch.cuda.synchronize()
        gaps = [
            max(exited.elapsed_time(entered_next), 0.0) / 1000
            for (_, exited), (entered_next, _) in zip(self.events, self.events[1:], strict=False)
        ]
        spans = [entered.elapsed_time(exited) / 1000 for entered, exited in self.events]
        after_first = self.events[1][0].elapsed_time(self.events[-1][1]) / 1000 if len(self.events) > 1 else 0.0
        return {
            "batches": len(self.events),
            "first_batch_gpu_s": round(spans[0], 2),
            "gpu_seconds_from_second_batch": round(after_first, 2),
            "idle_between_batches_s": round(sum(gaps), 3),
            "max_gap_s": round(max(gaps, default=0.0), 4),
            # Busy share of the GPU's own clock from the second batch's start to the last batch's end.
            "busy_fraction_between_batches": round(1 - sum(gaps) / after_first, 4) if after_first else None,
        }


class GpuUtilization:
    """NVML's utilization.gpu (share of time a kernel ran), SM clock, power and temperature, sampled
    every 100 ms by nvidia-smi: the busy share, and whether the GPU slowed down as it warmed up."""

    QUERY = "utilization.gpu,clocks.sm,power.draw,temperature.gpu"

    def __init__(self):
        import shutil
        import subprocess

        self.samples: list[tuple[float, list[float]]] = []
        self.process = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            command = ["nvidia-smi", "-i", index, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"]
            self.process = subprocess.Popen([*command, "-lms", "100"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), [float(part) for part in line.split(",")]))
            except ValueError:
                continue  # "[N/A]" and the like

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def figures(self, start: float, end: float) -> dict:
        window = [values for moment, values in self.samples if start <= moment <= end]
        if not window:
            return {}
        return {
            "nvml_samples": len(window),
            "nvml_utilization_mean_pct": round(statistics.mean(v[0] for v in window), 1),
            **self.clock_figures(window),
        }

    def clock_figures(self, window: list[list[float]] | None = None) -> dict:
        window = window if window is not None else [values for _, values in self.samples]
        if not window:
            return {}
        clocks = [v[1] for v in window]
        return {
            "sm_clock_mhz_median": statistics.median(clocks),
            "sm_clock_mhz_min": min(clocks),
            "power_w_median": statistics.median(v[2] for v in window),
            "temperature_c_max": max(v[3] for v in window),
        }


def free_gpu() -> None:
    import gc

    torch._dynamo.reset()  # compiled graphs hold their modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as lines:
        kib = next(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return round(kib / 2**20, 2)


def matmul_tflops() -> float | None:
    """bf16 8192^3 matmul rate, median of 20 after warm-up: the ceiling the transformer is compared with."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2 * 8192**3 / statistics.median(times) / 1e12, 1)


def host_to_gpu_gbps() -> float | None:
    """Pinned host-to-GPU copy bandwidth (1 GiB, median of 5): what offload streams through."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    device = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return round(2**30 / statistics.median(times[1:]) / 1e9, 1)


def forward_figures(timer: ForwardTimer, skip: int = 2) -> dict:
    """Median steady forward (the first `skip` forwards warm up, compile), per sample row, and TFLOP/s."""
    seconds = timer.seconds()
    steady = seconds[skip:] or seconds
    steady_shapes = timer.shapes[skip:] or timer.shapes
    median = statistics.median(steady)
    rows, image_tokens, text_tokens = steady_shapes[len(steady_shapes) // 2]
    flops = rows * forward_flops(image_tokens + text_tokens)
    return {
        "forwards": len(seconds),
        "first_forward_s": round(seconds[0], 3) if seconds else None,
        "forward_s": round(median, 4),
        "rows_per_forward": rows,
        "text_tokens": text_tokens,
        "forward_s_per_row": round(median / rows, 4),
        "forward_s_per_row_at_64_text_tokens": round(
            median / rows * forward_flops(4096 + 64) / forward_flops(image_tokens + text_tokens), 4
        ),
        "transformer_tflops": round(flops / median / 1e12, 1),
        "total_forward_s": round(sum(seconds), 2),
    }


def gpu_gaps(profiler, least_ms: float = 0.05, listed: int = 12) -> dict:
    """Where the GPU ran no kernel during a profiled stage: the time between kernels (merged over
    streams), its sum over gaps of at least `least_ms`, and the longest gaps with the kernels on
    either side, which name the host work the GPU waited for."""
    kernels = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
    )
    if not kernels:
        return {"kernels": 0}
    gaps, busy_until, before = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append(((start - busy_until) / 1000, before, name))
        if end >= busy_until:
            busy_until, before = end, name
    span_ms = (busy_until - kernels[0][0]) / 1000
    counted = [gap for gap in gaps if gap[0] >= least_ms]
    return {
        "kernels": len(kernels),
        "span_ms": round(span_ms, 1),
        "idle_ms": round(sum(gap[0] for gap in gaps), 1),
        f"idle_ms_in_gaps_of_{least_ms}_ms_or_more": round(sum(gap[0] for gap in counted), 1),
        "busy_fraction": round(1 - sum(gap[0] for gap in gaps) / max(span_ms, 1e-9), 4),
        "longest": [
            {"ms": round(ms, 2), "after": after[:80], "before": next_[:80]}
            for ms, after, next_ in sorted(counted, reverse=True)[:listed]
        ],
    }


def image_differences(a: Path, b: Path) -> dict:
    """Per-pixel differences (0-255) between the PNGs of folder `a` and their namesakes in `b`: the largest,
    and the mean of each image's mean."""
    from PIL import Image

    rows = {}
    for path in sorted(a.glob("*.png")):
        other = b / path.name
        if other.exists():
            x = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            y = np.asarray(Image.open(other).convert("RGB"), dtype=np.int16)
            rows[path.stem] = {"max": int(np.abs(x - y).max()), "mean": round(float(np.abs(x - y).mean()), 3)}
    if not rows:
        return {}
    return {
        "images": len(rows),
        "max": max(row["max"] for row in rows.values()),
        "mean": round(statistics.mean(row["mean"] for row in rows.values()), 3),
    }


class Timed:
    """Wall time of every call of `owner.name` (a class's function or an instance's method), the GPU
    synchronized before the clock stops; restored by `remove`."""

    def __init__(self, owner: object, name: str):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.seconds: list[float] = []
        timer = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return timer.original(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds.append(time.perf_counter() - started)

        setattr(owner, name, timed)

    def remove(self) -> None:
        if isinstance(self.owner, type):
            setattr(self.owner, self.name, self.original)
        else:
            delattr(self.owner, self.name)  # the class's method shows through again
        # Let a pipeline be freed (its GPU memory with it) once its user drops it: the owner and the
        # original bound method hold it, and a transformer with diffusers hooks is freed only by gc.
        self.owner = self.original = None

    def figures(self, prefix: str) -> dict:
        if not self.seconds:
            return {}
        return {
            f"{prefix}_calls": len(self.seconds),
            f"{prefix}_s_median": round(statistics.median(self.seconds), 4),
            f"{prefix}_s_total": round(sum(self.seconds), 3),
        }


@contextlib.contextmanager
def timing(*targets: tuple[object, str]) -> Iterator[list[Timed]]:
    timers = [Timed(owner, name) for owner, name in targets]
    try:
        yield timers
    finally:
        for timer in timers:
            timer.remove()
