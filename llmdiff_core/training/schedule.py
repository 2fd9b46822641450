"""Learning-rate schedule: linear warm-up, then cosine decay (or constant)."""

from __future__ import annotations

import math
from typing import Callable


def lr_lambda(warmup_steps: int, max_steps: int, kind: str = "cosine", min_ratio: float = 0.0
              ) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `step` (0-based), for torch's LambdaLR.

    Warm-up starts at 1/warmup (not 0): a first step with lr 0 would be a wasted step.
    """
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f
