"""What a row's `step_cache` (the manifest column, or the run's `--step-cache`) may say: parsed, checked, normalized.

- `none` (the default): every step runs the whole transformer.
- `first-block:T[,warmup=N]`: diffusers' `FirstBlockCacheConfig(threshold=T)`. The first block always runs; the
  others are reused from the row's last full step when the first block's output residual changed by less than
  T (relative mean absolute change) since then. `warmup=N` (default 0, as diffusers): the row's first N steps
  always compute, as cache-dit's warm-up steps do (its Qwen-Image configurations use 4-8; docs/step-cache.md).
- `taylorseer[:interval=N,warmup=N,order=N,until=N]`: diffusers' `TaylorSeerCacheConfig(cache_interval,
  disable_cache_before_step, max_order, disable_cache_after_step, use_lite_mode=True)`: the transformer's
  output is extrapolated by a Taylor series from the full steps, which come on a fixed schedule.

The normalized text (`first-block:0.1`, `first-block:0.12,warmup=4`, `taylorseer:interval=5,warmup=3,order=1`)
is what the row carries into its batch key, fingerprint, results and PNG metadata, so two spellings of one spec
are one spec (a first-block spec without warm-up keeps the text it always had). Kept free of torch: the
manifest's validation imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NONE, FIRST_BLOCK, TAYLORSEER = "none", "first-block", "taylorseer"
# A threshold above 1 would reuse a step whose first block changed by more than its own size: nearly never a
# computed step. Users of the real model report 0.05-0.2 (docs/step-cache.md).
MAX_THRESHOLD = 1.0
MAX_STEP = 200  # manifest.MAX_STEPS: no schedule has more steps
MAX_ORDER = 4
EXAMPLES = (
    "none, first-block:T[,warmup=N] (e.g. first-block:0.1) or taylorseer (e.g. taylorseer:interval=5,warmup=3,order=1)"
)


class StepCacheError(ValueError):
    """A spec that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class FirstBlock:
    """diffusers' FirstBlockCache, decided per row, with cache-dit's warm-up steps (none by default)."""

    threshold: float
    warmup: int = 0  # the first steps, always computed

    def __str__(self) -> str:
        text = f"{FIRST_BLOCK}:{self.threshold!r}"
        return f"{text},warmup={self.warmup}" if self.warmup else text


@dataclass(frozen=True)
class TaylorSeer:
    """diffusers' TaylorSeer (its lite variant: the whole transformer's output is extrapolated), per row.
    The fields are `TaylorSeerCacheConfig`'s, with its defaults."""

    interval: int = 5  # cache_interval
    warmup: int = 3  # disable_cache_before_step
    order: int = 1  # max_order
    until: int | None = None  # disable_cache_after_step

    def __str__(self) -> str:
        text = f"{TAYLORSEER}:interval={self.interval},warmup={self.warmup},order={self.order}"
        return text if self.until is None else f"{text},until={self.until}"

    def computes(self, step: int) -> bool:
        """Whether step `step` (counted from 0) runs the transformer: diffusers' `_measure_should_compute`."""
        warming_up = step < self.warmup
        refreshing = (step - self.warmup - 1) % self.interval == 0
        cooling_down = self.until is not None and step >= self.until
        return warming_up or refreshing or cooling_down


StepCache = FirstBlock | TaylorSeer

# TaylorSeer's fields by their short name and by diffusers' `TaylorSeerCacheConfig` name: (short name, lowest).
_TAYLORSEER_FIELDS = {
    "interval": ("interval", 1),
    "cache_interval": ("interval", 1),
    # 0 would predict at step 0, before any step has computed (diffusers raises there).
    "warmup": ("warmup", 1),
    "disable_cache_before_step": ("warmup", 1),
    "order": ("order", 0),
    "max_order": ("order", 0),
    "until": ("until", 1),
    "disable_cache_after_step": ("until", 1),
}


def parse_step_cache(text: str | None) -> StepCache | None:
    """The spec `text` names; None for no step cache (`none`, or nothing). Raises `StepCacheError`."""
    if text is None or not text.strip() or text.strip().lower() == NONE:
        return None
    kind, _, arguments = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind == FIRST_BLOCK:
        return _first_block(text, arguments)
    if kind == TAYLORSEER:
        return _taylorseer(text, arguments)
    raise StepCacheError(f"{text!r} is not a step cache: use {EXAMPLES}")


def normalized(text: str | None) -> str | None:
    """The spec's one spelling (None for no step cache). Raises `StepCacheError`."""
    spec = parse_step_cache(text)
    return None if spec is None else str(spec)


def _first_block(text: str, arguments: str) -> FirstBlock:
    threshold, *settings = (part.strip() for part in arguments.split(","))
    warmup = None
    for item in filter(None, settings):
        name, equals, raw = (piece.strip() for piece in item.partition("="))
        if name.lower() != "warmup":
            raise StepCacheError(
                f"{text!r}: {name!r} is not a first-block setting: give the threshold, then warmup=N if "
                "you want one, e.g. first-block:0.12,warmup=4"
            )
        if warmup is not None:
            raise StepCacheError(f"{text!r}: warmup is given twice; give it once")
        warmup = _whole_number(text, "warmup", raw if equals else "", 0, MAX_STEP)
    return FirstBlock(_threshold(text, threshold), warmup or 0)


def _whole_number(text: str, name: str, raw: str, lowest: int, highest: int) -> int:
    try:
        number = int(raw)
    except ValueError:
        number = None
    if number is None or not lowest <= number <= highest:
        raise StepCacheError(
            f"{text!r}: give {name} a whole number from {lowest} to {highest} ({name}=N; got {raw or 'nothing'})"
        )
    return number


def _threshold(text: str, value: str) -> float:
    if value.lower().startswith("threshold="):
        value = value.partition("=")[2].strip()
    try:
        threshold = float(value)
    except ValueError:
        raise StepCacheError(
            f"{text!r}: give first-block its threshold, a number such as first-block:0.1 (0.05-0.2 is what users "
            "of the real model report)"
        ) from None
    if not (math.isfinite(threshold) and 0.0 < threshold <= MAX_THRESHOLD):
        raise StepCacheError(
            f"{text!r}: the threshold {threshold:g} is out of range: use a number above 0 and at most "
            f"{MAX_THRESHOLD:g} (0.05-0.2 is what users of the real model report; higher skips more steps)"
        )
    return threshold


def _taylorseer(text: str, arguments: str) -> TaylorSeer:
    values: dict[str, int] = {}
    for item in (part.strip() for part in arguments.split(",")):
        if not item:
            continue
        name, equals, raw = (piece.strip() for piece in item.partition("="))
        field = _TAYLORSEER_FIELDS.get(name.lower())
        if field is None:
            raise StepCacheError(
                f"{text!r}: {name!r} is not a TaylorSeer setting: use interval, warmup, order, until (diffusers' "
                "cache_interval, disable_cache_before_step, max_order, disable_cache_after_step), e.g. "
                "taylorseer:interval=5,warmup=3,order=1"
            )
        short, lowest = field
        if short in values:
            raise StepCacheError(f"{text!r}: {short} is given twice; give it once")
        highest = MAX_ORDER if short == "order" else MAX_STEP
        values[short] = _whole_number(text, short, raw if equals else "", lowest, highest)
    return TaylorSeer(**values)
