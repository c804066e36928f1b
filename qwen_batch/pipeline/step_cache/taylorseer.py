"""TaylorSeer per row: a step either runs the transformer or extrapolates each row's output from its full steps.

diffusers' `TaylorSeerCacheConfig(..., use_lite_mode=True)` on Qwen-Image hooks every block (a predicted step
returns zeros for it, so nothing in the blocks runs) and `proj_out`, the transformer's output, whose value on a
predicted step is a Taylor series in the steps since the last full one, from finite differences of the full
steps' outputs (`TaylorSeerState.update` and `predict`). Whether a step is full depends on its index only, so
every row of a batch (they share the spec) runs or predicts the same step: a predicted step runs nothing at
all. The arithmetic is diffusers', elementwise, so each row's extrapolation uses its own outputs only; the
conditional and unconditional passes are rows apart as they are cache contexts apart in diffusers.

Why the lite variant, not diffusers' default (which hooks each block's attention and keeps the MLPs running):
a predicted step then costs nothing but the embeddings, its factors are one output-sized tensor per order and
row (the default keeps two per block, 60 blocks: about 3 GB per row and pass at 1024x1024 in bf16), and the
compiled blocks stay as they are (the default's hooks sit inside them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qwen_batch.pipeline.step_cache import Forward, per_image
from qwen_batch.pipeline.step_cache.spec import TaylorSeer

# The factors are kept in the model's dtype: `TaylorSeerCacheConfig.taylor_factors_dtype` set to it. diffusers'
# default, bf16, is the model's dtype on a GPU; on the CPU in float32 (the tests) rounding the factors to bf16
# would make a row's extrapolation flip with the last bit of its inputs, and the factors are small here (one
# output-sized tensor per order and row), so nothing is saved by rounding them.


class TaylorSeerRows:
    """A batch's TaylorSeer state: per forward (its rows), the Taylor factors of the transformer's output."""

    def __init__(self, spec: TaylorSeer, rows: int):
        self.spec, self.rows = spec, rows
        self._factors: dict[int, dict[int, torch.Tensor]] = {}  # forward's first row -> order -> [rows, tokens, C]
        self._last_full: int | None = None
        self._full_steps = 0
        self._restarting = False  # `restart_factors`: the next full step takes no differences

    def wants_controls(self, step: int) -> bool:
        return self.spec.computes(step)  # a predicted step runs no block, so no ControlNet either

    def run(self, step: int, forwards: Sequence[Forward]) -> list[torch.Tensor]:
        if self.spec.computes(step):
            outputs = [forward.call(**forward.control_kwargs) for forward in forwards]
            for forward, output in zip(forwards, outputs, strict=True):
                self._update(forward.first, output, step)
            self._last_full, self._restarting = step, False
            self._full_steps += 1
            return outputs
        if self._last_full is None:  # spec.warmup >= 1 makes step 0 full
            raise RuntimeError("TaylorSeer cannot predict before a full step")
        return [self._predict(forward.first, step - self._last_full) for forward in forwards]

    def restart_factors(self) -> None:
        """Keep the last full step's output (steps until the next full one repeat it) but take no differences
        against it: the next full step starts the series again. What diffusers' state does when the output's
        shape changes between full steps (Qwen-Image-2.1's first output spans the prefix too, there)."""
        self._factors = {first: {0: factors[0]} for first, factors in self._factors.items()}
        self._restarting = True

    def steps_computed(self, batch: int) -> list[tuple[int, int | None]]:
        return per_image([self._full_steps] * self.rows, batch)

    def _update(self, first: int, features: torch.Tensor, step: int) -> None:
        """`TaylorSeerState.update`: recursive divided differences of the full steps' outputs."""
        previous = self._factors.get(first, {})
        new = {0: features}
        if self._last_full is not None and not self._restarting:
            delta = step - self._last_full
            for order in range(self.spec.order):
                before = previous.get(order)
                if before is None or before.shape != new[order].shape:
                    break
                new[order + 1] = (new[order] - before) / delta
        self._factors[first] = new

    def _predict(self, first: int, offset: int) -> torch.Tensor:
        """`TaylorSeerState.predict`: the series at `offset` steps past the last full one."""
        factors = self._factors[first]
        output = torch.zeros_like(factors[0])
        for order in range(len(factors)):
            output = output + factors[order] * (offset**order / math.factorial(order))
        return output
