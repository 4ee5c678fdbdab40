"""A tiny real GAN on ``ManualOptimModule`` for platform tests: generator + critic, two optimizers, TTUR, a frozen part.

- the critic sees images through a frozen conv (a stand-in for a frozen teacher/VAE: never in an optimizer);
- the critic has dropout (global torch RNG), the latents and the critic's input noise come from the per-rank generator,
  and the input-noise level is a rank-identical choice per iteration (``iteration_generator``, like DMD2's backward-
  simulation depth), so resume and DDP tests exercise all three random streams.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.lightning_modules.common.manual import ManualOptimModule


class TinyGANModule(ManualOptimModule):
    def __init__(self, width: int = 8, z_dim: int = 8, noise_levels: tuple[float, ...] = (0.0, 0.05, 0.1),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizers", "schedulers"])
        self.z_dim, self.noise_levels = z_dim, tuple(noise_levels)
        self.generator = nn.Sequential(  # z -> 8x8 -> 16x16 -> 32x32 RGB in [-1, 1]
            nn.Linear(z_dim, width * 64), nn.Unflatten(1, (width, 8, 8)), nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Tanh())
        self.frozen = nn.Conv2d(3, 3, 3, 1, 1).requires_grad_(False)
        self.critic = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Conv2d(width, width, 4, 2, 1),
            nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(width * 64, 1))
        self.seen_noise: list[torch.Tensor] = []   # per-rank latents (first values), one per iteration
        self.seen_levels: list[float] = []         # rank-identical choices, one per iteration
        self.seen_keys: list[list[str]] = []

    def optimizer_params(self) -> dict[str, Any]:
        return {"generator": self.generator, "critic": self.critic}

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=self.ensure_generator(), device=self.device)

    def score(self, x: torch.Tensor, level: float) -> torch.Tensor:
        x = x + level * torch.randn(x.shape, generator=self.ensure_generator(), device=x.device)
        return self.critic(self.frozen(x)).squeeze(1)

    def train_iteration(self, batch: dict[str, Any], batch_idx: int) -> None:
        real = batch["image"]
        z = self.latents(real.shape[0])
        level = self.noise_levels[int(torch.randint(len(self.noise_levels), (1,), generator=self.iteration_generator()))]
        self.seen_noise.append(z[:1, :4].detach().cpu().clone())
        self.seen_levels.append(level)
        self.seen_keys.append(list(batch.get("key", [])))
        g_turn = self.is_turn("generator")
        with torch.set_grad_enabled(g_turn):
            fake = self.generator(z)
        if g_turn:
            self.update("generator", lambda: F.softplus(-self.score(fake, level)).mean())
        if self.is_turn("critic"):
            self.update("critic", lambda: F.softplus(self.score(fake.detach(), level)).mean()
                        + F.softplus(-self.score(real, level)).mean())

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        real = batch["image"]
        fake = self.generator(self.latents(real.shape[0]))
        d_fake, d_real = self.score(fake, 0.0), self.score(real, 0.0)
        d_loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        return {"loss": d_loss, "g_loss": F.softplus(-d_fake).mean()}

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        return {"samples": self.generator(self.latents(n)).add(1).div(2)}


class ExactGANModule(ManualOptimModule):
    """A deterministic float64 GAN (latents come with the batch; no dropout, no noise): k accumulated micro-batches
    of b samples must give the same weights as one batch of k·b. ``frozen`` is a frozen base kept out of checkpoints
    (``frozen_prefixes``). Records the generator's weights after each of its steps and the iteration of every
    validation batch together with the generator weights it ran on."""

    frozen_prefixes = ("frozen.",)

    def __init__(self, z_dim: int = 3, x_dim: int = 4, hidden: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizers", "schedulers"])
        gen = torch.Generator().manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim)).double()
        self.frozen = nn.Linear(x_dim, x_dim).double().requires_grad_(False)
        self.critic = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        self.generator_after_step: list[dict[str, torch.Tensor]] = []
        self.validated: list[tuple[int, dict[str, torch.Tensor]]] = []

    def optimizer_params(self) -> dict[str, Any]:
        return {"generator": self.generator, "critic": self.critic}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(self.frozen(x)).squeeze(1)

    def update(self, name: str, loss: Any, clip_norm: float | None = None) -> torch.Tensor:
        out = super().update(name, loss, clip_norm)
        if name == "generator" and not self.accumulating:
            self.generator_after_step.append({n: p.detach().clone() for n, p in self.generator.named_parameters()})
        return out

    def train_iteration(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        fake = self.generator(batch["z"])  # shared by both updates: computed before the first one
        if self.is_turn("generator"):
            self.update("generator", lambda: F.softplus(-self.score(fake)).mean())
        if self.is_turn("critic"):
            self.update("critic", lambda: F.softplus(self.score(fake.detach())).mean()
                        + F.softplus(-self.score(batch["x"])).mean())

    def model_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        if stage == "val" and not self.trainer.sanity_checking:
            self.validated.append((self.iteration, {n: p.detach().clone()
                                                    for n, p in self.generator.named_parameters()}))
        return {"loss": F.softplus(-self.score(self.generator(batch["z"]))).mean()}


def exact_gan_data(n: int, z_dim: int = 3, x_dim: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed float64 samples ``{"z", "x"}`` for ``ExactGANModule`` (a list: a map-style dataset)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, z_dim, generator=gen, dtype=torch.float64)
    x = torch.randn(n, x_dim, generator=gen, dtype=torch.float64) + 1.0
    return [{"z": z[i], "x": x[i]} for i in range(n)]
