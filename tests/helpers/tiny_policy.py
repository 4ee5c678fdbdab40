"""A toy on-policy module for GRPO plumbing tests: a categorical policy over a small vocabulary, conditioned on the
prompt through a hashed embedding table, trained with group-relative advantages (REINFORCE/GRPO at ratio 1).

Reward: 1 if the sampled token equals the prompt's target (``meta["target"]``, else a hash of the prompt), else 0.
Rollouts are drawn under ``no_grad`` from the per-rank generator (``ensure_generator``), so ranks differ and resume
continues the same random stream.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.rollouts import (
    group_advantages,
    group_stats,
    repeat_for_groups,
)


class TinyPolicyModule(BaseGenModule):
    def __init__(self, vocab: int = 8, buckets: int = 4096, group_size: int = 8, advantage_scale: str = "group",
                 advantage_eps: float = 1e-4, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.vocab, self.buckets, self.G = vocab, buckets, group_size
        self.scale, self.eps = advantage_scale, advantage_eps
        self.logits = nn.Embedding(buckets, vocab)
        nn.init.zeros_(self.logits.weight)  # uniform policy at the start: mean reward 1 / vocab
        self.reward_history: list[float] = []
        self.seen_prompts: list[list[str]] = []
        self.seen_tokens: list[list[int]] = []

    def _bucket(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([zlib.crc32(p.encode()) % self.buckets for p in prompts], device=self.device)

    def targets(self, prompts: list[str], metas: list[dict]) -> torch.Tensor:
        t = [int(m["target"]) if "target" in m else zlib.crc32(p.encode()) % self.vocab for p, m in zip(prompts, metas)]
        return torch.tensor(t, device=self.device) % self.vocab

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        prompts, metas = batch["prompt"], batch["meta"]
        logits = self.logits(self._bucket(prompts))  # (B, V)
        target = self.targets(prompts, metas)
        if stage != "train":  # greedy evaluation; padded rows (valid == False) are ignored
            valid = batch["valid"].float()
            reward = (logits.argmax(-1) == target).float()
            score = (reward * valid).sum() / valid.sum().clamp_min(1)
            return {"loss": -score, "reward": score}
        with torch.no_grad():  # on-policy rollouts: G samples per prompt, grouped contiguously
            tokens = torch.multinomial(logits.softmax(-1), self.G, replacement=True, generator=self.ensure_generator())
            tokens = tokens.reshape(-1)
            rewards = (tokens == repeat_for_groups(target, self.G)).float()
            adv = group_advantages(rewards, self.G, self.scale, self.eps)
        logp = F.log_softmax(repeat_for_groups(logits, self.G), -1).gather(1, tokens[:, None]).squeeze(1)
        loss = -(adv * logp).mean()
        stats = group_stats(rewards, self.G)
        self.reward_history.append(float(stats["reward"]))
        self.seen_prompts.append(list(prompts))
        self.seen_tokens.append(tokens.tolist())
        return {"loss": loss, **stats}
