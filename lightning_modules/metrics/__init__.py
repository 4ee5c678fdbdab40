"""ctrlgen's shared evaluation metric layer (pure, method-agnostic).

Submodules: ``edges`` (EdgeExtractor registry), ``control`` (Canny F1, depth RMSE, depth estimators),
``inception`` (the local TF Inception), ``distribution`` (FID / IS / KID / improved P-R), ``refstats`` (reference
statistics), ``perceptual`` (LPIPS), ``clip`` (CLIP score), ``results`` (tables), ``plots`` (figures).

Re-exports are lazy (PEP 562): ``import ctrlgen.lightning_modules.metrics.edges`` — what the datamodules do — does not
import torchmetrics, transformers or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # edges
    "DEFAULT_EDGE_EXTRACTOR": "edges",
    "EdgeExtractor": "edges",
    "CannyEdgeExtractor": "edges",
    "register_edge_extractor": "edges",
    "get_edge_extractor": "edges",
    "available_edge_extractors": "edges",
    # control
    "MetricResult": "control",
    "binarize_edges": "control",
    "binary_f1_per_image": "control",
    "canny_f1": "control",
    "CannyF1": "control",
    "MeanSEM": "control",
    "depth_rmse": "control",
    "DepthRMSE": "control",
    "DepthEstimator": "control",
    "TransformersDepthEstimator": "control",
    "GeometryDepth": "control",
    # inception
    "INCEPTION_WEIGHTS_FILENAME": "inception",
    "INCEPTION_WEIGHTS_ENV": "inception",
    "FIDInceptionV3": "inception",
    "inception_from_local": "inception",
    "resolve_inception_weights": "inception",
    "tf1_bilinear_resize": "inception",
    # distribution
    "frechet_distance": "distribution",
    "gaussian_stats": "distribution",
    "improved_precision_recall": "distribution",
    "inception_score_from_logits": "distribution",
    "GenerativeMetrics": "distribution",
    "fid_metric": "distribution",
    "kid_metric": "distribution",
    "is_metric": "distribution",
    # refstats
    "RefStats": "refstats",
    "load_refstats": "refstats",
    "compute_refstats": "refstats",
    "refstats_cli": "refstats",
    "FIDFromStats": "refstats",
    # perceptual
    "LPIPSNet": "perceptual",
    "LPIPS": "perceptual",
    "lpips_from_local": "perceptual",
    "resolve_lpips_backbone": "perceptual",
    # clip
    "CLIPFeatureWrapper": "clip",
    "load_local_clip": "clip",
    "clip_score_metric": "clip",
    "clip_score_from_features": "clip",
    "clip_features": "clip",
    # results
    "METRIC_DEFINITIONS": "results",
    "make_rows": "results",
    "to_markdown": "results",
    "write_results": "results",
    "to_wandb_table": "results",
    # plots
    "save_grid_png": "plots",
    "plot_curves": "plots",
    "plot_metric_vs_setting": "plots",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
