"""Progress reporting, decoupled from where it is shown.

The engine calls `progress.start(stage, total, unit)`, then `advance(n)`, then `finish()`. The CLI
shows tqdm bars (rate and ETA); a Prefect flow can show an artifact instead; tests pass `Silent`.
"""

from __future__ import annotations

import sys
from typing import Protocol


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
    """One tqdm bar per stage, on stderr, so stdout stays clean for the summary."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def start(self, stage: str, total: int, unit: str) -> None:
        from tqdm.auto import tqdm

        self.finish()
        self._bar = tqdm(total=total, desc=stage, unit=unit, disable=not self.enabled, dynamic_ncols=True)

    def advance(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

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
