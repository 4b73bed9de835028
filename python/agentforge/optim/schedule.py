"""The learning-rate schedule: linear warm-up from 0, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the base learning rate for update number `step` (the first update is 1).

    - `step <= warmup_steps`: `step / warmup_steps`, a line from 0 (before any update) to 1 at
      the last warm-up update; so the first update already moves the weights.
    - `warmup_steps < step < total_steps`: cosine from 1 down to `min_lr_ratio`.
    - `step >= total_steps`: `min_lr_ratio`, constant (training past the plan keeps the floor).
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
