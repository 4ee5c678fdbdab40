"""What every method's demo uses to run its stages: one ``ctrlgen fit``/``test`` run in-process per stage
(:func:`run_cli`, each with its own offline W&B run), the :class:`StepTimer` behind the demos' train s/step and cost
claims, and the per-process thread count (:func:`demo_threads`)."""

from __future__ import annotations

import os
import sys
import time

import lightning as L


class StepTimer(L.Callback):
    """Mean wall time of the optimisation steps (batch start → end, i.e. after the optimiser step) without the first
    ``warmup_steps``, data loading, validation and start-up: the "train s/step" of the demos' summaries."""

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.total, self.count = 0.0, 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and trainer.global_step > self.warmup_steps:
            self.total += time.perf_counter() - self._t0
            self.count += 1

    @property
    def mean_s(self) -> float | None:
        return self.total / self.count if self.count else None


STEP_TIMER = f"{StepTimer.__module__}.{StepTimer.__qualname__}"  # class_path for --trainer.callbacks+=


def step_time(cli) -> float | None:
    """The :class:`StepTimer` mean of a finished CLI run (None without a timer or timed steps)."""
    return next((cb.mean_s for cb in cli.trainer.callbacks if isinstance(cb, StepTimer)), None)


def run_cli(args: list[str]):
    """One ``ctrlgen`` run in this process (``args`` as on the command line); returns the CLI object. The stage's W&B
    run is closed afterwards, so the next stage gets its own run instead of logging into this one."""
    from ctrlgen.lightning_modules.common.lightning_cli import CtrlgenCLI, configure_wandb_mode

    configure_wandb_mode()
    try:
        return CtrlgenCLI(args=args)
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


def demo_threads() -> int:
    """Intra-op threads per process (``CTRLGEN_DEMO_THREADS``, default 1). On the shared 2-core box two OpenMP threads
    per process made the tiny demo models ~10× slower (the threads wait for each other at every op while other jobs
    hold a core); demos use a second core by running a branch in a parallel process instead."""
    return max(1, int(os.environ.get("CTRLGEN_DEMO_THREADS", "1")))
