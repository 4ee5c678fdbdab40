"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the newest state, written
atomically, plus :func:`newest_intact_checkpoint` for resuming.

In lightning 2.6.6, with a ``monitor``, ``last.ckpt`` is rewritten only when a top-k checkpoint is saved at the same
step, i.e. only when the monitored metric improves, and at the end of training only if no ``last.ckpt`` was ever
written. So a GAN or RL run whose validation loss stops improving, or a run stopped by ``max_steps`` /
``max_iterations`` between two validations, leaves a stale ``last.ckpt`` behind and ``--ckpt_path last`` silently
resumes from an old point. ``RunCheckpoint`` keeps the best-``k`` logic as is and additionally writes ``last.ckpt``
after every validation / training epoch end and at the end of training whenever the step moved since it was last
written (on every rank at the same hook, so sharded saves stay collective).

Saves are atomic (:class:`AtomicCheckpointIO`, installed by ``RunCheckpoint`` over Lightning's default IO): the file
is written next to its target and renamed over it, so a full disk or a kill mid-save leaves the previous checkpoint
and no partial file (Lightning's own save stages in the system temp folder and copies across file systems).
:func:`newest_intact_checkpoint` picks what ``--ckpt_path last`` resumes: the newest loadable checkpoint of the
folder by global step, so a truncated ``last.ckpt`` or one older than a step checkpoint written after it (a kill
between the two writes) is passed over with a warning naming both.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside the target, fsync, then ``os.replace`` onto it; on any error the
    temporary file is removed and the error re-raised, naming the path. Remote paths (``s3://``) use Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"saving checkpoint {path} failed ({e.strerror or e}); the previous "
                                       f"checkpoints are untouched, no partial file was left") from e
            raise
        return None


def read_step(path: str | Path) -> int | None:
    """The ``global_step`` of a checkpoint file, or None if it is not a complete, loadable checkpoint."""
    try:
        with zipfile.ZipFile(path) as zf:  # a truncated file has no central directory: cheap first test
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt.get("global_step", 0))
    except Exception:  # noqa: BLE001 - any failure means "not intact"
        return None


def newest_intact_checkpoint(folder: str | Path) -> Path | None:
    """The loadable ``*.ckpt`` in ``folder`` with the highest global step (``last.ckpt`` first among equals, then the
    newest file); warns naming a ``last.ckpt`` that is corrupt or older than the one chosen. None: nothing loadable."""
    folder = Path(folder)
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    steps = {p: read_step(p) for p in files}
    intact = [p for p in files if steps[p] is not None]
    if not intact:
        if files:
            warnings.warn(f"checkpoints: none of {[p.name for p in files]} in {folder} is a complete checkpoint",
                          stacklevel=2)
        return None
    best = max(intact, key=lambda p: (steps[p], p.name == "last.ckpt"))
    last = folder / "last.ckpt"
    if last in steps and best != last:
        why = "is not a complete checkpoint" if steps[last] is None else f"holds step {steps[last]}"
        warnings.warn(f"checkpoints: {last} {why}; resuming from {best} (step {steps[best]}) instead", stacklevel=2)
    return best


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) with a ``last.ckpt`` that never lags behind the run (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_at: int | None = None  # global_step of the newest last.ckpt

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = trainer.global_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a custom IO of the user's is left alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` now (e.g. before a signal stops the run) as this callback's own last checkpoint, so
        that a resumed run keeps writing ``last.ckpt`` (not ``last-v1.ckpt``). Returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.sanity_checking
                or trainer.state.fn != TrainerFn.FITTING or self._last_written_at == trainer.global_step
                or trainer.global_step == 0):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
