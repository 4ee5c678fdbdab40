"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the newest state.

In lightning 2.6.6, with a ``monitor``, ``last.ckpt`` is rewritten only when a top-k checkpoint is saved at the same
step, i.e. only when the monitored metric improves, and at the end of training only if no ``last.ckpt`` was ever
written. So a GAN or RL run whose validation loss stops improving, or a run stopped by ``max_steps`` /
``max_iterations`` between two validations, leaves a stale ``last.ckpt`` behind and ``--ckpt_path last`` silently
resumes from an old point. ``RunCheckpoint`` keeps the best-``k`` logic as is and additionally writes ``last.ckpt``
after every validation / training epoch end and at the end of training whenever the step moved since it was last
written (on every rank at the same hook, so sharded saves stay collective).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) with a ``last.ckpt`` that never lags behind the run (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_at: int | None = None  # global_step of the newest last.ckpt

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = trainer.global_step

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` now (e.g. before a signal stops the run) as this callback's own last checkpoint, so
        that a resumed run keeps writing ``last.ckpt`` (not ``last-v1.ckpt``). Returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.sanity_checking
                or trainer.state.fn != TrainerFn.FITTING or self._last_written_at == trainer.global_step
                or trainer.global_step == 0):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
