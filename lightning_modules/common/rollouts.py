"""Pure functions for on-policy group rollouts (GRPO): grouping, advantages, logging statistics.

Layout convention: a batch of B prompts rolled out G times each is a flat tensor of B·G rows, **grouped contiguously**
(rows ``[g*G, (g+1)*G)`` belong to prompt g), as ``repeat_for_groups`` produces.

Advantages follow TRL's GRPO convention (trl 1.16.0 ``scale_rewards``; shared/specs/shortcoti.md §2.4, §5), which is
also T2I-R1's: ``A = R - mean_group(R)``, divided by ``std + eps`` where std is **Bessel-corrected (unbiased)** and taken
per group (``"group"``), over the whole batch (``"batch"``), or not at all (``"none"``, Dr. GRPO).
"""

from __future__ import annotations

from typing import Any

import torch

SCALES = ("group", "batch", "none")


def repeat_for_groups(x: Any, G: int) -> Any:
    """Each prompt G times, contiguously: tensors along dim 0, lists/tuples element-wise, dicts per value."""
    if G < 1:
        raise ValueError(f"group size G must be >= 1, got {G}")
    if torch.is_tensor(x):
        return x.repeat_interleave(G, dim=0)
    if isinstance(x, dict):
        return {k: repeat_for_groups(v, G) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [v for v in x for _ in range(G)]
    raise TypeError(f"repeat_for_groups: cannot repeat a {type(x).__name__}")


def _grouped(rewards: torch.Tensor, G: int) -> torch.Tensor:
    if rewards.ndim != 1 or G < 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be a flat tensor of B*G values with G={G}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, G)


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages of flat, contiguously grouped rewards (B·G,) → (B·G,), in the rewards' dtype.

    ``scale="group"``: (r − group mean) / (group std + eps); ``"batch"``: (r − group mean) / (batch std + eps);
    ``"none"``: r − group mean. std is unbiased (n − 1), as TRL; it needs G ≥ 2 ("group") or B·G ≥ 2 ("batch").
    """
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    r = _grouped(rewards, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        if G < 2:
            raise ValueError("scale='group' needs G >= 2 (the unbiased std of one sample is undefined)")
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards")
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)


def group_stats(rewards: torch.Tensor, G: int, atol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Logging statistics: ``reward`` (mean), ``reward_std`` (mean of the unbiased per-group stds, TRL's logged value;
    0 for G = 1), ``reward_std_batch`` (unbiased std over all rollouts) and ``frac_zero_std`` (fraction of groups whose
    rewards are all equal within ``atol``: they carry no learning signal)."""
    r = _grouped(rewards.detach().float(), G)
    std = r.std(dim=1) if G > 1 else torch.zeros(r.shape[0], device=r.device)
    spread = r.max(dim=1).values - r.min(dim=1).values
    return {
        "reward": r.mean(),
        "reward_std": std.mean(),
        "reward_std_batch": r.std() if r.numel() > 1 else torch.zeros((), device=r.device),
        "frac_zero_std": (spread <= atol).float().mean(),
    }
