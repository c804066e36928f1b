"""Progress reporting, decoupled from where it is shown.

The engine calls `progress.start(stage, total, unit)`, then `advance(n)`, then `finish()`. The CLI
shows tqdm bars (rate and ETA); a Prefect flow can show an artifact instead; tests pass `Silent`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    def start(self, stage: str, total: int, unit: str) -> None: ...
    def advance(self, count: int = 1) -> None: ...
    def finish(self) -> None: ...


class Silent:
    def start(self, stage: str, total: int, unit: str) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


class ProgressBars:
    """A tqdm bar per stage (rate and ETA) on a terminal; elsewhere (CI, nohup, a pod's log) a log
    line every `interval` seconds instead, so long runs still show that they move and how fast."""

    def __init__(self, enabled: bool | None = None, interval: float = 30.0):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._bar = None
        self._stage, self._total, self._done, self._unit = "", 0, 0, ""
        self._started = self._last_log = 0.0

    def start(self, stage: str, total: int, unit: str) -> None:
        self.finish()
        self._stage, self._total, self._done, self._unit = stage, total, 0, unit
        self._started = self._last_log = time.monotonic()
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True)

    def advance(self, count: int = 1) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval:
            self._last_log = now
            elapsed = now - self._started
            rate = self._done / elapsed if elapsed else 0.0
            eta = (self._total - self._done) / rate if rate else float("inf")
            log.info(
                "%s: %d/%d %s, %.2f %s/s, about %.0f s left",
                self._stage,
                self._done,
                self._total,
                self._unit,
                rate,
                self._unit,
                eta,
            )

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def show_library_progress_bars(enabled: bool) -> None:
    """diffusers and transformers draw their own bars while loading weights; follow our setting."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        (library.enable_progress_bar if enabled else library.disable_progress_bar)()
