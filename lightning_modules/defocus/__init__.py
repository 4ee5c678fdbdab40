"""Defocus: EXIF-controlled defocus blur (spec shared/specs/defocus.md).

Optics (pure functions): optics.py (thin-lens circle of confusion in explicit units, guards, 35 mm-equivalent and
crop-factor conversions), kernels.py (level grid, soft assignment, disk/Gaussian kernels, direct/FFT convolution),
render.py (the differentiable renderers behind one interface: ``LayeredThinLens``, ``GaussianLayered``,
``GatherReference``; ``render(image, depth_m, Lens(...), method=...)``).

Data, depth and focus: exif.py (camera record from the original file bytes, shallow/deep split, the EXIF encoding
for the networks), depth.py (frozen, differentiable metric-depth estimators: transformers models from a local
directory, ground truth), focus.py (the RGB-D focus predictor and the click-to-focus rule).
"""
from .depth import (
    DepthEstimator,
    GroundTruthDepth,
    TransformersDepth,
    build_depth_estimator,
    decanonical_depth,
)
from .exif import (
    ExifEmbedding,
    after_crop,
    dof_split,
    exif_code,
    fourier_features,
    read_exif,
)
from .focus import (
    FocusOutput,
    FocusPredictor,
    click_focus_m,
    focus_regulariser,
    saliency_weighted_depth,
)
from .kernels import (
    assign,
    assign_linear,
    assign_softmax,
    conv_same,
    disk_kernel,
    gaussian_kernel,
    level_grid,
)
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

__all__ = [
    "FULL_FRAME_WIDTH_MM",
    "RENDERERS",
    "DepthEstimator",
    "ExifEmbedding",
    "FocusOutput",
    "FocusPredictor",
    "GatherReference",
    "GaussianLayered",
    "GroundTruthDepth",
    "LayeredThinLens",
    "Lens",
    "LensRenderer",
    "RenderResult",
    "TransformersDepth",
    "after_crop",
    "assign",
    "assign_linear",
    "assign_softmax",
    "build_depth_estimator",
    "click_focus_m",
    "coc_mm",
    "coc_px",
    "conv_same",
    "crop_factor",
    "decanonical_depth",
    "depth_for_radius_m",
    "disk_kernel",
    "dof_split",
    "exif_code",
    "focal35_after_crop",
    "focal35_from_focal",
    "focal_from_focal35",
    "focal_px",
    "focus_regulariser",
    "fourier_features",
    "from_linear",
    "gaussian_kernel",
    "guard_depth_m",
    "guard_focus_m",
    "level_grid",
    "make_renderer",
    "max_radius_at_width",
    "px_per_mm",
    "read_exif",
    "render",
    "saliency_weighted_depth",
    "sensor_width_from_focal_plane",
    "signed_radius_px",
    "to_linear",
]
