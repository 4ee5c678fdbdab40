"""Logs training throughput: ``perf/samples_per_sec`` (per rank and × world size) and ``perf/step_time_s``; for
modules that set ``tokens_in_step`` in their training step (token models: VAR/ECM, policies), ``perf/tokens_per_sec``
too (per rank and × world size; with truncated sequences, tokens per step vary). Samples per batch:
``batch_size_of`` (the one batch-size rule; a multi-stream batch counts its first stream)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from ctrlgen.lightning_modules.common.recipe import batch_size_of


class ThroughputCallback(L.Callback):
    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self._t0: float | None = None
        self.samples_per_sec: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is None:
            return
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        n = batch_size_of(batch)
        if trainer.global_step <= self.warmup_steps or n is None or dt <= 0:
            return
        self.samples_per_sec = n / dt
        perf = {"perf/step_time_s": dt, "perf/samples_per_sec": n / dt,
                "perf/samples_per_sec_all_ranks": n * trainer.world_size / dt}
        tokens = getattr(pl_module, "tokens_in_step", None)
        if tokens:
            perf.update({"perf/tokens_per_sec": tokens / dt,
                         "perf/tokens_per_sec_all_ranks": tokens * trainer.world_size / dt})
        pl_module.log_dict(perf, on_step=True, on_epoch=False, batch_size=1)

