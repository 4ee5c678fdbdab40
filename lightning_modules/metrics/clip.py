"""CLIP score from a local CLIP directory, working with transformers 5.

torchmetrics 1.9.0's ``CLIPScore`` breaks with transformers 5 (``get_image_features`` returns a
``BaseModelOutputWithPooling``, torchmetrics calls ``.norm`` on it; Lightning-AI/torchmetrics#3407, fix #3408
unreleased) and only takes hub ids. The adapter here (platform.md §5): pass ``model_name_or_path=`` a callable that
returns ``(wrapper, CLIPProcessor.from_pretrained(dir))``, where the wrapper exposes the inner ``.config`` and
returns plain feature tensors (``.pooler_output`` of the projected outputs). Drop :class:`CLIPFeatureWrapper` once
torchmetrics ships the fix.

Also: :func:`clip_score_from_features` (the formula on precomputed embeddings) and :func:`clip_features` (batched
image / text embeddings through the same processor + wrapper, for rewards).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctrlgen.lightning_modules.common.local_files import require_pretrained_dir

__all__ = [
    "CLIP_MODEL_DIR_ENV",
    "CLIPFeatureWrapper",
    "clip_features",
    "clip_score_from_features",
    "clip_score_metric",
    "load_local_clip",
]

CLIP_MODEL_DIR_ENV = "CLIP_MODEL_DIR"


def _as_features(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot get features from {type(out).__name__}")


class CLIPFeatureWrapper(nn.Module):
    """Wraps a transformers ``CLIPModel`` so ``get_image_features`` / ``get_text_features`` return tensors
    (transformers 5 returns ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected embedding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return _as_features(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _as_features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _check_dir(model_dir: str | os.PathLike | None) -> Path:
    return require_pretrained_dir(model_dir, "CLIP model", "a CLIPModel and CLIPProcessor (e.g. "
                                  "openai/clip-vit-large-patch14)", env=CLIP_MODEL_DIR_ENV)


def load_local_clip(model_dir: str | os.PathLike | None = None, *, device: str | torch.device | None = None
                    ) -> tuple[CLIPFeatureWrapper, Any]:
    """``(CLIPFeatureWrapper(CLIPModel), CLIPProcessor)`` from a local directory (``local_files_only``)."""
    from transformers import CLIPModel, CLIPProcessor

    p = _check_dir(model_dir)
    model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval().requires_grad_(False)
    processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
    wrapper = CLIPFeatureWrapper(model)
    if device is not None:
        wrapper.to(device)
    return wrapper, processor


def clip_score_metric(model_dir: str | os.PathLike | None = None, **kwargs: Any):
    """torchmetrics ``CLIPScore`` on a local CLIP dir (via the callable ``model_name_or_path`` + wrapper).

    ``update(images, captions)`` with images (N,3,H,W) uint8 (or float; the processor rescales by 1/255) and a list
    of N strings; ``compute()`` = max(100·mean cos, 0) (torchmetrics' definition).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    p = _check_dir(model_dir)
    return CLIPScore(model_name_or_path=lambda: load_local_clip(p), **kwargs)


def clip_score_from_features(image_features: Tensor, text_features: Tensor, *, logit_scale: float = 100.0,
                             clamp: bool = True) -> Tensor:
    """Per-pair CLIP score ``logit_scale · cos(E_I, E_T)`` (clamped at 0 if ``clamp``, as Hessel et al.'s CLIPScore
    with w=100 and torchmetrics' per-sample formula). Inputs (N,D); returns (N,)."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    i = image_features.float()
    t = text_features.float()
    i = i / i.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = logit_scale * (i * t).sum(-1)
    return s.clamp_min(0) if clamp else s


@torch.no_grad()
def clip_features(wrapper: CLIPFeatureWrapper, processor: Any, *, images: Tensor | Sequence[Tensor] | None = None,
                  texts: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Projected (un-normalised) embeddings of ``images`` ((N,3,H,W) or list of (3,H,W)) and/or ``texts``."""
    out: dict[str, Tensor] = {}
    dev = next(wrapper.parameters()).device
    if images is not None:
        ims = [im.cpu() for im in (list(images) if not isinstance(images, Tensor) or images.ndim == 4 else [images])]
        px = processor(images=ims, return_tensors="pt")["pixel_values"].to(dev)
        out["image"] = wrapper.get_image_features(px)
    if texts is not None:
        tok = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out["text"] = wrapper.get_text_features(tok["input_ids"].to(dev), tok["attention_mask"].to(dev))
    return out
