"""``ctrlgen predict`` writer: one PNG per sample key (resumable) plus per-batch grids; DDP-safe (each rank writes its
own samples, rank 0 logs the first grid to W&B).

Already-written keys are marked in the batch (``_done``) before ``predict_step``; modules generate only the rest, so a
rerun of an interrupted evaluation skips finished images. Samples are seeded from their batch's keys and evaluation
batches never span shards, so the same key gets the same image with any number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from ctrlgen.callbacks.images import make_grid


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None, skip_existing: bool = True, grids: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.skip_existing, self.grids = output_dir, skip_existing, grids
        self.written = 0
        self.skipped = 0

    def _dir(self, trainer: L.Trainer) -> Path:
        d = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.skip_existing and isinstance(batch, dict) and "key" in batch:
            out = self._dir(trainer)
            done = torch.tensor([(out / f"{k}.png").exists() for k in batch["key"]])
            batch["_done"] = done
            self.skipped += int(done.sum())

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not prediction or not len(prediction.get("key", [])):
            return
        out = self._dir(trainer)
        imgs = prediction["image"].float().clamp(0, 1)
        for key, img in zip(prediction["key"], imgs):
            arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(out / f"{key}.png")
            self.written += 1
        if self.grids and "cond" in prediction:
            grid = make_grid(torch.cat([prediction["cond"].float().add(1).div(2), imgs]), nrow=len(imgs))
            (out / "grids").mkdir(exist_ok=True)
            Image.fromarray(grid).save(out / "grids" / f"rank{trainer.global_rank}_batch{batch_idx:05d}.png")
            if trainer.global_rank == 0 and batch_idx == 0:
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_image(key="predict/condition_vs_generated", images=[grid])
