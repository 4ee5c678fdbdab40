"""Token losses for VAR/ECM training (spec §2.3, §3.6): cross-entropy over the kept tokens, with per-scale CE/accuracy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def token_ce(logits_BlV: Tensor, target_Bl: Tensor, begin_ends: Sequence[tuple[int, int]], total_len: int,
             norm: str = "kept_mean", label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """CE over the first ``ed`` tokens (ed = logits length).

    ``norm="kept_mean"``: mean over the kept tokens; ``"var_fixed"``: each token weighs 1/``total_len`` (VAR's trainer,
    so a truncated sequence contributes proportionally less). Returns (loss, per-scale CE, per-scale accuracy), the
    last two of length ``#scales kept`` (detached).
    """
    B, ed, V = logits_BlV.shape
    if target_Bl.shape != (B, ed):
        raise ValueError(f"targets {tuple(target_Bl.shape)} do not match logits {(B, ed)}")
    ce = F.cross_entropy(logits_BlV.reshape(-1, V).float(), target_Bl.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).view(B, ed)
    if norm == "kept_mean":
        loss = ce.mean()
    elif norm == "var_fixed":
        loss = ce.sum(1).mean() / total_len
    else:
        raise ValueError(f"loss norm must be kept_mean|var_fixed, got {norm!r}")
    with torch.no_grad():
        hit = (logits_BlV.argmax(-1) == target_Bl).float()
        kept = [(bg, e) for bg, e in begin_ends if e <= ed]
        per_ce = torch.stack([ce[:, bg:e].mean() for bg, e in kept])
        per_acc = torch.stack([hit[:, bg:e].mean() for bg, e in kept])
    return loss, per_ce, per_acc


def recon_loss(rec: Tensor, img: Tensor, l1_weight: float = 1.0, l2_weight: float = 1.0) -> Tensor:
    """VQVAE reconstruction loss: weighted L1 + L2 in pixel space ([-1, 1])."""
    return l1_weight * (rec - img).abs().mean() + l2_weight * (rec - img).pow(2).mean()
