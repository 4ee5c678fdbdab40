"""Control-fidelity metrics: Canny F1 and depth RMSE (pure functions + DDP-safe torchmetrics ``Metric``s).

Canny F1 (ecm.md §6, ControlNet / CAR / ControlAR): edges are re-extracted from the generated image with the
*same* :class:`~ctrlgen.lightning_modules.metrics.edges.EdgeExtractor` that produced the condition, both maps are
binarised (``> 128`` for 0–255 maps, bool as is), and a per-pixel binary F1 is computed per image, then averaged.

Depth RMSE (ControlNet++ ``eval/eval_depth.py``, platform.md §5): the estimator's depth of the generated image is
divided by its per-image max and put on the 8-bit 0–255 scale (rounded), resized bilinearly to the condition's
size; the condition is min–max normalised to 0–255; RMSE on that scale per sample, then averaged.

Depth estimators implement :class:`DepthEstimator` (images → (B,H,W) float relative depth):
:class:`TransformersDepthEstimator` loads ``AutoModelForDepthEstimation`` from a local directory only;
:class:`GeometryDepth` passes through depth a synthetic world already knows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from ctrlgen.lightning_modules.common.local_files import require_pretrained_dir

from .edges import DEFAULT_EDGE_EXTRACTOR, EdgeExtractor, get_edge_extractor

__all__ = [
    "DEPTH_MODEL_DIR_ENV",
    "CannyF1",
    "DepthEstimator",
    "DepthRMSE",
    "GeometryDepth",
    "MetricResult",
    "TransformersDepthEstimator",
    "binarize_edges",
    "binary_f1_per_image",
    "canny_f1",
    "depth_rmse",
    "normalize_cond_depth",
    "normalize_pred_depth",
]

DEPTH_MODEL_DIR_ENV = "DEPTH_MODEL_DIR"


class MetricResult(NamedTuple):
    """``mean`` (0-d tensor) and ``per_sample`` (B,) values; unpacks as a 2-tuple."""

    mean: Tensor
    per_sample: Tensor


# ----------------------------------------------------------------------------------------------- Canny F1
def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x


def _to_b1hw(x: Tensor, what: str) -> Tensor:
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[:, None]  # (B,H,W)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{what}: expected one channel, got shape {tuple(x.shape)}")
        return x
    raise ValueError(f"{what}: expected (B,1,H,W), (B,H,W) or (H,W), got shape {tuple(x.shape)}")


def binarize_edges(edges: Tensor | np.ndarray) -> Tensor:
    """bool → as is; integer maps (0–255) → ``> 128``; float maps → ``> 128`` if max > 1 else ``> 0.5``."""
    e = _as_tensor(edges)
    if e.dtype == torch.bool:
        return e
    if e.is_floating_point():
        return e > (128.0 if e.numel() and float(e.max()) > 1.0 else 0.5)
    return e > 128


def binary_f1_per_image(pred: Tensor | np.ndarray, target: Tensor | np.ndarray,
                        zero_division: float = 1.0) -> Tensor:
    """Per-image binary per-pixel F1 = 2TP / (2TP + FP + FN) between two edge maps of equal size.

    ``zero_division`` is returned for an image where both maps are empty (no edge in either: perfect agreement,
    so ``F1(edge(x), edge(x)) = 1`` holds for blank images too; torchmetrics' ``BinaryF1Score`` would give 0).
    Returns float32 (B,).
    """
    p = _to_b1hw(binarize_edges(pred), "pred")
    t = _to_b1hw(binarize_edges(target), "target").to(p.device)
    if p.shape != t.shape:
        raise ValueError(
            f"edge maps must have the same shape (same resolution), got {tuple(p.shape)} vs {tuple(t.shape)}"
        )
    p = p.flatten(1)
    t = t.flatten(1)
    tp = (p & t).sum(1).double()
    fp = (p & ~t).sum(1).double()
    fn = (~p & t).sum(1).double()
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(denom, float(zero_division)))
    return f1.float()


def canny_f1(pred_images: Tensor | np.ndarray, cond_edges: Tensor | np.ndarray,
             extractor: str | EdgeExtractor = DEFAULT_EDGE_EXTRACTOR, *,
             value_range: tuple[float, float] | None = None, zero_division: float = 1.0) -> MetricResult:
    """Canny F1 of generated images against the condition edge maps.

    Args:
        pred_images: generated images, (B,3,H,W) uint8 or float in ``value_range`` (default [0,1]), or (B,H,W,3) numpy.
        cond_edges: condition edge maps at the same H,W: (B,1,H,W)/(B,H,W), {0,255} uint8 or bool.
        extractor: registry name or :class:`EdgeExtractor` (must be the one that made ``cond_edges``).

    Returns:
        :class:`MetricResult` ``(mean, per_sample)``.
    """
    ext = get_edge_extractor(extractor)
    pred_edges = _as_tensor(ext(pred_images, as_bool=True, value_range=value_range))
    per = binary_f1_per_image(pred_edges, cond_edges, zero_division=zero_division)
    return MetricResult(per.mean(), per)


class CannyF1(Metric):
    """Mean per-image Canny F1 (sum/count states, ``dist_reduce_fx="sum"``: DDP-safe).

    ``update(pred_images, cond_edges)``; ``compute()`` → mean F1 over all images seen on all ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, extractor: str | EdgeExtractor = DEFAULT_EDGE_EXTRACTOR, *,
                 value_range: tuple[float, float] | None = None, zero_division: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extractor = get_edge_extractor(extractor)
        self.value_range = value_range
        self.zero_division = zero_division
        self.add_state("f1_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_images: Tensor | np.ndarray, cond_edges: Tensor | np.ndarray) -> None:
        _, per = canny_f1(pred_images, cond_edges, self.extractor, value_range=self.value_range,
                          zero_division=self.zero_division)
        self.f1_sum += per.double().sum().to(self.f1_sum.device)
        self.count += per.numel()
        self.last_per_image = per  # this batch's per-image F1 (not a state): for paired comparisons (MeanSEM)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("CannyF1.compute() called before any update")
        return (self.f1_sum / self.count).float()


class MeanSEM(Metric):
    """Mean and its standard error over all values seen on all ranks (sum / sum of squares / count states).

    For paired comparisons: ``update(f1_a - f1_b)`` per image gives the mean margin and how sure it is
    (SEM = sample std / √n; a margin several SEMs from 0 is not sampling noise). ``compute()`` → (mean, sem).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        v = values.detach().double().flatten().to(self.total.device)
        self.total += v.sum()
        self.total_sq += v.square().sum()
        self.count += v.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        n = int(self.count)
        if n == 0:
            raise RuntimeError("MeanSEM.compute() called before any update")
        mean = self.total / n
        var = (self.total_sq - n * mean.square()).clamp_min(0) / max(n - 1, 1)  # unbiased sample variance
        return mean.float(), (var / n).sqrt().float()


# ----------------------------------------------------------------------------------------------- depth RMSE
def _depth_bhw(x: Tensor | np.ndarray, what: str) -> Tensor:
    t = _as_tensor(x)
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{what}: expected one channel, got shape {tuple(t.shape)}")
        t = t[:, 0]
    elif t.ndim != 3:
        raise ValueError(f"{what}: expected (B,H,W), (B,1,H,W) or (H,W), got shape {tuple(t.shape)}")
    return t.double()


def normalize_pred_depth(pred: Tensor | np.ndarray, quantize: bool = True) -> Tensor:
    """Estimator output → 0–255: divided by its per-image max (×255), rounded to 8 bit if ``quantize``."""
    d = _depth_bhw(pred, "pred_depth")
    mx = d.flatten(1).amax(1).view(-1, 1, 1)
    d = d / torch.where(mx > 0, mx, torch.ones_like(mx)) * 255.0
    if quantize:
        d = d.round().clamp(0, 255)
    return d


def normalize_cond_depth(cond: Tensor | np.ndarray) -> Tensor:
    """Condition depth → min–max normalised to 0–255 per image (a constant map becomes 0)."""
    d = _depth_bhw(cond, "cond_depth")
    flat = d.flatten(1)
    mn = flat.amin(1).view(-1, 1, 1)
    rng = (flat.amax(1) - flat.amin(1)).view(-1, 1, 1)
    return (d - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)) * 255.0


def depth_rmse(pred_depth: Tensor | np.ndarray, cond_depth: Tensor | np.ndarray, *,
               pred_normalization: str = "max", cond_normalization: str = "minmax",
               quantize: bool = True) -> MetricResult:
    """Per-sample RMSE on the 0–255 scale (ControlNet++ protocol), averaged.

    ``pred_normalization``: ``"max"`` (divide by per-image max, ×255, 8-bit if ``quantize``) or ``"none"``
    (already 0–255). ``cond_normalization``: ``"minmax"`` or ``"none"``. The prediction is resized bilinearly to the
    condition's H,W when they differ.
    """
    if pred_normalization == "max":
        p = normalize_pred_depth(pred_depth, quantize=quantize)
    elif pred_normalization == "none":
        p = _depth_bhw(pred_depth, "pred_depth")
    else:
        raise ValueError(f"pred_normalization must be 'max' or 'none', got {pred_normalization!r}")
    if cond_normalization == "minmax":
        c = normalize_cond_depth(cond_depth)
    elif cond_normalization == "none":
        c = _depth_bhw(cond_depth, "cond_depth")
    else:
        raise ValueError(f"cond_normalization must be 'minmax' or 'none', got {cond_normalization!r}")
    c = c.to(p.device)
    if p.shape[0] != c.shape[0]:
        raise ValueError(f"batch sizes differ: {p.shape[0]} vs {c.shape[0]}")
    if p.shape[-2:] != c.shape[-2:]:
        p = F.interpolate(p[:, None], size=c.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    per = (p - c).square().flatten(1).mean(1).sqrt()
    return MetricResult(per.mean().float(), per.float())


class DepthRMSE(Metric):
    """Mean per-sample depth RMSE (0–255 scale); ``update(pred_depth, cond_depth)``. DDP-safe sum/count states.

    Pass ``estimator=`` (a :class:`DepthEstimator`) to call ``update(pred_images, cond_depth)`` with images instead.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, estimator: DepthEstimator | None = None, *, pred_normalization: str = "max",
                 cond_normalization: str = "minmax", quantize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.estimator = estimator
        self.kw = {"pred_normalization": pred_normalization, "cond_normalization": cond_normalization,
                   "quantize": quantize}
        self.add_state("rmse_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor | np.ndarray, cond_depth: Tensor | np.ndarray) -> None:
        if self.estimator is not None:
            pred = self.estimator(pred)
        _, per = depth_rmse(pred, cond_depth, **self.kw)
        self.rmse_sum += per.double().sum().to(self.rmse_sum.device)
        self.count += per.numel()

    def compute(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("DepthRMSE.compute() called before any update")
        return (self.rmse_sum / self.count).float()


# ----------------------------------------------------------------------------------------------- depth estimators
class DepthEstimator:
    """Interface: ``__call__(images) -> (B,H,W) float`` relative depth (larger = nearer for DPT/MiDaS).

    ``images``: (B,3,H,W) uint8, or float in [0,1].
    """

    def __call__(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(images) -> (B,H,W) depth")


def _images_to_float01(images: Tensor | np.ndarray) -> Tensor:
    x = _as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (B,3,H,W) images, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


class TransformersDepthEstimator(DepthEstimator):
    """``AutoModelForDepthEstimation`` (DPT, DPT-Hybrid/MiDaS, Depth Anything, ...) from a **local directory** only.

    Preprocessing is done in torch (no image-processor backend needed): bilinear resize to the processor's
    ``size`` (from ``preprocessor_config.json`` if present, else the model config's ``image_size``, else 384),
    rescale to [0,1], normalise with the processor's mean/std (default 0.5/0.5, as DPT). The predicted depth is
    resized back to the input H,W (bicubic, as ``post_process_depth_estimation``).
    """

    def __init__(self, model_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, size: int | tuple[int, int] | None = None,
                 image_mean: tuple[float, float, float] | None = None,
                 image_std: tuple[float, float, float] | None = None, batch_size: int = 16) -> None:
        path = require_pretrained_dir(model_dir, "depth model", "a depth estimator (e.g. Intel/dpt-large)",
                                      env=DEPTH_MODEL_DIR_ENV)
        from transformers import AutoModelForDepthEstimation

        self.model_dir = str(path)
        self.model = AutoModelForDepthEstimation.from_pretrained(self.model_dir, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.model.to(self.device, dtype)
        self.batch_size = int(batch_size)

        proc: dict = {}
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            proc = json.loads(pp.read_text())
        cfg_size = getattr(self.model.config, "image_size", None)
        if cfg_size is None and getattr(self.model.config, "backbone_config", None) is not None:
            cfg_size = getattr(self.model.config.backbone_config, "image_size", None)
        if size is None:
            psize = proc.get("size")
            if isinstance(psize, dict) and "height" in psize:
                size = (int(psize["height"]), int(psize["width"]))
            elif isinstance(psize, dict) and "shortest_edge" in psize:
                size = int(psize["shortest_edge"])
            elif isinstance(psize, int):
                size = psize
            else:
                size = int(cfg_size) if cfg_size else 384
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.image_mean = tuple(image_mean or proc.get("image_mean") or (0.5, 0.5, 0.5))
        self.image_std = tuple(image_std or proc.get("image_std") or (0.5, 0.5, 0.5))

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        x = _images_to_float01(images)
        out_hw = x.shape[-2:]
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        preds = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device)
            xb = F.interpolate(xb, size=self.size, mode="bilinear", align_corners=False)
            xb = ((xb - mean.to(xb.device)) / std.to(xb.device)).to(self.dtype)
            d = self.model(pixel_values=xb).predicted_depth  # (b,h,w)
            d = F.interpolate(d[:, None].float(), size=out_hw, mode="bicubic", align_corners=False)[:, 0]
            preds.append(d.cpu())
        return torch.cat(preds, 0)

    def __repr__(self) -> str:
        return f"TransformersDepthEstimator({self.model_dir!r}, size={self.size})"


class GeometryDepth(DepthEstimator):
    """Passthrough for synthetic worlds whose depth is known from the scene geometry.

    With ``fn``: ``__call__(x) = fn(x)`` (e.g. a renderer's depth of the scene behind ``x``). Without: ``x`` already
    *is* depth, (B,H,W), (B,1,H,W) or a 3-channel depth image (channel mean), returned as float (B,H,W).
    """

    def __init__(self, fn: Callable[[Any], Tensor | np.ndarray] | None = None) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> Tensor:
        if self.fn is not None:
            x = self.fn(x)
        t = _as_tensor(x)
        if t.ndim == 4 and t.shape[1] == 3:
            t = t.float().mean(1)
        return _depth_bhw(t, "GeometryDepth input").float()
