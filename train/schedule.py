"""The learning-rate schedule: a linear warmup, then a cosine decay to `min_lr`.

The course's learning-rate chart shows exactly this shape: a short ramp from 0, then a smooth
half cosine down. Written out here rather than borrowed so the formula is on the page:

    lr(s) = base · s / warmup                                         for s < warmup
    lr(s) = min_lr + (base − min_lr) · ½ (1 + cos(π · progress))      otherwise,
            progress = (s − warmup) / (total − warmup)
"""
from __future__ import annotations

import math


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps.

    lr(0) = 0 when there is a warmup, lr(warmup_steps) = base_lr, lr(total_steps) = min_lr; steps
    past the end stay at min_lr.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps == warmup_steps:  # no room left to decay
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
