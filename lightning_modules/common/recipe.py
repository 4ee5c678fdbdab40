"""A training recipe that follows the cluster: learning rate from the global batch, schedule length from the run.

Papers give their recipe for one global batch (VAR/ECM: ``lr = 1e-4 × global_bs / 256`` at 8 × 96 = 768) and a fixed
number of epochs. A user on another number of GPUs gets the paper's recipe back with three knobs:

- ``model.init_args.lr_reference_batch: 256`` — the optimizer's configured ``lr`` is the lr *per* 256 samples and every
  param group's lr is multiplied by ``global_batch / 256`` (``global_batch = per-device batch × world size ×
  accumulate_grad_batches``) before the scheduler is built (``scale_lr``);
- ``data.init_args.train_samples_per_epoch`` — an epoch is one pass over that many samples whatever the world size
  (``ResumableDataModule.batches_per_epoch``);
- a scheduler with ``total_steps: null`` (``WarmupLinear``, optionally ``warmup_frac``) is bound to the optimizer steps
  this run will make (``planned_iterations``), computed from ``max_steps``/``max_epochs`` and the datamodule's epoch
  length without loading data (FSDP restores the datamodule's resume position only after ``configure_optimizers``).

Batch sizes have one source each: the per-device batch of the run is the datamodule's ``batch_size``
(:func:`global_batch_size`), the size of a batch in hand is :func:`batch_size_of` (logging weights, throughput).

On resume, the checkpoint's optimizer and scheduler states prevail (its lrs, base lrs and bound length): a run requeued
on another number of GPUs continues the schedule it started with, at the lr it was planned with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer


def batch_size_of(batch: Any) -> int | None:
    """Leading size of a batch: of the first tensor (≥ 1-D) of a dict batch (keys starting with ``_`` skipped), else
    of its first nested ``{stream: batch}`` (multi-stream batches; Lightning's own inference warns when the streams'
    sizes differ); of a list/tuple batch's first tensor or batch. None when nothing has a leading size."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, dict):
        items = [v for k, v in batch.items() if not str(k).startswith("_")]
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for v in items:
        if torch.is_tensor(v) and v.ndim > 0:
            return int(v.shape[0])
    for v in items:
        if isinstance(v, (dict, list, tuple)) and (n := batch_size_of(v)) is not None:
            return n
    return None


def global_batch_size(trainer: Any, per_device: int | None = None, accumulate: bool = True) -> int:
    """Samples per optimizer step over all ranks: per-device batch × world size (× ``accumulate_grad_batches``).
    ``per_device`` defaults to the trainer's datamodule's ``batch_size``."""
    if per_device is None:
        dm = getattr(trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None)
        if not isinstance(per_device, int) or per_device < 1:
            raise ValueError("lr_reference_batch needs the per-device batch size: the trainer's datamodule "
                             f"({type(dm).__name__ if dm is not None else 'none'}) has no integer batch_size")
    accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if accumulate else 1
    return int(per_device) * int(trainer.world_size) * accum


def scale_lr(optimizer: Optimizer, factor: float) -> list[float]:
    """Multiply every param group's ``lr`` (and ``initial_lr`` when a scheduler already set it) by ``factor``; the
    new lrs. Call before the scheduler is built so that its base lrs are the scaled ones."""
    if not factor > 0:
        raise ValueError(f"lr scale factor must be positive, got {factor}")
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * factor
    return [g["lr"] for g in optimizer.param_groups]


def _epoch_batches(trainer: Any) -> int | None:
    """Training batches per epoch per rank as the datamodule defines them (no data loaded), after
    ``limit_train_batches``; None when unknown."""
    dm = getattr(trainer, "datamodule", None)
    n = getattr(dm, "batches_per_epoch", None)
    if not isinstance(n, int):
        return None
    limit = getattr(trainer, "limit_train_batches", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        n = min(n, limit)
    elif isinstance(limit, float) and limit < 1.0:
        n = int(n * limit)
    return n


def planned_iterations(trainer: Any, max_iterations: int | None = None, accumulate: bool = True) -> int:
    """Optimizer steps (automatic optimisation; or iterations = batches, ``accumulate=False``) this run will make:
    the smaller of ``max_iterations`` (default ``trainer.max_steps``) and ``max_epochs × ⌈epoch batches /
    accumulate⌉``. Raises when neither bounds the run."""
    limits = []
    cap = trainer.max_steps if max_iterations is None else max_iterations
    if cap is not None and cap != -1:
        limits.append(int(cap))
    epochs, per_epoch = trainer.max_epochs, _epoch_batches(trainer)
    if epochs not in (None, -1) and per_epoch is not None:
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if accumulate else 1
        limits.append(int(epochs) * math.ceil(per_epoch / accum))
    if not limits:
        raise ValueError("a scheduler with total_steps: null needs a bounded run: set trainer.max_steps, or "
                         "trainer.max_epochs with a datamodule that knows its epoch length (batches_per_epoch)")
    return max(1, min(limits))


def bind_total_steps(scheduler: Any, total_steps: int) -> bool:
    """Give ``total_steps`` to a scheduler that asked for it (``total_steps: null``); False if it did not."""
    bind = getattr(scheduler, "bind_total_steps", None)
    if bind is None or getattr(scheduler, "total_steps", 0) is not None:
        return False
    bind(int(total_steps))
    return True
