"""``StepValueHistogram``: per training epoch, the histogram of an integer the module draws per optimizer step.

The module exposes the value as a method ``<value>(step, rank) -> int`` (a pure function of the optimizer step and the
rank, e.g. ECM's last kept scale), with ``<value>_bins`` (the histogram has bins ``0 .. bins - 1``) and
``<value>_support`` (the values that can occur). The callback counts the training batches of each optimizer step of
the epoch; at epoch end every rank bins its values of those steps, the counts are summed over ranks, and it logs
``frac_key.format(v)`` (the fraction of the epoch's batches, all ranks, with value ``v``) for every ``v`` in the support
and, with a W&B logger, one histogram under ``hist_key``. The step counts travel in the checkpoint: a mid-epoch resume
counts the batches before the checkpoint too (each rank redraws its values from their steps).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from ctrlgen.datamodules.base import ResumableDataModule


class StepValueHistogram(L.Callback):
    def __init__(self, value: str, frac_key: str, hist_key: str) -> None:
        """``value``: the module's method name; ``frac_key``: a format string with one ``{}`` for the value
        (``train/trunc_frac_s{}``); ``hist_key``: the W&B histogram's key."""
        if frac_key.format(0) == frac_key:
            raise ValueError(f"StepValueHistogram frac_key {frac_key!r} needs one '{{}}' for the value "
                             "(e.g. 'train/trunc_frac_s{}')")
        self.value, self.frac_key, self.hist_key = value, frac_key, hist_key
        self.steps: Counter[int] = Counter()  # optimizer step -> training batches at that step, this epoch
        self._resumed: dict[str, Any] | None = None  # the same, from a mid-epoch checkpoint
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:
        return f"StepValueHistogram[{self.value}]"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        missing = [a for a in (self.value, f"{self.value}_bins", f"{self.value}_support") if not hasattr(pl_module, a)]
        if missing:
            raise ValueError(f"StepValueHistogram(value={self.value!r}): {type(pl_module).__name__} has no "
                             f"{', '.join(missing)}; remove the callback from trainer.callbacks or pick a value the "
                             "module exposes")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.steps[trainer.global_step] += 1  # the step the module's training_step draws its value for

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps, self.steps = self.steps, Counter()
        resumed, self._resumed = self._resumed, None
        if resumed is not None and resumed["data_epoch"] is not None and resumed["data_epoch"] == _data_epoch(trainer):
            steps.update({int(k): int(n) for k, n in resumed["steps"].items()})
        draw, bins = getattr(pl_module, self.value), int(getattr(pl_module, f"{self.value}_bins"))
        mine = [0.0] * bins
        for step, n in steps.items():
            mine[draw(step, trainer.global_rank)] += n
        counts = trainer.strategy.reduce(torch.tensor(mine, device=pl_module.device), reduce_op="sum").cpu()
        total = float(counts.sum())
        if not total:
            return
        for v in sorted(getattr(pl_module, f"{self.value}_support")):
            pl_module.log(self.frac_key.format(v), float(counts[v]) / total, sync_dist=False)
        log_histogram(pl_module, self.hist_key, counts.tolist(), list(range(bins + 1)))

    def state_dict(self) -> dict[str, Any]:
        """The step counts of the running epoch and the data epoch they belong to."""
        return {"data_epoch": _data_epoch(self._trainer), "steps": dict(self.steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = state_dict


def log_histogram(module: Any, key: str, counts: Sequence[float], edges: Sequence[float]) -> bool:
    """``counts[i]`` samples in ``[edges[i], edges[i+1])`` (summed over ranks by the caller) → one ``wandb.Histogram``
    under ``key`` at the current global step, from rank zero; True when a W&B logger received it (other loggers have
    no histogram type)."""
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


def _data_epoch(trainer: L.Trainer | None) -> int | None:
    """The training stream's epoch (a resumable datamodule counts it; Lightning's counter can be one ahead after
    ``max_steps``), or None without one."""
    dm = getattr(trainer, "datamodule", None)
    return dm.state_dict().get("epoch") if isinstance(dm, ResumableDataModule) else None
