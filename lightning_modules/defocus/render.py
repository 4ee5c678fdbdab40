"""Differentiable thin-lens defocus renderers in pure torch (spec shared/specs/defocus.md §3) [design].

Every renderer has one interface, ``renderer.render(image, depth_m, fnumber, focal_mm, focus_m, scale) -> image``:
image (B, 3, H, W) in [0, 1] (sRGB-encoded), depth (B, 1, H, W) in metres, the lens parameters floats or (B,) tensors
(f-number, 35 mm-equivalent focal length in mm, focus distance in m, focus scale). Each renderer

1. linearises the image (x = image^γ, ``lens.gamma``: 2.2, 1.0 = off, or ``"srgb"`` for the exact IEC 61966-2-1 curve),
2. computes the signed radius map r (optics.signed_radius_px at the rendered width) and clamps it to ±R,
   R = ``lens.max_radius_px`` · W_px / ``ref_width_px`` (32 px at 1024 px),
3. blurs in linear light (the part that differs between renderers) and re-encodes clamp(x, 0, 1)^(1/γ).

Computation runs in float32 (float64 when the image or depth is float64) with autocast disabled, so bf16 autocast in
the caller never reaches the lens; the result has that dtype. Gradients flow to the image, the depth and all four
lens parameters.

Renderers: :class:`LayeredThinLens` (the training renderer: soft assignment of pixels to blur levels, anti-aliased
disk kernels, back-to-front occlusion compositing), :class:`GaussianLayered` (same layering, Gaussian kernels: the
"other lens module" ablation) and :class:`GatherReference` (brute force, per-pixel disks, no occlusion; for small test
images and the benchmark). :func:`render` selects one by name with a :class:`Lens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels as K
from . import optics

GAMMA_DEFAULT = 2.2  # [design] lens.gamma; BokehMe also blurs in gamma-2.2 space
OCCLUSION = ("nonadjacent", "over")
_ENC_EPS = 1e-9  # below this linear value the power-law encoder continues as a line (finite gradient at 0)


@dataclass
class Lens:
    """Lens parameters of a render, each a float or a (B,) tensor: f-number N, 35 mm-equivalent focal length (mm),
    focus distance d_f (m) and the focus scale s (a factor on the blur radius in pixels). [design]"""

    fnumber: float | Tensor
    focal_mm: float | Tensor
    focus_m: float | Tensor
    scale: float | Tensor = 1.0


class RenderResult(NamedTuple):
    image: Tensor  # (B, 3, H, W) in [0, 1]
    radius: Tensor  # (B, 1, H, W) signed radius in px after the clamp to ±R
    clamped_fraction: Tensor  # (B,) share of pixels whose |r| exceeded R


# ----------------------------------------------------------------------------- transfer functions
def to_linear(image: Tensor, gamma: float | str = GAMMA_DEFAULT) -> Tensor:
    """sRGB-encoded values in [0, 1] (clamped) → linear light: v^γ, or the exact sRGB curve for ``gamma="srgb"``."""
    v = image.clamp(0.0, 1.0)
    if gamma == "srgb":
        return torch.where(v <= 0.04045, v / 12.92, ((v.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)
    return v if float(gamma) == 1.0 else v ** float(gamma)


def from_linear(x: Tensor, gamma: float | str = GAMMA_DEFAULT) -> Tensor:
    """Linear light → encoded values: clamp(x, 0, 1)^(1/γ) (or the sRGB curve), with finite gradients at 0."""
    x = x.clamp(0.0, 1.0)
    if gamma == "srgb":
        return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
    g = float(gamma)
    if g == 1.0:
        return x
    return torch.where(x > _ENC_EPS, x.clamp(min=_ENC_EPS) ** (1.0 / g), x * _ENC_EPS ** (1.0 / g - 1.0))


def _check_gamma(gamma: float | str) -> float | str:
    if gamma == "srgb":
        return gamma
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        g = -1.0
    if not g > 0:
        raise ValueError(f"lens.gamma: expected a positive number (2.2; 1.0 disables) or 'srgb', found {gamma!r}")
    return g


# ----------------------------------------------------------------------------- common interface
class LensRenderer:
    """Shared part of every renderer: input checks, fp32 island, radius map and clamp, gamma. Subclasses implement
    :meth:`blur_linear`. Knobs (spec §14 ``lens.*``) [design]: ``sensor_width_mm`` 36, ``gamma`` 2.2,
    ``max_radius_px`` 32 stated at ``ref_width_px`` 1024, ``min_focus_m`` 0.3, ``min_depth_m`` 0.05."""

    def __init__(self, sensor_width_mm: float = optics.FULL_FRAME_WIDTH_MM, gamma: float | str = GAMMA_DEFAULT,
                 max_radius_px: float = 32.0, ref_width_px: int = optics.RADIUS_REF_WIDTH_PX,
                 min_focus_m: float = optics.MIN_FOCUS_M, min_depth_m: float = optics.MIN_DEPTH_M):
        if not sensor_width_mm > 0 or not max_radius_px >= 0 or not ref_width_px > 0:
            raise ValueError(f"lens: sensor_width_mm and ref_width_px must be > 0 and max_radius_px ≥ 0, found "
                             f"{sensor_width_mm}, {ref_width_px}, {max_radius_px}")
        self.sensor_width_mm = float(sensor_width_mm)
        self.gamma = _check_gamma(gamma)
        self.max_radius_px = float(max_radius_px)
        self.ref_width_px = int(ref_width_px)
        self.min_focus_m = float(min_focus_m)
        self.min_depth_m = float(min_depth_m)

    def max_radius(self, width_px: int) -> float:
        """Radius clamp R in px for an image ``width_px`` wide."""
        return optics.max_radius_at_width(self.max_radius_px, width_px, self.ref_width_px)

    def radius_map(self, depth_m: Tensor, fnumber, focal_mm, focus_m, scale=1.0, width_px: int | None = None) -> Tensor:
        """Unclamped signed radius map (B, 1, H, W) in px at the rendered width (default: the depth map's width)."""
        b, w = depth_m.shape[0], depth_m.shape[-1] if width_px is None else width_px
        p = [_param(v, b, depth_m, name) for v, name in
             ((fnumber, "fnumber"), (focal_mm, "focal_mm"), (focus_m, "focus_m"), (scale, "scale"))]
        return optics.signed_radius_px(depth_m, p[0], p[1], p[2], float(w), p[3], self.sensor_width_mm,
                                       min_focus_m=self.min_focus_m, min_depth_m=self.min_depth_m)

    def render_full(self, image: Tensor, depth_m: Tensor, fnumber, focal_mm, focus_m, scale=1.0) -> RenderResult:
        """Render and also return the clamped radius map and the clamped fraction per image."""
        _check_inputs(image, depth_m)
        dtype = torch.float64 if torch.float64 in (image.dtype, depth_m.dtype) else torch.float32
        with torch.autocast(device_type=image.device.type, enabled=False):
            image, depth_m = image.to(dtype), depth_m.to(dtype)
            r = self.radius_map(depth_m, fnumber, focal_mm, focus_m, scale)
            big = self.max_radius(image.shape[-1])
            clamped = (r.abs() > big).to(dtype).mean(dim=(1, 2, 3))
            r = r.clamp(-big, big)
            out = from_linear(self.blur_linear(to_linear(image, self.gamma), r, big), self.gamma)
        return RenderResult(out, r, clamped)

    def render(self, image: Tensor, depth_m: Tensor, fnumber, focal_mm, focus_m, scale=1.0) -> Tensor:
        """Defocused image (B, 3, H, W) in [0, 1]."""
        return self.render_full(image, depth_m, fnumber, focal_mm, focus_m, scale).image

    __call__ = render

    def blur_linear(self, x: Tensor, r: Tensor, max_radius: float) -> Tensor:
        """Blur linear-light x (B, 3, H, W) by the clamped signed radius map r (B, 1, H, W)."""
        raise NotImplementedError


def _param(value, batch: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0 or (t.dim() == 1 and t.numel() in (1, batch)):
        return t.reshape(-1, 1, 1, 1)
    raise ValueError(f"lens parameter {name}: expected a float or a ({batch},) tensor for a batch of {batch}, found "
                     f"shape {tuple(t.shape)}; pass one value per image")


def _check_inputs(image: Tensor, depth_m: Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"render: image must be (B, 3, H, W) in [0, 1], found shape {tuple(image.shape)}; "
                         "convert it with image.permute(0, 3, 1, 2) or add the batch dimension")
    if depth_m.dim() != 4 or depth_m.shape[1] != 1 or depth_m.shape[0] != image.shape[0] \
            or depth_m.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"render: depth must be (B, 1, H, W) = {(image.shape[0], 1, *image.shape[-2:])} in metres "
                         f"to match the image, found {tuple(depth_m.shape)}; resize it or add the channel dimension "
                         "with depth.unsqueeze(1)")


# ----------------------------------------------------------------------------- layered renderers
class LayeredThinLens(LensRenderer):
    """Layered gather renderer (spec §3) [design]. Pixels are softly assigned to signed levels ρ_k (``levels``,
    ``level_ratio``, ``level_step``, ``assign``); per level the premultiplied colour α_k·x and the coverage α_k are
    convolved with the level's kernel (``kernel_edge``; FFT above ``fft_above_px`` when ``conv`` is auto, by default
    kernels.default_fft_above_px), giving P̂_k and α̂_k, and composited back to front from the farthest level
    (largest ρ) to the nearest; the result C / max(A, 1e-6) removes border darkening. Gradients w.r.t. r flow only
    through α (kernels are fixed per level). Cost: L · 4 channel convolutions per image.

    ``occlusion`` (``lens.occlusion``) picks the compositing rule:

    * ``nonadjacent`` (default): layer k occludes what lies two or more levels behind it with (1 − α̂_k) and adds to
      the level directly behind it. A pixel between two levels has weight in both, so those two layers are one
      surface: occluding one by the other would weight the nearer level by α_k / (1 − α_k α_{k+1}) instead of α_k,
      making a uniform plane at r = +10.13 px and one at −10.13 px render differently (0.02 max abs at f/1.8 and 1 m
      vs ∞) and biasing every off-level radius toward the nearer level. The rule is continuous in r; a surface hides
      another from a level-spacing of depth difference on, fully from two.
    * ``over``: plain "over" of each layer on everything behind it, C ← P̂_k + (1 − α̂_k)·C, A ← α̂_k + (1 − α̂_k)·A
      (spec §3 step 7 as written; exact only for radii on the levels).
    """

    def __init__(self, levels: str | list[float] = "geometric", level_ratio: float = 1.414, level_step: float = 1.0,
                 assign: str = "linear", kernel_edge: str = "linear", conv: str = "auto",
                 fft_above_px: float | None = None, occlusion: str = "nonadjacent", **common):
        super().__init__(**common)
        K._check("assign", assign, K.ASSIGN)
        K._check("kernel_edge", kernel_edge, K.KERNEL_EDGES)
        K._check("conv", conv, K.CONV_MODES)
        K._check("occlusion", occlusion, OCCLUSION)
        K.level_grid(1.0, levels, level_ratio, level_step)  # validates the grid knobs now, not at the first render
        self.levels, self.level_ratio, self.level_step = levels, float(level_ratio), float(level_step)
        self.assign, self.kernel_edge, self.conv, self.occlusion = assign, kernel_edge, conv, occlusion
        self.fft_above_px = None if fft_above_px is None else float(fft_above_px)
        self._cache: dict[tuple, Tensor] = {}

    def grid(self, max_radius: float) -> list[float]:
        """The signed levels used for a radius clamp ``max_radius``."""
        return K.level_grid(max_radius, self.levels, self.level_ratio, self.level_step)

    def make_kernel(self, rho: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        return K.disk_kernel(rho, self.kernel_edge, dtype, device)

    def kernel(self, rho: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The level's kernel, built once per (|ρ|, dtype, device)."""
        key = ("k", abs(rho), dtype, str(device))
        if key not in self._cache:
            self._cache[key] = self.make_kernel(rho, dtype, device)
        return self._cache[key]

    def spectrum(self, rho: float, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The level's kernel spectrum for an H × W map, built once per (|ρ|, H, W, dtype, device)."""
        key = ("s", abs(rho), h, w, dtype, str(device))
        if key not in self._cache:
            kern = self.kernel(rho, dtype, device)
            self._cache[key] = K.kernel_spectrum(kern, K.fft_size(h, w, kern.shape[-1]))
        return self._cache[key]

    def _blur_level(self, plane: Tensor, rho: float) -> Tensor:
        kern = self.kernel(rho, plane.dtype, plane.device)
        above = K.default_fft_above_px(plane.device) if self.fft_above_px is None else self.fft_above_px
        if kern.shape[-1] > 1 and (self.conv == "fft" or (self.conv == "auto" and abs(rho) > above)):
            return K.conv_fft(plane, kern, self.spectrum(rho, *plane.shape[-2:], plane.dtype, plane.device))
        return K.conv_direct(plane, kern)

    def blur_linear(self, x: Tensor, r: Tensor, max_radius: float) -> Tensor:
        rho = self.grid(max_radius)
        alpha = K.assign(r, rho, self.assign)  # (B, L, H, W)
        behind = x.new_zeros(x.shape[0], 4, *x.shape[-2:])  # levels ≥ k + 2 (nonadjacent) or > k (over)
        adjacent = torch.zeros_like(behind)  # level k + 1 (nonadjacent only)
        for k in reversed(range(len(rho))):  # farthest (largest ρ) first
            a = alpha[:, k:k + 1]
            plane = self._blur_level(torch.cat([x * a, a], dim=1), rho[k])  # (P̂_k, α̂_k)
            if self.occlusion == "over":
                behind = plane + (1.0 - plane[:, 3:]) * behind
            else:
                behind, adjacent = (1.0 - plane[:, 3:]) * behind + adjacent, plane
        out = behind + adjacent
        return out[:, :3] / out[:, 3:].clamp(min=1e-6)


class GaussianLayered(LayeredThinLens):
    """:class:`LayeredThinLens` with Gaussian kernels of σ = |ρ|/2 = c_px/4 instead of disks (``kernel_edge`` is
    unused): the smooth-PSF ablation ("other lens module"). [design]"""

    def make_kernel(self, rho: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        return K.gaussian_kernel(rho, dtype, device)


# ----------------------------------------------------------------------------- brute-force reference
class GatherReference(LensRenderer):
    """Brute-force reference, O(H·W·R²): every source pixel j spreads x_j over its own anti-aliased disk of radius
    |r_j| (the exact per-pixel radius, no levels), normalised by that disk's area; the output is the spread colour
    divided by the spread weight (which removes border darkening as the layered renderer's A does). No occlusion
    ordering, so it agrees with the layered renderer only on depth without discontinuities. Meant for ≤ 64² test
    images and the benchmark; autograd memory grows with (2⌈R⌉ + 3)² saved maps. [design]"""

    def __init__(self, kernel_edge: str = "linear", **common):
        super().__init__(**common)
        K._check("kernel_edge", kernel_edge, K.KERNEL_EDGES)
        self.kernel_edge = kernel_edge

    def _profile(self, a: Tensor, dist: float) -> Tensor:
        if self.kernel_edge == "linear":
            return (a + 0.5 - dist).clamp(0.0, 1.0)
        return 0.5 + 0.5 * torch.tanh(4.0 * (a - dist))

    def blur_linear(self, x: Tensor, r: Tensor, max_radius: float) -> Tensor:
        b, _, h, w = x.shape
        half = math.ceil(max_radius) + 1
        a = r.abs()
        offsets = [(dy, dx, math.hypot(dy, dx)) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]
        if self.kernel_edge == "linear":  # offsets beyond R + 0.5 carry zero weight for every pixel
            offsets = [o for o in offsets if o[2] < max_radius + 0.5 or o[2] == 0]
        area = sum(self._profile(a, d) for _, _, d in offsets)
        src = torch.cat([x, torch.ones_like(a)], dim=1) / area
        out = x.new_zeros(b, 4, h + 2 * half, w + 2 * half)
        for dy, dx, d in offsets:  # source at p lands on p + (dy, dx)
            out[:, :, half + dy:half + dy + h, half + dx:half + dx + w] += src * self._profile(a, d)
        out = out[:, :, half:half + h, half:half + w]
        return out[:, :3] / out[:, 3:].clamp(min=1e-6)


RENDERERS = {"layered": LayeredThinLens, "gaussian": GaussianLayered, "gather": GatherReference}


def make_renderer(method: str = "layered", **knobs) -> LensRenderer:
    """A renderer by name (``layered`` | ``gaussian`` | ``gather``) with its ``lens.*`` knobs."""
    if method not in RENDERERS:
        raise ValueError(f"render method: expected one of {list(RENDERERS)}, found {method!r}")
    return RENDERERS[method](**knobs)


def render(image: Tensor, depth_m: Tensor, lens: Lens, method: str = "layered", full: bool = False, **knobs):
    """Render ``image`` with ``depth_m`` through ``lens`` by the named renderer; ``full`` returns a RenderResult.
    Builds a renderer per call: for repeated renders keep one from :func:`make_renderer` (it caches its kernels and
    their spectra)."""
    result = make_renderer(method, **knobs).render_full(image, depth_m, lens.fnumber, lens.focal_mm, lens.focus_m,
                                                        lens.scale)
    return result if full else result.image
