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
    """``warmup_linear_factor`` per optimizer step (use with ``scheduler_interval: step``).

    ``total_steps: null`` asks the module to bind the run's planned optimizer steps before training
    (``BaseGenModule``/``ManualOptimModule`` do, from ``max_steps``/``max_epochs`` and the epoch length;
    ``common/recipe.py``); then the warm-up may be given as ``warmup_frac`` of them (VAR: ep/50 → 0.02).
    An unbound schedule refuses to step rather than run at a wrong length."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int | None = None, total_steps: int | None = 1,
                 end_factor: float = 0.0, start_factor: float | None = None, hold_frac: float = 0.0,
                 warmup_frac: float | None = None):
        if not 0.0 <= hold_frac < 1.0:
            raise ValueError(f"hold_frac must lie in [0, 1), got {hold_frac}")
        if warmup_steps is not None and warmup_frac is not None:
            raise ValueError(f"give warmup_steps ({warmup_steps}) or warmup_frac ({warmup_frac}), not both")
        if warmup_frac is not None and not 0.0 <= warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must lie in [0, 1), got {warmup_frac}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or null (bound to the run), got {total_steps}")
        self.warmup_frac, self.end_factor = warmup_frac, end_factor
        self.start_factor, self.hold_frac = start_factor, hold_frac
        self.total_steps: int | None = None
        self.warmup_steps = 0 if warmup_steps is None else int(warmup_steps)
        if total_steps is not None:
            self._set_total(int(total_steps))
        super().__init__(optimizer, lambda s: self._factor(s))

    def _set_total(self, total_steps: int) -> None:
        self.total_steps = total_steps
        if self.warmup_frac is not None:
            self.warmup_steps = round(self.warmup_frac * total_steps)

    def _factor(self, step: int) -> float:
        if self.total_steps is None:
            if step > 0:
                raise RuntimeError("WarmupLinear(total_steps=null) was never bound to the run's length: use it as a "
                                   "module's injected scheduler (BaseGenModule binds it) or give total_steps")
            return self.start_factor if self.start_factor is not None else 1.0  # placeholder until bound
        return warmup_linear_factor(step, self.warmup_steps, self.total_steps, self.end_factor, self.start_factor,
                                    self.hold_frac)

    def bind_total_steps(self, total_steps: int) -> None:
        """Fix the schedule's length (and ``warmup_frac`` warm-up) and set the current lrs from it."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self._set_total(int(total_steps))
        lrs = [base * self._factor(self.last_epoch) for base in self.base_lrs]
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = lrs
