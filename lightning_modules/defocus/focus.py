"""Focus predictor (spec shared/specs/defocus.md §7) [design]: from an all-in-focus image and its metric depth, a
saliency map, a focus distance d_f and a focus scale s; and the click-to-focus rule used at inference.

The network is ctrlgen's own small RGB-D transformer (``focus.backbone: rgbd_vit``; the spec's VST / timm ViT-S
backbones need local weights and are not built here): a 4-channel patch embedding of the image and the normalised
inverse depth (1/D divided by its image median: plain depth causes boundary artefacts), a transformer encoder, a
saliency head (per-token logits unfolded to pixels, upsampled to D's size) and a regression query (one cross-attention
layer over the tokens) whose MLP gives (δ_f, δ_s). The prediction is a residual over the saliency-weighted depth:

    d_sal = saliency-weighted median (``focus.baseline: median``) or mean of D,
    d_f = d_sal · R_f^tanh(δ_f),  s = R_s^tanh(δ_s),  R = ``focus.residual_range`` / ``focus.scale_range`` (4),

the multiplicative form of log d_f = log d_sal + log R_f · tanh δ_f. The MLP's last layer is zero-initialised, so at
step 0 d_f equals d_sal exactly and s = 1. There is no f-number input (``focus.exif_inputs``: [] or ["focal"]), so d_f
and s cannot change while N is swept: blur is monotone in N and the focal plane fixed by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import optics

BASELINES = ("median", "mean")
EXIF_INPUTS = ("focal",)


class FocusOutput(NamedTuple):
    focus_m: Tensor  # (B,) focus distance d_f in m
    scale: Tensor  # (B,) focus scale s
    saliency: Tensor  # (B, 1, H, W) in [0, 1] at the depth map's size
    baseline_m: Tensor  # (B,) saliency-weighted depth d_sal
    delta: Tensor  # (B, 2) raw residuals (δ_f, δ_s)


# ----------------------------------------------------------------------------- pure functions
def valid_depth(depth_m: Tensor) -> Tensor:
    """Mask of finite, positive depth."""
    return torch.isfinite(depth_m) & (depth_m > 0)


def weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Per-row weighted median of (B, N) values: the smallest value whose cumulative weight reaches half the total.
    Differentiable w.r.t. the values (through the selected one), piecewise constant in the weights."""
    v, order = values.sort(dim=1)
    cw = weights.gather(1, order).cumsum(dim=1)
    k = (cw < 0.5 * cw[:, -1:]).sum(dim=1, keepdim=True).clamp(max=values.shape[1] - 1)
    return v.gather(1, k).squeeze(1)


def saliency_weighted_depth(depth_m: Tensor, saliency: Tensor, baseline: str = "median") -> Tensor:
    """d_sal (B,): the ``median`` or ``mean`` of depth (B, 1, H, W) weighted by saliency (same shape) over valid
    depth. [design] ``focus.baseline``"""
    if baseline not in BASELINES:
        raise ValueError(f"focus.baseline: expected one of {list(BASELINES)}, found {baseline!r}")
    ok = valid_depth(depth_m).flatten(1)
    d = torch.where(ok, depth_m.flatten(1), torch.full_like(depth_m.flatten(1), math.inf))
    w = torch.where(ok, saliency.flatten(1).to(d.dtype) + 1e-12, torch.zeros_like(d))
    if baseline == "median":
        return weighted_median(d, w)
    return (w * torch.where(ok, d, torch.zeros_like(d))).sum(1) / w.sum(1).clamp(min=1e-12)


def normalised_inverse_depth(depth_m: Tensor, min_depth_m: float = optics.MIN_DEPTH_M,
                             max_ratio: float = 10.0) -> Tensor:
    """1/D divided by its per-image median over valid depth, clamped to [0, ``max_ratio``]; invalid depth → 0."""
    ok = valid_depth(depth_m)
    inv = torch.where(ok, 1.0 / depth_m.clamp(min=min_depth_m), torch.zeros_like(depth_m))
    flat = torch.where(ok, inv, torch.full_like(inv, math.nan)).flatten(1)
    med = torch.nanmedian(flat, dim=1).values.nan_to_num(1.0).clamp(min=1e-6)
    return (inv / med.reshape(-1, 1, 1, 1)).clamp(0.0, max_ratio)


def focus_regulariser(out: FocusOutput, reg_f: float = 1e-3, reg_s: float = 1e-3) -> Tensor:
    """λ_f · δ_f² + λ_s · (log s)², batch mean. [design] ``focus.reg_f``, ``focus.reg_s``"""
    return (reg_f * out.delta[:, 0] ** 2 + reg_s * out.scale.log() ** 2).mean()


def click_focus_m(depth_m: Tensor, x: float, y: float, window: int = 5,
                  display_size: tuple[int, int] | None = None) -> float:
    """Click-to-focus: the median of the valid depth in a ``window`` × ``window`` box (clipped at the borders) around
    the clicked pixel (column ``x``, row ``y``) of a depth map (H, W), (1, H, W) or (1, 1, H, W). ``display_size``
    (width, height) maps a click on a displayed image of another size to the depth map. An even number of valid
    values gives the lower median. [design] spec §7: 5 × 5."""
    d = depth_m.detach()
    while d.dim() > 2:
        if d.shape[0] != 1:
            raise ValueError(f"click_focus_m: one depth map expected, found shape {tuple(depth_m.shape)}")
        d = d[0]
    h, w = d.shape
    if display_size is not None:
        x, y = x * w / display_size[0], y * h / display_size[1]
    col, row = math.floor(x), math.floor(y)
    if not (0 <= col < w and 0 <= row < h):
        raise ValueError(f"click_focus_m: click ({x:g}, {y:g}) outside the {w}x{h} depth map")
    half = max(window, 1) // 2
    box = d[max(row - half, 0):row + half + 1, max(col - half, 0):col + half + 1].flatten()
    box = box[valid_depth(box)]
    if box.numel() == 0:
        raise ValueError(f"click_focus_m: no valid depth in the {window}x{window} window at ({col}, {row}); click "
                         "elsewhere or use a larger window")
    return float(box.median())


