"""Logs how many corrupt/incomplete samples the data pipeline skipped (``data/skipped``), so skips are never silent.

Each batch carries ``_data_health = (worker id, cumulative skips in that worker)`` (see ``ctrlgen.datamodules.base``); the
callback keeps the maximum per worker and logs the sum, per rank on every logged step and summed over ranks per epoch.
At the end of fit/test/predict one line gives the run's total over all ranks and, for loaders in this process
(``num_workers: 0``), the count per reason with example ``key @ shard`` (``SKIPS``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class DataHealthCallback(L.Callback):
    def __init__(self) -> None:
        self.per_worker: dict[tuple, int] = {}  # (stage, dataloader_idx, worker) or ("main", 0): max cumulative skips
        self.before_resume = 0  # skips counted before the run was resumed (new workers count from zero)
        # the main process's counter (num_workers=0) is per process: a second run in the same process (the demo's
        # stages, tests) starts from what earlier runs skipped, so count from its value when this run starts
        self.main_baseline = 0
        self.main_counts: Counter[str] = Counter()  # the main process's per-reason counts when this run started
        self.last_summary = ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from ctrlgen.datamodules.shards import SKIPS

        self.main_baseline = SKIPS.total
        self.main_counts = Counter(SKIPS.counts)

    @property
    def skipped(self) -> int:
        return self.before_resume + sum(self.per_worker.values())

    def _update(self, batch: Any, stage: str, loaders: Any = None, dataloader_idx: int = 0) -> bool:
        if not isinstance(batch, dict) or "_data_health" not in batch:
            return False
        worker, count = (int(x) for x in batch.pop("_data_health").tolist())
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        loader = getattr(loader, "loader", loader)  # the DataLoader inside a training _EpochLoader
        # num_workers=0: every such loader (train and eval) reports this process's one counter: count it once
        key = ("main", 0) if getattr(loader, "num_workers", None) == 0 else (stage, dataloader_idx, worker)
        if key == ("main", 0):
            count = max(0, count - self.main_baseline)
        before = self.per_worker.get(key, 0)
        self.per_worker[key] = max(before, count)
        return self.per_worker[key] > before

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._update(batch, "train", trainer.train_dataloader):
            rank_zero_warn(f"data: {self.skipped} corrupt or incomplete samples skipped so far (see data/skipped)")
        pl_module.log("data/skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, "val", trainer.val_dataloaders, dataloader_idx)

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, "test", trainer.test_dataloaders, dataloader_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, "predict", trainer.predict_dataloaders, dataloader_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = torch.tensor(float(self.skipped), device=pl_module.device)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        pl_module.log("data/skipped_all_ranks", total, on_epoch=True, on_step=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.per_worker, self.before_resume = {}, int(state_dict.get("skipped", 0))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> str:
        """``data (stage): N samples skipped over all ranks`` + this process's reasons with examples, if any."""
        from ctrlgen.datamodules.shards import SKIPS

        total = float(self.skipped)
        if trainer.world_size > 1:
            total = float(trainer.strategy.reduce(torch.tensor(total, device=pl_module.device), reduce_op="sum"))
        here = SKIPS.counts - self.main_counts  # this run's skips in this process, by reason
        if not total and not here:
            return f"data ({stage}): no samples skipped"
        line = f"data ({stage}): {int(total)} samples skipped" + (" over all ranks" if trainer.world_size > 1 else "")
        if here:
            reasons = [f"{r} ×{n} (e.g. {', '.join(SKIPS.examples.get(r, []))})" for r, n in here.most_common()]
            line += "; in this process: " + "; ".join(reasons)
        return line

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.last_summary = self.summary(trainer, pl_module, stage)
        rank_zero_info(self.last_summary)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "predict")
