"""Learning-rate schedules usable as injected ``LRSchedulerCallable``s from YAML."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_linear_factor(step: int, warmup_steps: int, total_steps: int, end_factor: float = 0.0,
                         start_factor: float | None = None, hold_frac: float = 0.0) -> float:
    """LR factor at optimizer step ``step`` (0-based): linear warm-up to 1 over ``warmup_steps`` (from
    ``start_factor`` at step 0, or from 1/warmup_steps when None), then 1 held for the first ``hold_frac`` of the
    remaining steps, then linear to ``end_factor`` at the last step (``total_steps`` − 1).

    VAR's 'lin0' (``utils/lr_control.py``, with ``train.py``'s ``wp0 = 0.005``, ``wpe = 0.01``) is
    ``start_factor=0.005, hold_frac=0.05, end_factor=0.01``; the defaults give a plain warm-up + linear decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        if start_factor is None:
            return (step + 1) / warmup_steps
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if total_steps - 1 <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / (total_steps - 1 - warmup_steps))  # fraction of the post-warm-up steps
    if t < hold_frac:
        return 1.0
    return end_factor + (1.0 - end_factor) * (1.0 - t) / (1.0 - hold_frac)


class WarmupLinear(LambdaLR):
    """``warmup_linear_factor`` per optimizer step (use with ``scheduler_interval: step``)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1, end_factor: float = 0.0,
                 start_factor: float | None = None, hold_frac: float = 0.0):
        if not 0.0 <= hold_frac < 1.0:
            raise ValueError(f"hold_frac must lie in [0, 1), got {hold_frac}")
        self.warmup_steps, self.total_steps, self.end_factor = warmup_steps, total_steps, end_factor
        self.start_factor, self.hold_frac = start_factor, hold_frac
        super().__init__(optimizer, lambda s: warmup_linear_factor(s, warmup_steps, total_steps, end_factor,
                                                                   start_factor, hold_frac))