# ----------------------------------------------------------------------------- network
class FocusPredictor(nn.Module):
    """RGB-D transformer → saliency, d_f, s (module docstring). Knobs [design]: ``input_res`` (224 in the spec;
    32–64 for CPU tests), ``patch``, ``dim``, ``layers``, ``heads``, ``baseline``, ``residual_range``,
    ``scale_range``, ``exif_inputs``, ``min_focus_m`` (d_f is clamped to it; the renderer applies the full §2
    guard)."""

    def __init__(self, input_res: int = 224, patch: int = 16, dim: int = 192, layers: int = 4, heads: int = 4,
                 baseline: str = "median", residual_range: float = 4.0, scale_range: float = 4.0,
                 exif_inputs: Sequence[str] = (), min_focus_m: float = optics.MIN_FOCUS_M):
        super().__init__()
        if input_res % patch:
            raise ValueError(f"focus.input_res {input_res} must be a multiple of the patch size {patch}")
        if baseline not in BASELINES:
            raise ValueError(f"focus.baseline: expected one of {list(BASELINES)}, found {baseline!r}")
        bad = [e for e in exif_inputs if e not in EXIF_INPUTS]
        if bad:
            raise ValueError(f"focus.exif_inputs: only {list(EXIF_INPUTS)} allowed, found {bad}; the f-number is "
                             "never an input, so d_f and s stay fixed while N is swept")
        if residual_range <= 1 or scale_range <= 1:
            raise ValueError(f"focus.residual_range and focus.scale_range must be > 1, found {residual_range}, "
                             f"{scale_range}")
        self.input_res, self.patch, self.baseline = int(input_res), int(patch), baseline
        self.residual_range, self.scale_range = float(residual_range), float(scale_range)
        self.exif_inputs, self.min_focus_m = tuple(exif_inputs), float(min_focus_m)
        n_tok = (input_res // patch) ** 2
        self.embed = nn.Conv2d(4, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02)
        self.focal_embed = nn.Linear(1, dim) if "focal" in self.exif_inputs else None
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.saliency_head = nn.Linear(dim, patch * patch)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def saliency_parameters(self) -> list[nn.Parameter]:
        """The saliency decoder's parameters (frozen for ``focus.freeze_saliency_steps`` by the training module)."""
        return list(self.saliency_head.parameters())

    def forward(self, image01: Tensor, depth_m: Tensor, focal35_mm: float | Tensor | None = None) -> FocusOutput:
        """image (B, 3, H, W) in [0, 1], depth (B, 1, H', W') in m; ``focal35_mm`` only with exif_inputs [focal]."""
        if image01.dim() != 4 or image01.shape[1] != 3 or depth_m.dim() != 4 or depth_m.shape[1] != 1 \
                or depth_m.shape[0] != image01.shape[0]:
            raise ValueError(f"focus: expected image (B, 3, H, W) and depth (B, 1, H, W), found "
                             f"{tuple(image01.shape)} and {tuple(depth_m.shape)}")
        b, res, p = image01.shape[0], self.input_res, self.patch
        img = F.interpolate(image01, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        inv = F.interpolate(normalised_inverse_depth(depth_m), size=(res, res), mode="bilinear", align_corners=False)
        tok = self.embed(torch.cat([img * 2 - 1, inv - 1], dim=1).to(self.pos.dtype)).flatten(2).transpose(1, 2)
        tok = tok + self.pos
        if self.focal_embed is not None:
            if focal35_mm is None:
                raise ValueError("focus: exif_inputs [focal] needs focal35_mm")
            f = torch.as_tensor(focal35_mm, dtype=tok.dtype, device=tok.device).reshape(-1, 1).expand(b, 1)
            tok = torch.cat([tok, self.focal_embed((torch.log2(f) - math.log2(50.0)) / 2.0)[:, None]], dim=1)
        tok = self.norm(self.encoder(tok))
        n = (res // p) ** 2
        logits = self.saliency_head(tok[:, :n]).transpose(1, 2)  # (B, p², tokens)
        logits = F.fold(logits, (res, res), kernel_size=p, stride=p)  # (B, 1, res, res)
        logits = F.interpolate(logits, size=depth_m.shape[-2:], mode="bilinear", align_corners=False)
        saliency = torch.sigmoid(logits)
        base = saliency_weighted_depth(depth_m, saliency, self.baseline)
        q, _ = self.cross(self.query.expand(b, -1, -1), tok, tok, need_weights=False)
        delta = self.mlp(q[:, 0])
        focus = base * torch.pow(self.residual_range, torch.tanh(delta[:, 0]))
        scale = torch.pow(self.scale_range, torch.tanh(delta[:, 1]))
        return FocusOutput(focus.clamp(min=self.min_focus_m), scale, saliency, base, delta)
