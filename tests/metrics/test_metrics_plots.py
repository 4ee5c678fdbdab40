"""Figures: grid PNGs with exact layout, curves and metric-vs-setting plots."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlgen.lightning_modules.metrics.plots import plot_curves, plot_metric_vs_setting, save_grid_png, to_uint8_hwc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


def _colour_pixels(path) -> int:
    """Saturated pixels: axes, ticks, grid and text are grey, so only the plotted series (and their legend) count."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


def test_grid_layout_titles_and_pixels(tmp_path):
    g = torch.Generator().manual_seed(0)
    cond = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8, generator=g)
    gen = torch.rand(3, 3, 20, 24, generator=g)  # float [0,1]
    edges = torch.randint(0, 2, (3, 1, 20, 24), generator=g).bool()  # (B,1,H,W) bool edges
    p = save_grid_png([cond, gen, edges], tmp_path / "grid.png",
                      row_titles=["condition", "generated", "re-extracted edges"], pad=2, label_width=96)
    assert _is_png(p)
    im = Image.open(p)
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (96 + 3 * 24 + 4 * 2, 3 * 20 + 4 * 2)
    arr = np.asarray(im)
    # cell (row 0, col 1) holds cond[1] exactly; row 2 holds edges as white/black
    y0, x0 = 2, 96 + 2 + 1 * (24 + 2)
    np.testing.assert_array_equal(arr[y0:y0 + 20, x0:x0 + 24], cond[1].permute(1, 2, 0).numpy())
    y2 = 2 + 2 * (20 + 2)
    e = arr[y2:y2 + 20, 96 + 2:96 + 2 + 24, 0]
    np.testing.assert_array_equal(e, edges[0, 0].numpy().astype(np.uint8) * 255)
    # the title area has some dark (text) pixels
    assert arr[:, :96].min() < 128


def test_grid_without_titles_and_mixed_sizes(tmp_path):
    rows = [[np.zeros((10, 10, 3), np.uint8), np.full((6, 8), 200, np.uint8)]]
    p = save_grid_png(rows, tmp_path / "g2.png", pad=1)
    assert Image.open(p).size == (2 * 10 + 3, 10 + 2)
    with pytest.raises(ValueError, match=re.escape("cannot interpret image of shape (5, 5, 7)")):
        to_uint8_hwc(np.zeros((5, 5, 7)))


def test_plot_curves_per_scale_and_flat(tmp_path):
    per_scale = {
        "loss": {f"scale {k}": list(np.linspace(8, 3 + 0.2 * k, 20)) for k in range(10)},
        "acc": {f"scale {k}": (np.arange(20) * 5, np.linspace(0, 0.5 - 0.03 * k, 20)) for k in range(10)},
    }
    p = plot_curves(per_scale, tmp_path / "curves.png", figsize=(8, 3), dpi=50, title="per-scale")
    assert _is_png(p) and Image.open(p).size == (400, 150)
    p2 = plot_curves({"train": [3, 2, 1], "val": [3.5, 2.5, 2]}, tmp_path / "flat.png", dpi=40, logy=True)
    assert _is_png(p2) and Image.open(p2).size == (200, 144)  # default 5 x 3.6 in
    # a plot with data differs from an empty-ish one: non-white pixels present
    assert np.asarray(Image.open(p2).convert("L")).min() < 200
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves({}, tmp_path / "x.png")


def test_plot_metric_vs_setting(tmp_path):
    p = plot_metric_vs_setting([1.0, 1.5, 2.0, 3.0], {"ECM": [4.1, 3.6, 3.9, 5.0], "CAR": [5.2, 4.4, 4.6, 6.0]},
                               "cfg scale", "FID", tmp_path / "sub" / "fid_vs_cfg.png", dpi=60)
    assert _is_png(p) and Image.open(p).size == (300, 216)
    assert np.asarray(Image.open(p).convert("L")).min() < 200  # not a blank figure
    assert _colour_pixels(p) > 100  # the two coloured series (lines + markers) were drawn
    p2 = plot_metric_vs_setting(["greedy", "top-k", "top-p"], {"F1": [0.3, 0.35, 0.33]}, "sampler", "F1",
                                tmp_path / "cat.png", dpi=30)
    assert Image.open(p2).size == (150, 108)
    assert np.asarray(Image.open(p2).convert("L")).min() < 200 and _colour_pixels(p2) > 20
    with pytest.raises(ValueError, match="values for"):
        plot_metric_vs_setting([1, 2], {"a": [1.0]}, "x", "y", tmp_path / "bad.png")
