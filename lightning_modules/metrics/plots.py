"""Figures for evaluation reports: image grids (PIL, exact pixel layout) and curves (matplotlib, Agg canvas,
no pyplot / global backend state).

* :func:`save_grid_png` — rows of images, e.g. "condition | generated | re-extracted edges", with row titles.
* :func:`plot_curves` — per-scale training curves (loss / accuracy per VAR scale, ...).
* :func:`plot_metric_vs_setting` — metric vs a swept setting (cfg scale, temperature, steps...), one line per label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["make_grid_image", "plot_curves", "plot_metric_vs_setting", "save_grid_png", "to_uint8_hwc"]


def to_uint8_hwc(img: Any) -> np.ndarray:
    """torch (C,H,W)/(H,W) or numpy (H,W,C)/(H,W); uint8, bool, or float in [0,1] → uint8 (H,W,3)."""
    try:
        import torch

        if isinstance(img, torch.Tensor):
            t = img.detach().cpu()
            if t.ndim == 3:
                t = t.permute(1, 2, 0)
            img = t.numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"cannot interpret image of shape {np.asarray(img).shape}")
    return np.ascontiguousarray(a)


def _rows(rows_of_images: Any) -> list[list[np.ndarray]]:
    out = []
    for row in rows_of_images:
        if hasattr(row, "ndim") and row.ndim == 4:  # a batch tensor/array per row
            items = [row[i] for i in range(row.shape[0])]
        else:
            items = list(row)
        out.append([to_uint8_hwc(x) for x in items])
    if not out or not any(out):
        raise ValueError("no images to draw")
    return out


def make_grid_image(rows_of_images: Any, row_titles: Sequence[str] | None = None,
                    col_titles: Sequence[str] | None = None, *, pad: int = 2, label_width: int = 96,
                    title_height: int = 14, background: int = 255):
    """Compose a grid as a ``PIL.Image``. Cells are max(H)×max(W) of all images, smaller images centred.

    Size: width = label_width·[row_titles] + ncols·W + (ncols+1)·pad; height = title_height·[col_titles]
    + nrows·H + (nrows+1)·pad.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = _rows(rows_of_images)
    nrows, ncols = len(rows), max(len(r) for r in rows)
    ch = max(im.shape[0] for r in rows for im in r)
    cw = max(im.shape[1] for r in rows for im in r)
    lw = label_width if row_titles else 0
    th = title_height if col_titles else 0
    W = lw + ncols * cw + (ncols + 1) * pad
    H = th + nrows * ch + (nrows + 1) * pad
    canvas = Image.new("RGB", (W, H), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, r in enumerate(rows):
        y0 = th + pad + i * (ch + pad)
        for j, im in enumerate(r):
            x0 = lw + pad + j * (cw + pad)
            canvas.paste(Image.fromarray(im), (x0 + (cw - im.shape[1]) // 2, y0 + (ch - im.shape[0]) // 2))
        if row_titles and i < len(row_titles):
            draw.text((2, y0 + ch // 2 - 5), str(row_titles[i]), fill=(0, 0, 0), font=font)
    if col_titles:
        for j, t in enumerate(col_titles[:ncols]):
            draw.text((lw + pad + j * (cw + pad) + 2, 1), str(t), fill=(0, 0, 0), font=font)
    return canvas


def save_grid_png(rows_of_images: Any, path: str | os.PathLike, row_titles: Sequence[str] | None = None,
                  col_titles: Sequence[str] | None = None, **kwargs: Any) -> Path:
    """Save :func:`make_grid_image` as PNG; e.g. ``save_grid_png([cond, generated, edges], p, ["condition",
    "generated", "re-extracted edges"])`` with each row a (B,C,H,W) batch or a list of images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid_image(rows_of_images, row_titles, col_titles, **kwargs).save(path, format="PNG")
    return path


def _figure(nplots: int, figsize: tuple[float, float] | None, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize or (5.0 * nplots, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, nplots, i + 1) for i in range(nplots)]
    return fig, axes


def _xy(v: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(v, tuple) and len(v) == 2:
        return np.asarray(v[0], dtype=float), np.asarray(v[1], dtype=float)
    y = np.asarray([float(t) for t in v], dtype=float)
    return np.arange(len(y), dtype=float), y


def plot_curves(per_scale: Mapping[str, Any], path: str | os.PathLike, *, xlabel: str = "step",
                title: str | None = None, figsize: tuple[float, float] | None = None, dpi: int = 100,
                logy: bool = False) -> Path:
    """Per-scale curves.

    ``per_scale`` either maps panel name → {line label → values} (one subplot per panel, e.g.
    ``{"loss": {0: [...], 1: [...]}, "acc": {...}}``), or line label → values (one panel). Values are a sequence of
    y (x = index) or an ``(xs, ys)`` pair.
    """
    if not per_scale:
        raise ValueError("nothing to plot")
    nested = all(isinstance(v, Mapping) for v in per_scale.values())
    panels = dict(per_scale) if nested else {"": per_scale}
    fig, axes = _figure(len(panels), figsize, dpi)
    for ax, (pname, lines) in zip(axes, panels.items()):
        for label, v in lines.items():
            x, y = _xy(v)
            ax.plot(x, y, label=str(label), linewidth=1.2)
        ax.set_xlabel(xlabel)
        if pname:
            ax.set_ylabel(str(pname))
            ax.set_title(str(pname))
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, ncol=2 if len(lines) > 5 else 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_metric_vs_setting(xs: Sequence[Any], ys_by_label: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
                           path: str | os.PathLike, *, title: str | None = None, logx: bool = False,
                           figsize: tuple[float, float] | None = (5.0, 3.6), dpi: int = 100) -> Path:
    """One line (with markers) per label of ``ylabel`` against the swept setting ``xs``."""
    if not ys_by_label:
        raise ValueError("nothing to plot")
    fig, (ax,) = _figure(1, figsize, dpi)
    numeric = all(isinstance(x, (int, float, np.integer, np.floating)) for x in xs)
    xpos = np.asarray(xs, dtype=float) if numeric else np.arange(len(xs), dtype=float)
    for label, ys in ys_by_label.items():
        if len(ys) != len(xs):
            raise ValueError(f"{label!r}: {len(ys)} values for {len(xs)} settings")
        ax.plot(xpos, np.asarray(ys, dtype=float), marker="o", label=str(label))
    if not numeric:
        ax.set_xticks(xpos)
        ax.set_xticklabels([str(x) for x in xs])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
