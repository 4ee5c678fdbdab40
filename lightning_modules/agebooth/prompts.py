"""Prompt-embedding fusion (agebooth.md §6): the LoRA's α blends the young and old prompt encodings.

SDXL: ``prompt_embeds`` (B × 77 × 2048, the concatenated CLIP-L and OpenCLIP-bigG hidden states, so both text
encoders are blended) and ``pooled_prompt_embeds`` (B × 1280) become α·E_young + (1 − α)·E_old; FLUX: the T5
``prompt_embeds`` and the CLIP ``pooled_prompt_embeds`` likewise. Negative embeddings (keys starting with
``negative_``) come from the young encoding unchanged and are never blended. α·y + (1 − α)·o is used rather than a
lerp so that α = 1 and α = 0 return the young and old encodings bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Embeds = torch.Tensor | Sequence[torch.Tensor]


def blend(young: Embeds, old: Embeds, alpha: float, name: str = "embedding") -> Embeds:
    """α·young + (1 − α)·old for a tensor or a per-text-encoder sequence of tensors (same shapes)."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"prompt fusion weight alpha={alpha} is outside [0, 1] (1 = young prompt, 0 = old prompt)")
    if isinstance(young, torch.Tensor):
        if not isinstance(old, torch.Tensor) or young.shape != old.shape:
            raise ValueError(f"{name}: young {tuple(young.shape)} and old "
                             f"{tuple(old.shape) if isinstance(old, torch.Tensor) else type(old).__name__} differ; "
                             f"encode both prompts with the same encoders and max length")
        return alpha * young + (1.0 - alpha) * old
    if len(young) != len(old):
        raise ValueError(f"{name}: {len(young)} young and {len(old)} old text-encoder outputs")
    return type(young)(blend(y, o, alpha, f"{name}[{i}]") for i, (y, o) in enumerate(zip(young, old)))


def fuse_prompt_embeds(young: Mapping[str, Embeds | None], old: Mapping[str, Embeds | None],
                       alpha: float) -> dict[str, Embeds | None]:
    """Blend every non-negative entry of two ``encode_prompt`` results (``{"prompt_embeds": ...,
    "pooled_prompt_embeds": ...}``) with ``alpha``; ``negative_*`` entries are taken from ``young``. A key the young
    encoding has but the old one lacks raises ``KeyError``; ``None`` values stay ``None``."""
    out: dict[str, Embeds | None] = {}
    for key, y in young.items():
        if key.startswith("negative_") or y is None:
            out[key] = y
            continue
        if old.get(key) is None:
            raise KeyError(f"prompt fusion: the old prompt encoding lacks {key!r} (has {sorted(old)}); encode it "
                           f"with the same call as the young one")
        out[key] = blend(y, old[key], alpha, key)
    return out
