"""Defocus: EXIF-controlled defocus blur (spec shared/specs/defocus.md).

Optics (pure functions): optics.py (thin-lens circle of confusion in explicit units, guards, 35 mm-equivalent and
crop-factor conversions), kernels.py (level grid, soft assignment, disk/Gaussian kernels, direct/FFT convolution),
render.py (the differentiable renderers behind one interface: ``LayeredThinLens``, ``GaussianLayered``,
``GatherReference``; ``render(image, depth_m, Lens(...), method=...)``).
"""
from .kernels import assign, assign_linear, assign_softmax, conv_same, disk_kernel, gaussian_kernel, level_grid
from .optics import (
    FULL_FRAME_WIDTH_MM,
    coc_mm,
    coc_px,
    crop_factor,
    depth_for_radius_m,
    focal35_after_crop,
    focal35_from_focal,
    focal_from_focal35,
    focal_px,
    guard_depth_m,
    guard_focus_m,
    max_radius_at_width,
    px_per_mm,
    sensor_width_from_focal_plane,
    signed_radius_px,
)
from .render import (
    RENDERERS,
    GatherReference,
    GaussianLayered,
    LayeredThinLens,
    Lens,
    LensRenderer,
    RenderResult,
    from_linear,
    make_renderer,
    render,
    to_linear,
)
