"""``ctrlgen predict`` writer: one PNG per sample key (resumable) plus per-batch grids; DDP-safe (each rank writes its
own samples, rank 0 logs the first grid to W&B).

Already-written keys are marked in the batch (``_done``) before ``predict_step``; modules generate only the rest, so a
rerun of an interrupted evaluation skips finished images. Samples are seeded from their batch's keys and evaluation
batches never span shards, so the same key gets the same image with any number of ranks. At the end one line says
how many images were written and how many were already there (summed over ranks); a run that wrote nothing and found
nothing to skip warns (an empty predict set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from ctrlgen.callbacks.images import make_grid


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None, skip_existing: bool = True, grids: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.skip_existing, self.grids = output_dir, skip_existing, grids
        self.written = 0
        self.skipped = 0
        self.last_summary = ""

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

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = self.skipped = 0

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = torch.tensor([float(self.written), float(self.skipped)], device=pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        written, skipped = (int(x) for x in counts.tolist())
        out = self._dir(trainer)
        self.last_summary = (f"predict: {written} images written to {out}, {skipped} skipped (already there"
                             f"{'; skip_existing: false regenerates them' if skipped else ''})")
        if written + skipped == 0:
            rank_zero_warn(f"predict: no images written to {out}: the predict data held no samples (check "
                           "data.init_args.predict_shards / predict_files)")
        rank_zero_info(self.last_summary)
