"""The records and settings of ShortCoTI rollouts: sampling configs of the two levels and the rollout tensors.

Shared by :mod:`~ctrlgen.lightning_modules.shortcoti.rollout` (which fills them) and
:mod:`~ctrlgen.lightning_modules.shortcoti.scoring` (which re-scores them teacher-forced).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAYOUTS = ("halves", "interleaved")  # [cond; uncond] rows: two halves (transformers) or interleaved (T2I-R1)


@dataclass
class SamplingConfig:
    """CoT sampling, passed to HF ``generate`` field by field: ``top_k=0`` and ``top_p=1.0`` switch truncation off
    (the sampled distribution is then softmax(logits / temperature))."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _check_warpers(self.temperature, self.top_k, self.top_p, "cot")
        if self.max_new_tokens < 1:
            raise ValueError(f"cot max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class ImageSamplingConfig:
    """Image-token sampling: guidance scale ``cfg`` (guided = uncond + cfg·(cond − uncond)), ``temperature``,
    ``top_k`` (0: off), ``top_p`` (1.0: off), ``layout`` of the [cond; uncond] rows: ``halves`` (transformers) or
    ``interleaved`` (T2I-R1: even = cond, odd = uncond)."""

    cfg: float = 5.0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    layout: str = "halves"

    def __post_init__(self) -> None:
        _check_warpers(self.temperature, self.top_k, self.top_p, "image")
        if self.layout not in LAYOUTS:
            raise ValueError(f"image layout must be one of {LAYOUTS}, got {self.layout!r}")


def _check_warpers(temperature: float, top_k: int, top_p: float, what: str) -> None:
    if temperature <= 0:
        raise ValueError(f"{what} temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"{what} top_k must be >= 0 (0: off) and top_p in (0, 1] (1: off), got {top_k}, {top_p}")


@dataclass
class CotRollout:
    """Level-1 rollout of B rows: ``prompt_ids``/``prompt_mask`` (B, P) left-padded, ``ids`` (B, C) (pad after the
    first EOS), ``mask`` (B, C) bool up to and including the first EOS, ``logp`` (B, C) float32 recorded sampling
    log-probs (0 under mask 0), ``texts`` the decoded CoTs (special tokens dropped)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    texts: list[str] = field(default_factory=list)


@dataclass
class ImageRollout:
    """Level-2 rollout of B rows: ``prompt_ids``/``prompt_mask`` (B, P) left-padded image prompts ending in BOI,
    ``tokens`` (B, N), ``logp`` (B, N) recorded log-probs of the guided, warped distribution, ``cond_logp`` (B, N)
    of the cond stream at the temperature, ``images`` uint8 (B, H, W, 3) or None, and with ``return_logits`` the
    raw per-step ``cond_logits``/``uncond_logits`` (B, N, V)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    logp: torch.Tensor
    cond_logp: torch.Tensor
    images: torch.Tensor | None = None
    cond_logits: torch.Tensor | None = None
    uncond_logits: torch.Tensor | None = None
