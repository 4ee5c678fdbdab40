"""``ctrlgen test`` outputs: a results table (Markdown + CSV + W&B table) with each metric's definition and reference
figure, a per-scale CE/accuracy plot and a sample grid of the first test batch — next to the run, logged to W&B.
The table's title and one log line state how many test samples the metrics cover (summed over ranks and loaders).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from ctrlgen.callbacks.images import make_grid


class TestResultsWriter(L.Callback):
    __test__ = False  # not a pytest class

    def __init__(self, filename: str = "results", num_images: int = 8) -> None:
        self.filename, self.num_images = filename, num_images
        self._batch: Any = None
        self.paths: dict[str, Path] = {}
        self.samples = 0  # test samples scored by this rank
        self.total_samples = 0  # over all ranks

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples = 0

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.samples += batch_size(batch)
        if self._batch is None and isinstance(batch, dict):
            self._batch = {k: v for k, v in batch.items() if not str(k).startswith("_")}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        grids = pl_module.sample_images(self._batch, self.num_images) if self._batch is not None else {}
        total = torch.tensor(float(self.samples), device=pl_module.device)
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        self.total_samples = int(total.item())
        if trainer.global_rank != 0:
            return
        from ctrlgen.lightning_modules.metrics.plots import plot_curves
        from ctrlgen.lightning_modules.metrics.results import make_rows, to_wandb_table, write_results

        root = Path(trainer.default_root_dir)
        metrics = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        rows = make_rows(dict(sorted(metrics.items())), model=type(pl_module).__name__)
        title = f"{type(pl_module).__name__} test results on {self.total_samples} test samples"
        md, csv = write_results(rows, root / self.filename, title=title)
        self.paths.update(md=Path(md), csv=Path(csv))
        rank_zero_info(f"test: {len(rows)} metrics over {self.total_samples} test samples written to {md}")
        per_scale: dict[str, dict[str, list[float]]] = {}
        for k, v in metrics.items():
            m = re.fullmatch(r"(ce|acc)_scale(\d+)", k)
            if m:
                per_scale.setdefault(m.group(1), {}).setdefault("test", []).append((int(m.group(2)), v))
        if per_scale:
            curves = {panel: {lbl: [v for _, v in sorted(pts)] for lbl, pts in d.items()} for panel, d in per_scale.items()}
            self.paths["per_scale"] = Path(plot_curves(curves, root / "plots" / "per_scale.png", xlabel="scale index"))
        images = []
        for name, imgs in grids.items():
            grid = make_grid(imgs, nrow=self.num_images)
            path = root / "plots" / f"test_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(grid).save(path)
            self.paths[f"grid_{name}"] = path
            images.append((name, grid))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns, data = to_wandb_table(rows)
                logger.log_table(key="test/results", columns=columns, data=data)
                for name, grid in images:
                    logger.log_image(key=f"test/{name}", images=[grid])


def batch_size(batch: Any) -> int:
    """Samples in a batch: its ``key`` list, else the first dimension of its first tensor (0 if none)."""
    if isinstance(batch, dict):
        if isinstance(batch.get("key"), (list, tuple)):
            return len(batch["key"])
        for k, v in batch.items():
            if not str(k).startswith("_") and isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        nested = [v for k, v in batch.items() if not str(k).startswith("_") and isinstance(v, dict)]
        return batch_size(nested[0]) if nested else 0  # a multi-stream batch {name: batch}
    if isinstance(batch, torch.Tensor) and batch.ndim:
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    return 0
