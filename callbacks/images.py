"""Sample image grids at validation: ``pl_module.sample_images(batch, n)`` → PNG under ``<log_dir>/samples/`` and W&B.

Every rank samples (a sharded model needs all ranks in the forward); rank 0 writes and logs. The first validation batch
is kept so that the grids of successive validations show the same conditions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N,C,H,W) float in [0,1] → uint8 HWC grid with white padding."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class ImageGridLogger(L.Callback):
    def __init__(self, num_images: int = 8, every_n_validations: int = 1) -> None:
        self.num_images, self.every = num_images, every_n_validations
        self._batch: Any = None
        self._count = 0
        self.last_paths: list[Path] = []

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._batch is None and batch_idx == 0:
            self._batch = {k: v for k, v in batch.items() if not str(k).startswith("_")} if isinstance(batch, dict) else batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        self._count += 1
        if (self._count - 1) % self.every:
            return
        batch = pl_module.transfer_batch_to_device(self._batch, pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        grids = pl_module.sample_images(batch, self.num_images)
        pl_module.train(was_training)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0 or not grids:
            return
        out_dir = Path(log_dir or trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.last_paths = []
        for name, imgs in grids.items():
            grid = make_grid(imgs, nrow=self.num_images)
            path = out_dir / f"{name.replace('/', '_')}_step{trainer.global_step:07d}.png"
            Image.fromarray(grid).save(path)
            self.last_paths.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"samples/{name}", images=[grid], step=trainer.global_step)
