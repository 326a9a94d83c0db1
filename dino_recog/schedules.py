"""Schedules as pure functions of the iteration: the training loop reads a value and sets it.

They reproduce the official DINO `utils.cosine_scheduler` value for value (one value per iteration):
a linear warmup `linspace(start, base, warmup_steps)` followed by `final + (base - final) * (1 + cos(pi * i / n)) / 2`
for i = 0 .. n-1, n = total_steps - warmup_steps (so `final` is approached but not reached, as in the original).
"""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "linear_warmup", "scaled_lr", "step_schedule"]


def cosine_schedule(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Value at `step` of a linear warmup then cosine decay (DINO lr, weight decay and teacher momentum).

    Args:
        step: iteration, 0-based.
        total_steps: iterations in the whole run (epochs x iterations per epoch).
        base: value at the end of the warmup (start of the cosine).
        final: value the cosine decays towards.
        warmup_steps: iterations of linear warmup from `warmup_start` to `base` (both ends included).
        warmup_start: first value of the warmup.
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    n = max(total_steps - warmup_steps, 1)
    i = min(step - warmup_steps, n - 1)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` (step 0) to `end` (step `warmup_steps`), then constant: the DINO teacher temperature."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def step_schedule(
    step: int,
    steps_per_epoch: int,
    base: float,
    milestones: list[int],
    gamma: float,
    warmup_steps: int = 0,
    warmup_factor: float = 0.01,
) -> float:
    """Linear warmup from base x warmup_factor, then multiply by `gamma` at each epoch milestone (BoT)."""
    if step < warmup_steps:
        return base * (warmup_factor + (1 - warmup_factor) * step / warmup_steps)
    epoch = step // steps_per_epoch
    return base * gamma ** sum(epoch >= m for m in milestones)


def scaled_lr(base_lr: float, total_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017), as DINO applies it: lr = base_lr * total_batch / 256."""
    return base_lr * total_batch / reference_batch
