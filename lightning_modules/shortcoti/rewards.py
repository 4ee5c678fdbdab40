"""Reward functions of ShortCoTI's GRPO (spec §6) and how their values combine (spec §3.1, §3.2).

A reward is a :class:`RewardFn`: ``reward(prompts, metas, tokens, images) -> (N,)`` scores N rollouts against the
**original** prompts (never the CoT); ``tokens`` are the image tokens (N, image_tokens), ``images`` uint8
(N, H, W, 3) or None when no reward asks for pixels (``needs_images``). ``name`` keys its weight, its easiness range
(``length.ranges``) and its logged mean; ``range`` (lo, hi) is its nominal span; ``active(meta)`` says whether it
applies to a prompt's task type (T2I-R1's GIT is inactive on spatial and numeracy prompts). Rewards are plain classes
so YAML can name them by ``class_path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class RewardFn:
    """Base of ShortCoTI rewards (module docstring)."""

    name: str = "reward"
    range: tuple[float, float] = (0.0, 1.0)
    needs_images: bool = False

    def __call__(self, prompts: Sequence[str], metas: Sequence[dict], tokens: torch.Tensor,
                 images: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, metas, tokens, images)")

    def active(self, meta: dict) -> bool:
        return True


class TokenSubsetReward(RewardFn):
    """Fraction of image tokens whose code lies in ``codes`` (spec §6's token-space reward for a tiny Janus whose VQ
    decoder draws noise): a reward GRPO can move on CPU within tens of steps."""

    def __init__(self, codes: Sequence[int], name: str = "token_subset"):
        if not codes:
            raise ValueError("TokenSubsetReward needs a non-empty list of codes")
        self.codes = sorted({int(c) for c in codes})
        self.name = name

    def __call__(self, prompts, metas, tokens, images):
        target = torch.tensor(self.codes, device=tokens.device)
        return torch.isin(tokens, target).to(torch.float64).mean(dim=1)


def score_all(rewards: Sequence[RewardFn], prompts: Sequence[str], metas: Sequence[dict], tokens: torch.Tensor,
              images: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every reward on the same rollouts: ({name: float64 (N,)}, {name: bool (N,) active}); names must be unique."""
    values: dict[str, torch.Tensor] = {}
    active: dict[str, torch.Tensor] = {}
    for fn in rewards:
        if fn.name in values:
            raise ValueError(f"two rewards are named {fn.name!r}; give each a distinct name")
        v = torch.as_tensor(fn(prompts, metas, tokens, images)).detach().to(torch.float64).cpu().reshape(-1)
        if v.numel() != len(prompts):
            raise ValueError(f"reward {fn.name!r} returned {v.numel()} values for {len(prompts)} rollouts")
        values[fn.name] = v
        active[fn.name] = torch.tensor([bool(fn.active(m)) for m in metas], dtype=torch.bool)
    return values, active


def weighted_sum(values: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Σ_k λ_k r_k (λ_k = ``weights[name]``, default 1.0): T2I-R1's unweighted sum with all weights 1."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(values))
    if unknown:
        raise ValueError(f"reward_weights name rewards {unknown} that are not configured (rewards: {sorted(values)})")
    if not values:
        raise ValueError("at least one reward is needed")
    return sum(float(weights.get(k, 1.0)) * v for k, v in values.items())


def instantiate(spec: Any) -> RewardFn:
    """A reward from an instance or a ``{"class_path", "init_args"}`` dict (tests and apps building by hand)."""
    if isinstance(spec, RewardFn):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        import importlib

        module, _, cls = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), cls)(**spec.get("init_args", {}))
    raise TypeError(f"a reward must be a RewardFn or a class_path dict, got {type(spec).__name__}")
