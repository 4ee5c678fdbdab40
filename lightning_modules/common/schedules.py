"""Learning-rate schedules usable as injected ``LRSchedulerCallable``s from YAML."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_linear_factor(step: int, warmup_steps: int, total_steps: int, end_factor: float = 0.0) -> float:
    """Linear warm-up 0 → 1 over ``warmup_steps``, then linear 1 → ``end_factor`` at ``total_steps`` (VAR's 'lin0')."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 1.0 + (end_factor - 1.0) * t


class WarmupLinear(LambdaLR):
    """``warmup_linear_factor`` per optimizer step (use with ``scheduler_interval: step``)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1, end_factor: float = 0.0):
        self.warmup_steps, self.total_steps, self.end_factor = warmup_steps, total_steps, end_factor
        super().__init__(optimizer, lambda s: warmup_linear_factor(s, warmup_steps, total_steps, end_factor))
