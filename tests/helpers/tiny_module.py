"""A tiny real LightningModule for platform tests (CLI, resume, DDP, W&B, faults): a conv autoencoder on ECM batches.

It uses dropout (global torch RNG) and noise from the per-rank generator, so resume tests exercise both random streams.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.lightning_modules.common.base import BaseGenModule


class TinyAEModule(BaseGenModule):
    def __init__(self, width: int = 8, noise: float = 0.05, freeze_decoder: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.enc = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(), nn.Dropout(0.1), nn.Conv2d(width, width, 3, 1, 1))
        self.dec = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(width, 3, 4, 2, 1))
        if freeze_decoder:  # a stand-in for a frozen base (tests of frozen_prefixes)
            self.dec.requires_grad_(False)
        self.noise = noise
        self.seen_noise: list[torch.Tensor] = []
        self.seen_keys: list[list[str]] = []

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        x = batch["image"]
        eps = torch.randn(x.shape, generator=self.ensure_generator(), device=x.device)
        if stage == "train":
            self.seen_noise.append(eps[:1, :1, :2, :2].detach().cpu().clone())
            self.seen_keys.append(list(batch.get("key", [])))
        rec = self.dec(self.enc(x + self.noise * eps))
        loss = F.mse_loss(rec, x)
        return {"loss": loss, "mae": (rec - x).abs().mean()}

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        x = batch["image"][:n]
        return {"reconstruction": torch.cat([x, self.dec(self.enc(x))]).add(1).div(2)}


class TinyFeatures(nn.Module):
    """A tiny stand-in for Inception in metric tests (conv + mean-pool, 16 features; uint8 or [0,1] images)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return torch.tanh(self.conv(x)).mean((2, 3))
