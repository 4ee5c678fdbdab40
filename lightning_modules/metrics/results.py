"""Results tables: Markdown + CSV files and W&B table columns/rows, with metric definitions and reference figures.

A row is a mapping with ``metric`` and ``value`` and optionally ``definition`` / ``reference`` (filled from
:data:`METRIC_DEFINITIONS` when missing) plus any extra columns (``setting``, ``method``, ``n``...).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRIC_DEFINITIONS",
    "RESULT_COLUMNS",
    "format_value",
    "make_rows",
    "normalize_rows",
    "to_markdown",
    "to_wandb_table",
    "write_results",
]

RESULT_COLUMNS = ("metric", "value", "definition", "reference")

# definition: what is computed here; reference: a published figure to compare with (empty if none is sourced).
METRIC_DEFINITIONS: dict[str, dict[str, Any]] = {
    "fid": {
        "definition": "Fréchet distance between Gaussians fitted to 2048-d pool3 features of the TF Inception "
                      "(2015-12-05) of real vs generated images; TF1 bilinear resize to 299 (lower is better)",
        "reference": "VAR-d16 FID 3.55 at cfg 1.5, top-k 900, top-p 0.96, 50 images/class (50k) vs "
                     "VIRTUAL_imagenet256_labeled.npz (FoundationVision/var README)",
        "higher_is_better": False,
    },
    "inception_score": {
        "definition": "exp(E_x KL(p(y|x) || p(y))) from the Inception's unbiased 1008-way logits, mean over "
                      "consecutive splits of 5000 generated images (ADM evaluator; higher is better)",
        "reference": "",
        "higher_is_better": True,
    },
    "precision": {
        "definition": "improved precision (Kynkäänniemi et al. 2019), k=3: fraction of generated samples inside the "
                      "k-NN manifold of real Inception features (ADM evaluator; higher is better)",
        "reference": "",
        "higher_is_better": True,
    },
    "recall": {
        "definition": "improved recall, k=3: fraction of real samples inside the k-NN manifold of generated "
                      "Inception features (ADM evaluator; higher is better)",
        "reference": "",
        "higher_is_better": True,
    },
    "kid": {
        "definition": "kernel Inception distance: unbiased MMD² with cubic polynomial kernel on Inception features, "
                      "mean over subsets (lower is better)",
        "reference": "",
        "higher_is_better": False,
    },
    "canny_f1": {
        "definition": "per-image binary per-pixel F1 between condition edges and edges re-extracted from the output "
                      "with the same extractor (cv2.Canny(gray, 100, 200)), maps binarised at >128, averaged "
                      "(higher is better)",
        "reference": "",
        "higher_is_better": True,
    },
    "canny_f1_margin": {
        "definition": "mean over test images of canny F1 (controlled sample) - canny F1 (the same base without "
                      "control, same seed): paired; canny_f1_margin_sem is its standard error (sample std / sqrt(n))",
        "reference": "",
        "higher_is_better": True,
    },
    "depth_rmse": {
        "definition": "per-image RMSE on the 0-255 scale between the estimator's depth of the output (divided by its "
                      "max, 8-bit) and the condition depth (min-max to 0-255), averaged (ControlNet++; lower is "
                      "better)",
        "reference": "",
        "higher_is_better": False,
    },
    "lpips": {
        "definition": "LPIPS v0.1 distance (linear heads on a frozen backbone's unit-normalised features; "
                      "lower is more similar)",
        "reference": "",
        "higher_is_better": False,
    },
    "clip_score": {
        "definition": "max(100 · cos(CLIP image embedding, CLIP text embedding), 0), averaged (higher is better)",
        "reference": "",
        "higher_is_better": True,
    },
}


def _lookup(metric: str) -> dict[str, Any]:
    key = metric.strip().lower()
    if key in METRIC_DEFINITIONS:
        return METRIC_DEFINITIONS[key]
    # "val/fid", "test/canny_f1" and similar logged names
    tail = key.rsplit("/", 1)[-1]
    return METRIC_DEFINITIONS.get(tail, {})


def format_value(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def make_rows(values: Mapping[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """``{"fid": 3.1, "precision": 0.8}`` → rows with definitions/references filled in; ``extra`` columns added."""
    return normalize_rows([{"metric": k, "value": v, **extra} for k, v in values.items()])


def normalize_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if "metric" not in r or "value" not in r:
            raise KeyError(f"each row needs 'metric' and 'value', got {sorted(r)}")
        d = _lookup(str(r["metric"]))
        row = dict(r)
        row.setdefault("definition", d.get("definition", ""))
        row.setdefault("reference", d.get("reference", ""))
        if not row["definition"]:
            row["definition"] = d.get("definition", "")
        if not row["reference"]:
            row["reference"] = d.get("reference", "")
        out.append(row)
    return out


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols = list(RESULT_COLUMNS)
    for r in rows:
        for k in r:
            if k not in cols:
                cols.insert(len(cols) - 2, k)  # extra columns before definition/reference
    return cols


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    rows = normalize_rows(rows)
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [_md_escape(format_value(r.get(c), digits)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                  columns: Sequence[str] | None = None, title: str | None = None,
                  digits: int = 4) -> tuple[Path, Path]:
    """Write ``<path>.md`` and ``<path>.csv`` (any suffix of ``path`` is replaced). CSV values are unrounded."""
    rows = normalize_rows(rows)
    cols = _columns(rows, columns)
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".md", ".csv") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    md = base.with_name(base.name + ".md")
    cs = base.with_name(base.name + ".csv")
    text = (f"# {title}\n\n" if title else "") + to_markdown(rows, cols, digits)
    md.write_text(text, encoding="utf-8")
    with open(cs, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([_plain(r.get(c)) for c in cols])
    return md, cs


def _plain(v: Any) -> Any:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return str(v)
    return v


def to_wandb_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
                   ) -> tuple[list[str], list[list[Any]]]:
    """``(columns, data)`` for ``wandb.Table(columns=..., data=...)`` / ``WandbLogger.log_table``; numbers stay
    numbers (tensors → Python scalars)."""
    rows = normalize_rows(rows)
    cols = _columns(rows, columns)
    return cols, [[_plain(r.get(c)) for c in cols] for r in rows]
