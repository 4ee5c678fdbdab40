"""Thin-lens optics in explicit units (spec shared/specs/defocus.md §2): circle of confusion, signed blur radius in
pixels, the guards on focus distance and depth, and the 35 mm-equivalent / crop-factor conversions.

Units: depth ``d`` and focus distance ``d_f`` in metres (converted to mm inside), focal length ``f`` in mm as the
35 mm-equivalent value, f-number ``N`` unitless, sensor width in mm, image width in pixels. Every function takes floats
or tensors (broadcast together) and is differentiable w.r.t. every tensor argument.

The circle-of-confusion formula is Potmesil & Chakravarty's thin lens, c = f² |d − d_f| / (N (d_f − f) d) (a diameter on
the sensor, lengths in mm). [design] The paper's own equation is not public: the formula, the 36 mm sensor assumption,
the pixel conversion c_px = s · c_mm · W_px / w_sensor and the meaning of the focus scale s (a factor on c_px that
absorbs the unknown sensor/pixel scale and the monocular depth-scale error) are ctrlgen's choices
(``lens.sensor_width_mm``, ``lens.min_focus_m``, ``lens.min_depth_m``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FULL_FRAME_WIDTH_MM = 36.0  # [design] lens.sensor_width_mm: every focal length is a 35 mm-equivalent one
MIN_FOCUS_M = 0.3  # [design] lens.min_focus_m: d_f ≥ max(1.5 f, 0.3 m)
MIN_DEPTH_M = 0.05  # [design] lens.min_depth_m: d ≥ 0.05 m
RADIUS_REF_WIDTH_PX = 1024  # [design] lens.max_radius_px is stated at this image width and scales with W_px / 1024

# EXIF FocalPlaneResolutionUnit (0xA210) → millimetres per unit: 2 = inch, 3 = cm, 4 = mm (real files use all three)
FOCAL_PLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0}

Number = float | Tensor


def _t(x: Number) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(float(x), dtype=torch.float64)


def guard_focus_m(focus_m: Number, focal_mm: Number, min_focus_m: float = MIN_FOCUS_M) -> Tensor:
    """Focus distance clamped to d_f ≥ max(1.5 f, ``min_focus_m``) (m); keeps d_f − f > 0 so the CoC stays finite."""
    focus_m, focal_mm = _t(focus_m), _t(focal_mm)
    floor = torch.clamp(1.5e-3 * focal_mm, min=min_focus_m)
    return torch.maximum(focus_m, floor.to(focus_m.dtype))


def guard_depth_m(depth_m: Number, min_depth_m: float = MIN_DEPTH_M) -> Tensor:
    """Depth clamped to d ≥ ``min_depth_m`` (m); +inf (sky) passes through and means the far limit."""
    return torch.clamp(_t(depth_m), min=min_depth_m)


def coc_mm(depth_m: Number, fnumber: Number, focal_mm: Number, focus_m: Number, guard: bool = True) -> Tensor:
    """Circle-of-confusion diameter on the sensor in mm: c = f² |d − d_f| / (N (d_f − f) d).

    Written as c = f² / (N (d_f − f)) · |1 − d_f / d| so that d = inf gives the bounded far limit f² / (N (d_f − f)).
    ``guard`` applies :func:`guard_focus_m` and :func:`guard_depth_m` first.
    """
    if guard:
        focus_m, depth_m = guard_focus_m(focus_m, focal_mm), guard_depth_m(depth_m)
    d, d_f, f, n = _t(depth_m), _t(focus_m) * 1e3, _t(focal_mm), _t(fnumber)
    return f * f / (n * (d_f - f)) * torch.abs(1.0 - d_f / (d * 1e3))


def px_per_mm(width_px: Number, sensor_width_mm: Number = FULL_FRAME_WIDTH_MM) -> Tensor:
    """Pixels per sensor millimetre for an image ``width_px`` wide: W_px / w_sensor."""
    return _t(width_px) / _t(sensor_width_mm)


def signed_radius_px(depth_m: Number, fnumber: Number, focal_mm: Number, focus_m: Number, width_px: Number,
                     scale: Number = 1.0, sensor_width_mm: Number = FULL_FRAME_WIDTH_MM, guard: bool = True,
                     min_focus_m: float = MIN_FOCUS_M, min_depth_m: float = MIN_DEPTH_M) -> Tensor:
    """Signed blur-disk radius in pixels: r = s · (W_px / w_sensor) · f² / (2 N (d_f − f)) · (1 − d_f / d).

    Negative in front of the focal plane, positive behind it, zero at d = d_f, and increasing in d, so sorting by r
    sorts by depth. |r| is half of :func:`coc_px`. ``width_px`` is the width of the image being rendered (recompute it
    when rendering at a lower resolution). [design]
    """
    if guard:
        focus_m, depth_m = guard_focus_m(focus_m, focal_mm, min_focus_m), guard_depth_m(depth_m, min_depth_m)
    d, d_f, f, n = _t(depth_m), _t(focus_m) * 1e3, _t(focal_mm), _t(fnumber)
    gain = _t(scale) * px_per_mm(width_px, sensor_width_mm) * f * f / (2.0 * n * (d_f - f))
    return gain * (1.0 - d_f / (d * 1e3))


def coc_px(depth_m: Number, fnumber: Number, focal_mm: Number, focus_m: Number, width_px: Number,
           scale: Number = 1.0, sensor_width_mm: Number = FULL_FRAME_WIDTH_MM, guard: bool = True) -> Tensor:
    """Circle-of-confusion diameter in pixels: c_px = s · c_mm · W_px / w_sensor (= 2 |r|). [design]"""
    return 2.0 * torch.abs(signed_radius_px(depth_m, fnumber, focal_mm, focus_m, width_px, scale, sensor_width_mm,
                                            guard))


def depth_for_radius_m(radius_px: Number, fnumber: Number, focal_mm: Number, focus_m: Number, width_px: Number,
                       scale: Number = 1.0, sensor_width_mm: Number = FULL_FRAME_WIDTH_MM) -> Tensor:
    """Inverse of :func:`signed_radius_px` in d (no guards): the depth in m whose signed radius is ``radius_px``.

    d = d_f / (1 − r / g) with g the far-limit radius; r ≥ g has no finite depth and returns +inf.
    """
    g = signed_radius_px(math.inf, fnumber, focal_mm, focus_m, width_px, scale, sensor_width_mm, guard=False)
    ratio = 1.0 - _t(radius_px) / g
    return torch.where(ratio > 0, _t(focus_m) / ratio.clamp(min=1e-300), torch.full_like(ratio, math.inf))


def max_radius_at_width(max_radius_px: float, width_px: int, ref_width_px: int = RADIUS_REF_WIDTH_PX) -> float:
    """Radius clamp R in pixels for an image ``width_px`` wide when ``max_radius_px`` is stated at ``ref_width_px``."""
    return float(max_radius_px) * float(width_px) / float(ref_width_px)


# ----------------------------------------------------------------------------- 35 mm equivalents and crop factors
def crop_factor(sensor_width_mm: Number) -> Tensor:
    """Crop factor of a sensor ``sensor_width_mm`` wide relative to full frame (36 mm)."""
    return FULL_FRAME_WIDTH_MM / _t(sensor_width_mm)


def focal35_from_focal(focal_mm: Number, sensor_width_mm: Number) -> Tensor:
    """35 mm-equivalent focal length of a lens of true focal length ``focal_mm`` on a sensor ``sensor_width_mm``
    wide."""
    return _t(focal_mm) * crop_factor(sensor_width_mm)


def focal_from_focal35(focal35_mm: Number, sensor_width_mm: Number) -> Tensor:
    """True focal length on a sensor ``sensor_width_mm`` wide that gives the 35 mm-equivalent ``focal35_mm``."""
    return _t(focal35_mm) / crop_factor(sensor_width_mm)


def sensor_width_from_focal_plane(pixel_x_dimension: float, focal_plane_x_resolution: float, unit: int) -> float:
    """Sensor width in mm from EXIF PixelXDimension, FocalPlaneXResolution (pixels per unit) and its unit code.

    ``unit`` is FocalPlaneResolutionUnit: 2 = inch, 3 = cm, 4 = mm. The value is only meaningful when
    PixelXDimension is the width the camera wrote (a resized file keeps the original resolution tag).
    """
    if unit not in FOCAL_PLANE_UNIT_MM:
        raise ValueError(f"FocalPlaneResolutionUnit: expected one of {sorted(FOCAL_PLANE_UNIT_MM)} (2 = inch, 3 = cm, "
                         f"4 = mm), found {unit!r}; treat the crop-factor fallback as unavailable for this file")
    if not (pixel_x_dimension > 0 and focal_plane_x_resolution > 0):
        raise ValueError(f"PixelXDimension and FocalPlaneXResolution must be > 0, found {pixel_x_dimension!r} and "
                         f"{focal_plane_x_resolution!r}; treat the crop-factor fallback as unavailable for this file")
    return float(pixel_x_dimension) / float(focal_plane_x_resolution) * FOCAL_PLANE_UNIT_MM[unit]


def focal35_after_crop(focal35_mm: Number, width_before_px: Number, width_after_px: Number) -> Tensor:
    """35 mm-equivalent focal length after cropping an image from ``width_before_px`` to ``width_after_px``.

    A crop narrows the field of view like a longer lens: f35 · W_before / W_after. Resizing does not change it. [design]
    """
    return _t(focal35_mm) * _t(width_before_px) / _t(width_after_px)


def focal_px(focal35_mm: Number, width_px: Number, sensor_width_mm: Number = FULL_FRAME_WIDTH_MM) -> Tensor:
    """Focal length in pixels of an image ``width_px`` wide: f_px = f35 · W_px / 36 (the intrinsics a metric depth
    estimator needs for a generated image, spec §6). [design]"""
    return _t(focal35_mm) * px_per_mm(width_px, sensor_width_mm)
