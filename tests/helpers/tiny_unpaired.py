"""A tiny unpaired GAN on ``ManualOptimModule`` + ``MultiStreamDataModule``: the shape of the coming Defocus method.

Batches are ``{"shallow": batch, "deep": batch}`` (two unpaired streams of different batch sizes). The generator maps a
``deep`` image (plus per-rank noise from ``ensure_generator()``) to an output image; the critic scores real ``shallow``
images against generated ones through a tiny *frozen* feature conv (never in an optimizer, a stand-in for a frozen
VAE/teacher) with a hinge loss. The critic has dropout (global torch RNG), so resume tests exercise every random stream.

The module records, per iteration, the sample keys of both streams and the first noise values, and per update which
nets changed (``updates``), so tests can check turns, exact resume and skipped samples from outside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.lightning_modules.common.manual import ManualOptimModule

STREAMS = ("shallow", "deep")


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


class TinyUnpairedModule(ManualOptimModule):
    def __init__(self, width: int = 8, resolution: int = 16, noise_std: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizers", "schedulers"])
        self.noise_std = noise_std
        self.generator = nn.Sequential(  # deep image + 1 noise channel -> residual -> output in [-1, 1]
            nn.Conv2d(4, width, 3, 1, 1), nn.SiLU(), nn.Conv2d(width, width, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(width, 3, 3, 1, 1))
        self.features = nn.Conv2d(3, 4, 3, 1, 1).requires_grad_(False)  # frozen: in no optimizer
        side = resolution // 4
        self.critic = nn.Sequential(
            nn.Conv2d(4, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Conv2d(width, width, 4, 2, 1),
            nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(width * side * side, 1))
        self.seen_keys: list[dict[str, list[str]]] = []  # per iteration: {stream: sample keys}
        self.seen_noise: list[torch.Tensor] = []        # per iteration: first per-rank noise values
        self.updates: list[dict[str, Any]] = []         # per update: iteration, name, which nets changed

    def optimizer_params(self) -> dict[str, Any]:
        return {"generator": self.generator, "critic": self.critic}

    # ------------------------------------------------------------------------------------------------------ nets
    def generate(self, deep: torch.Tensor) -> torch.Tensor:
        noise = torch.randn((deep.shape[0], 1, *deep.shape[2:]), generator=self.ensure_generator(), device=deep.device)
        return torch.tanh(deep + self.generator(torch.cat([deep, self.noise_std * noise], 1)))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(x)).squeeze(1)

    # ------------------------------------------------------------------------------------------------------ training
    def update(self, name: str, loss: Any, clip_norm: float | None = None) -> torch.Tensor:
        before = {n: _flat(getattr(self, n)) for n in ("generator", "critic", "features")}
        out = super().update(name, loss, clip_norm)
        changed = {n for n, v in before.items() if not torch.equal(_flat(getattr(self, n)), v)}
        self.updates.append({"iteration": self.iteration, "name": name, "changed": changed})
        return out

    def train_iteration(self, batch: dict[str, Any], batch_idx: int) -> None:
        real, deep = batch["shallow"]["image"], batch["deep"]["image"]
        self.seen_keys.append({s: list(batch[s]["key"]) for s in STREAMS})
        g_turn = self.is_turn("generator")
        with torch.set_grad_enabled(g_turn):
            fake = self.generate(deep)
        self.seen_noise.append(fake[:1, 0, 0, :4].detach().clone())
        if g_turn:
            self.update("generator", lambda: F.softplus(-self.score(fake)).mean())  # non-saturating
        if self.is_turn("critic"):
            self.update("critic", lambda: F.relu(1 - self.score(real)).mean() + F.relu(1 + self.score(fake.detach())).mean())

    # ------------------------------------------------------------------------------------------------------ evaluation
    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """One eval loader per stream: ``{"shallow": b}`` scores real photos, ``{"deep": b}`` generated ones (hinge)."""
        out: dict[str, torch.Tensor] = {}
        if "shallow" in batch:
            out["d_real"] = F.relu(1 - self.score(batch["shallow"]["image"])).mean()
        if "deep" in batch:
            out["d_fake"] = F.relu(1 + self.score(self.generate(batch["deep"]["image"]))).mean()
        return {"loss": sum(out.values()), **out}

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        out = {}
        if "deep" in batch:
            deep = batch["deep"]["image"][:n]
            out = {"deep": deep.add(1).div(2), "generated": self.generate(deep).add(1).div(2)}
        if "shallow" in batch:
            out["shallow"] = batch["shallow"]["image"][:n].add(1).div(2)
        return out
