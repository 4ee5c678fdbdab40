"""Metric depth estimators behind one interface (spec shared/specs/defocus.md §6): ``estimator(image01, f_px) ->
depth_m``, image (B, 3, H, W) in [0, 1], depth (B, 1, H, W) in metres at the input's size.

Every estimator is frozen (no parameter requires grad, always in eval mode, excluded from optimisers) but
differentiable w.r.t. its input image unless ``grad`` is off (``depth.grad``), so gradients from the lens reach the
generator through the depth map. ``checkpoint`` (``depth.checkpoint``) recomputes the network's blocks in the backward
pass instead of storing their activations.

* :class:`TransformersDepth`: a transformers depth model (DPT, Depth Anything, ZoeDepth, DepthPro) loaded from a local
  directory only (``local_files_only=True``; nothing is downloaded), with the image processor's resize and
  normalisation re-done in torch so the input keeps its gradient (DepthPro's processor needs torchvision).
* :class:`GroundTruthDepth`: the synthetic world's own depth map (the ``scenes`` world's ``depth.npy``).
* :func:`build_depth_estimator`: one by name (``depth.model``).

What the raw output means differs per model [library]; ``output`` picks the conversion to metres: ``depth`` (ZoeDepth,
Depth Anything's metric head = sigmoid × max_depth), ``inverse`` (relative inverse depth of DPT and relative Depth
Anything: 1 / x, metric only up to a scale that the focus scale s absorbs [design]) and ``canonical_inverse``
(DepthPro: depth = f_px / (W · x) with f_px the focal length in pixels of the W-wide image). Generated images have no
intrinsics: pass f_px = f35 · W / 36 from the sampled EXIF focal length (optics.focal_px) so depth and lens use one
camera. [design]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUTS = ("depth", "inverse", "canonical_inverse")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# model_type → (output, mean, std, multiple the input size is rounded to) when the directory has no processor file
MODEL_DEFAULTS = {
    "dpt": ("inverse", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32),
    "depth_anything": ("inverse", IMAGENET_MEAN, IMAGENET_STD, 14),
    "zoedepth": ("depth", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32),
    "depth_pro": ("canonical_inverse", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1),
}
MAX_DEPTH_M = 300.0  # outputs are clamped to [min_depth_m, MAX_DEPTH_M] (Metric3D's range)


def decanonical_depth(depth_canonical: Tensor, f_px: float | Tensor, canonical_f_px: float = 1000.0) -> Tensor:
    """Metric3D's de-canonicalisation: depth_m = pred · f_px / ``canonical_f_px``, with f_px the focal length in
    pixels **of the resized network input** (a wrong f_px rescales every depth and hence every CoC). [ref-code]"""
    f = torch.as_tensor(f_px, dtype=depth_canonical.dtype, device=depth_canonical.device)
    return depth_canonical * f.reshape(-1, *[1] * (depth_canonical.dim() - 1)) / canonical_f_px


class DepthEstimator(nn.Module):
    """Base class: frozen, eval mode whatever ``train()`` says, differentiable w.r.t. the image when ``grad``."""

    def __init__(self, grad: bool = True, checkpoint: bool = False, min_depth_m: float = 0.05):
        super().__init__()
        self.grad, self.checkpoint, self.min_depth_m = bool(grad), bool(checkpoint), float(min_depth_m)

    def freeze(self) -> DepthEstimator:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def forward(self, image01: Tensor, f_px: float | Tensor | None = None, depth_m: Tensor | None = None) -> Tensor:
        """Depth (B, 1, H, W) in m for ``image01`` (B, 3, H, W) in [0, 1]; ``f_px`` is the focal length in pixels of
        the image as given; ``depth_m`` is a known depth map (used by :class:`GroundTruthDepth` only)."""
        if image01.dim() != 4 or image01.shape[1] != 3:
            raise ValueError(f"depth estimator: image must be (B, 3, H, W) in [0, 1], found {tuple(image01.shape)}")
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            return self.estimate(image01, f_px, depth_m)

    def estimate(self, image01: Tensor, f_px, depth_m) -> Tensor:
        raise NotImplementedError


class GroundTruthDepth(DepthEstimator):
    """The synthetic world's depth map, passed as ``depth_m``: no network, so the image gets no gradient through
    depth. Checks its shape and positivity."""

    def estimate(self, image01: Tensor, f_px, depth_m) -> Tensor:
        want = (image01.shape[0], 1, *image01.shape[-2:])
        if depth_m is None:
            raise ValueError("depth.model ground_truth: pass the sample's depth map as depth_m (the scenes world's "
                             "'depth.npy'); real images need an estimator, e.g. depth.model: transformers")
        if tuple(depth_m.shape) != want:
            raise ValueError(f"depth.model ground_truth: depth_m must be {want} in metres, found "
                             f"{tuple(depth_m.shape)}")
        return depth_m.to(image01.dtype).clamp(min=self.min_depth_m)


class TransformersDepth(DepthEstimator):
    """A transformers ``*ForDepthEstimation`` model as a frozen metric-depth estimator.

    Preprocessing in torch: resize (bilinear, antialiased) to ``size`` (H, W) — with ``keep_aspect_ratio`` the
    scale closest to 1 of the two is used for both sides — rounded to a multiple of ``multiple``, then
    (x − mean) / std. The prediction is resized back to the input size and converted to metres by ``output``
    (module docstring), clamped to [``min_depth_m``, 300 m].
    """

    def __init__(self, model: nn.Module, output: str | None = None, size: tuple[int, int] | int = 384,
                 multiple: int | None = None, keep_aspect_ratio: bool = True, mean=None, std=None,
                 grad: bool = True, checkpoint: bool = True, min_depth_m: float = 0.05):
        super().__init__(grad, checkpoint, min_depth_m)
        mtype = getattr(getattr(model, "config", None), "model_type", "")
        d_out, d_mean, d_std, d_mult = MODEL_DEFAULTS.get(mtype, ("depth", IMAGENET_MEAN, IMAGENET_STD, 1))
        if output is None:
            metric_da = mtype == "depth_anything" and getattr(model.config, "depth_estimation_type", "") == "metric"
            output = "depth" if metric_da else d_out
        if output not in OUTPUTS:
            raise ValueError(f"depth.output: expected one of {list(OUTPUTS)}, found {output!r}")
        self.model, self.output = model, output
        self.size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.multiple, self.keep_aspect_ratio = int(multiple or d_mult), bool(keep_aspect_ratio)
        self.register_buffer("mean", torch.tensor(mean or d_mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or d_std).reshape(1, 3, 1, 1), persistent=False)
        if checkpoint:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"depth.checkpoint: {type(model).__name__} does not support gradient "
                                 "checkpointing; set depth.checkpoint: false")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> TransformersDepth:
        """Load ``AutoModelForDepthEstimation`` from the local directory ``path`` (``local_files_only=True``); its
        ``preprocessor_config.json``, when present, supplies size, mean, std, multiple and keep_aspect_ratio unless
        given in ``kw``."""
        from transformers import AutoModelForDepthEstimation

        path = Path(path)
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else "the directory does not exist"
            raise FileNotFoundError(f"depth.weights: no transformers depth model in {str(path)!r} (expected "
                                    f"config.json + weights, found {found}); save one there with "
                                    "model.save_pretrained(dir) (nothing is downloaded at run time), or set "
                                    "depth.model: ground_truth for the synthetic world")
        model = AutoModelForDepthEstimation.from_pretrained(str(path), local_files_only=True)
        proc = path / "preprocessor_config.json"
        if proc.is_file():
            cfg = json.loads(proc.read_text())
            size = cfg.get("size") or {}
            if isinstance(size, dict) and "height" in size:
                kw.setdefault("size", (size["height"], size["width"]))
            if cfg.get("image_mean") is not None:
                kw.setdefault("mean", tuple(cfg["image_mean"]))
                kw.setdefault("std", tuple(cfg["image_std"]))
            if cfg.get("ensure_multiple_of"):
                kw.setdefault("multiple", cfg["ensure_multiple_of"])
            if "keep_aspect_ratio" in cfg:
                kw.setdefault("keep_aspect_ratio", cfg["keep_aspect_ratio"])
        return cls(model, **kw)

    def train(self, mode: bool = True) -> TransformersDepth:
        """Always eval (dropout off, fixed statistics); with ``checkpoint`` the checkpointed blocks themselves are
        flagged as training, since transformers only recomputes a block whose ``training`` flag is set."""
        super().train(False)
        if self.checkpoint:
            for m in self.model.modules():
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True
        return self

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The network input size for an H × W image."""
        sh, sw = self.size[0] / h, self.size[1] / w
        if self.keep_aspect_ratio:
            sh = sw = sw if abs(1 - sw) < abs(1 - sh) else sh
        m = self.multiple
        return max(m, round(h * sh / m) * m), max(m, round(w * sw / m) * m)

    def estimate(self, image01: Tensor, f_px, depth_m) -> Tensor:
        h, w = image01.shape[-2:]
        dtype = next(self.model.parameters()).dtype
        x = image01.to(dtype)
        size = self.input_size(h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean.to(dtype)) / self.std.to(dtype)
        out = self.model(pixel_values=x)
        pred = out.predicted_depth.unsqueeze(1).float()
        pred = F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=False)
        if self.output == "depth":
            depth = pred
        elif self.output == "inverse":
            depth = 1.0 / pred.clamp(min=1.0 / MAX_DEPTH_M)
        else:  # DepthPro: canonical inverse depth; f_px from the caller, else from the model's field of view
            if f_px is None:
                fov = getattr(out, "field_of_view", None)
                if fov is None:
                    raise ValueError("depth: DepthPro output needs f_px (focal length in pixels of the input image) "
                                     "or a model with its field-of-view head (use_fov_model=True)")
                f_px = 0.5 * w / torch.tan(0.5 * torch.deg2rad(fov.float().reshape(-1)))
            f = torch.as_tensor(f_px, dtype=pred.dtype, device=pred.device).reshape(-1, 1, 1, 1)
            depth = f / (w * pred.clamp(min=1e-4))
        return depth.clamp(self.min_depth_m, MAX_DEPTH_M).to(image01.dtype)


def build_depth_estimator(model: str = "transformers", weights: str | Path | None = None, grad: bool = True,
                          checkpoint: bool = True, **kw) -> DepthEstimator:
    """``depth.model``: ``ground_truth`` (synthetic world) or ``transformers`` (a local directory in ``weights``).
    Metric3D (``metric3d_vit_*``, the spec's default for real runs) is not on PyPI and has no loader here yet."""
    if model == "ground_truth":
        return GroundTruthDepth(grad, False, kw.get("min_depth_m", 0.05))
    if model == "transformers":
        if weights is None:
            raise ValueError("depth.model transformers: set depth.weights to a local model directory")
        return TransformersDepth.from_pretrained(weights, grad=grad, checkpoint=checkpoint, **kw)
    if model.startswith("metric3d"):
        raise NotImplementedError(f"depth.model {model!r}: Metric3D has no loader in ctrlgen yet; use "
                                  "depth.model: transformers with a local DPT / Depth Anything / ZoeDepth / DepthPro "
                                  "directory, or ground_truth")
    raise ValueError(f"depth.model: expected ground_truth, transformers or metric3d_*, found {model!r}")

