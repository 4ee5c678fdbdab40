"""``GracefulStop``: SIGTERM or SIGINT during ``fit`` saves a checkpoint at the next step boundary and exits non-zero.

Clusters deliver pre-emption and ``scancel`` as SIGTERM. Lightning 2.6.6 turns it into ``SIGTERMException``, a
``SystemExit`` with no code (exit status 0) that saves nothing. Here the signal only sets a flag; at the end of the
next training batch that completes an optimizer step (``accumulate_grad_batches`` respected) every rank agrees on the
flag (``Strategy.reduce_boolean_decision``), the run saves ``last.ckpt`` in the checkpoint folder (collective, like
any save), and the process exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT) and a line that says where
the checkpoint is; ``--ckpt_path last`` resumes it exactly. A signal that arrives before the first step (data
loading, set-up, sanity check) exits at once with the same status: there is nothing to save yet. A second SIGINT
interrupts at once. SLURM's SIGUSR1 requeue path (``callbacks.hpc_prune.SafeRequeue``) is unaffected.

Only the process that receives the signal is covered: DataLoader workers killed by the same signal end the run with
PyTorch's "DataLoader worker ... killed" error instead.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop(L.Callback):
    """Checkpoint at the next step boundary on SIGTERM/SIGINT, then exit ``128 + signum`` (module docstring)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._stepped = False  # an optimizer step has completed in this run
        self._previous: dict[int, Any] = {}

    # --------------------------------------------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: Any) -> None:
        if not self._previous:  # left installed after its fit ended: behave as the handler it replaced
            prev = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, prev)
            signal.raise_signal(signum)
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        if not self._stepped:  # nothing trained yet: nothing to save, do not wait for a step that may never come
            print(f"ctrlgen: {signal.Signals(signum).name} before the first training step: exiting without a "
                  f"checkpoint", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        rank_zero_info(f"ctrlgen: {signal.Signals(signum).name} received: saving a checkpoint at the next step "
                       f"boundary, then stopping")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.received, self._stepped = None, False
        for sig in _SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): leave signals alone
                return

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its own SIGTERM handler when fit starts; take SIGTERM back so the flag above is the one
        # that counts (Lightning's handler would raise an exit with status 0 at the next batch)
        if signal.getsignal(signal.SIGTERM) is not self._handle and signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, self._handle)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            if prev is not None:
                signal.signal(sig, prev)
        self._previous = {}

    # ------------------------------------------------------------------------------------------------ step boundary
    def save(self, trainer: L.Trainer) -> str:
        """``last.ckpt`` through the run's ``RunCheckpoint`` (so a resumed run goes on writing ``last.ckpt``), else
        ``<default_root_dir>/checkpoints/last.ckpt``."""
        ckpt_cb = trainer.checkpoint_callback
        if callable(getattr(ckpt_cb, "save_last_now", None)) and ckpt_cb.save_last:
            return ckpt_cb.save_last_now(trainer)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        return str(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) and pl_module.automatic_optimization:
            return  # inside an accumulation window: not a step boundary
        self._stepped = True
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        path = self.save(trainer)
        signum = self.received or signal.SIGTERM
        name = signal.Signals(signum).name
        rank_zero_info(f"ctrlgen: {name}: checkpoint saved at step {trainer.global_step} to {path}; resume with "
                       f"--ckpt_path last")
        print(f"ctrlgen: stopped by {name} at step {trainer.global_step}; checkpoint {path}", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)
