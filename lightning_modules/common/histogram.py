"""Histograms for the dashboards: counts per bin, summed over ranks by the caller, sent to every W&B logger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def log_histogram(module: Any, key: str, counts: Sequence[float], edges: Sequence[float]) -> bool:
    """``counts[i]`` samples in ``[edges[i], edges[i+1])`` → one ``wandb.Histogram`` under ``key`` at the current
    global step, from rank zero; True when a W&B logger received it (other loggers have no histogram type)."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{key}: {len(counts)} bins need {len(counts) + 1} edges, got {len(edges)}")
    trainer = module.trainer
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if trainer.global_rank != 0 or not loggers:
        return False
    import wandb

    hist = wandb.Histogram(np_histogram=([float(c) for c in counts], [float(e) for e in edges]))
    for lg in loggers:
        lg.log_metrics({key: hist}, step=trainer.global_step)
    return True
