"""SLURM HPC checkpoints (platform.md §2): ``HPCCheckpointPrune`` and ``SafeRequeue``.

``HPCCheckpointPrune`` keeps only the newest complete ``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir``.

Every SIGUSR1 (a Slurm time limit with ``--signal=SIGUSR1@90``) makes Lightning write ``hpc_ckpt_{N+1}.ckpt`` next to
the previous ones, and a requeued job resumes from the highest ``N`` without looking at it. So a long run piles up
full-size checkpoints (GBs each), and a save cut short (the job killed mid-write; Lightning writes in place) leaves a
truncated highest file that breaks every later requeue. This callback:

- in ``setup`` (every stage, before Lightning loads the checkpoint it has already chosen) keeps the newest ``keep``
  complete ones and deletes the rest; if the highest-numbered one is incomplete, the newest complete one is moved to
  its name, so the path Lightning picked now holds a loadable checkpoint;
- after any checkpoint save (at the next batch end, teardown or exception) deletes the older complete ones.

Complete = a torch zip archive with its central directory (written last; ``zipfile.is_zipfile``), or for FSDP's
sharded ``state_dict_type`` a directory holding its metadata file. Only global rank 0 touches files; every rank waits
for it in ``setup``. ``default_root_dir`` must be on a filesystem all nodes share (it must anyway, for the resume).
Local paths only (remote ``default_root_dir`` URLs are left alone).

``SafeRequeue`` replaces Lightning's SIGUSR1 handler (which saves the checkpoint *inside* the signal handler) for fit
under ``SLURMEnvironment(auto_requeue=True)``. Seen on the local Slurm tier (tests/slurm): Slurm signals every process
of the job step, so forked DataLoader workers, which inherit Lightning's Python handler, also "handle" SIGUSR1 with
their stale copy of the trainer, write ``hpc_ckpt_1.ckpt`` (global_step 0: the requeued run restarted from scratch) and
run ``scontrol requeue`` themselves; and a save inside a handler can land mid-step or pair a barrier with another
rank's all-reduce (lightning#21406). Here the handler only sets a flag (workers ignore it); at the next optimizer-step
boundary all ranks agree (one all-reduce), save ``hpc_ckpt_{N+1}.ckpt`` together and the fit stops: the resumed run
continues at exactly the next step, nothing trained after the checkpoint is logged. Who requeues:

- under ``slurm/train.sbatch`` (``CTRLGEN_REQUEUE_MARKER`` set): rank 0 writes that marker file and the batch script runs
  ``scontrol requeue`` after ``srun`` has returned, i.e. after every rank has finished its teardown (W&B run finished,
  DataLoader workers joined). Requeueing from inside the step instead makes Slurm kill the attempt mid-teardown, which
  leaves an unfinished W&B run behind (seen on the local Slurm tier);
- otherwise rank 0 runs ``scontrol requeue`` itself right after the save (Lightning's behaviour).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
SHARDED_MARKERS = (".metadata", "meta.pt")  # torch.distributed.checkpoint metadata, Lightning's FSDP meta file
REQUEUE_MARKER_ENV = "CTRLGEN_REQUEUE_MARKER"  # set by slurm/train.sbatch: requeue after srun returns


def hpc_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(N, path)]`` of ``hpc_ckpt_N.ckpt`` files/dirs in ``folder``, ascending ``N``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = HPC_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint whose save finished: zip with central directory, or a sharded dir with its metadata written."""
    p = Path(path)
    if p.is_dir():
        return any((p / m).is_file() for m in SHARDED_MARKERS)
    try:
        return p.stat().st_size > 0 and zipfile.is_zipfile(p)
    except OSError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def prune_hpc_checkpoints(folder: str | os.PathLike, keep: int = 1, fix_highest: bool = True) -> dict[str, Any]:
    """Delete all ``hpc_ckpt_*`` but the newest ``keep`` complete ones; return what was done.

    ``fix_highest``: if the highest-numbered checkpoint is incomplete, move the newest complete one onto its name (the
    name Lightning's SLURM resume will load). Without any complete checkpoint nothing is touched.
    """
    ckpts = hpc_checkpoints(folder)
    report: dict[str, Any] = {"kept": [], "deleted": [], "moved": None}
    if not ckpts:
        return report
    complete = [(n, p) for n, p in ckpts if is_complete(p)]
    if not complete:
        report["incomplete_only"] = [str(p) for _, p in ckpts]
        return report
    keep_set = {p for _, p in complete[-max(1, keep):]}
    _, top_p = ckpts[-1]
    if fix_highest and top_p not in keep_set:  # the highest is incomplete (complete ones are all in keep_set or older)
        _, newest_p = complete[-1]
        _remove(top_p)
        os.replace(newest_p, top_p)
        report["moved"] = (str(newest_p), str(top_p))
        keep_set.discard(newest_p)
        keep_set.add(top_p)
    for _, p in ckpts:
        if p not in keep_set and p.exists():
            _remove(p)
            report["deleted"].append(str(p))
    report["kept"] = sorted(str(p) for p in keep_set)
    return report


class HPCCheckpointPrune(Callback):
    """Keep only the newest ``keep`` complete ``hpc_ckpt_*.ckpt`` in ``default_root_dir`` (see module docstring)."""

    def __init__(self, keep: int = 1, verbose: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"HPCCheckpointPrune: keep must be >= 1, got {keep}")
        self.keep = keep
        self.verbose = verbose
        self._saved = False

    @staticmethod
    def _local_dir(trainer: L.Trainer) -> Path | None:
        root = str(trainer.default_root_dir)
        if "://" in root and not root.startswith("file://"):
            return None
        return Path(root.removeprefix("file://"))

    def prune(self, trainer: L.Trainer, fix_highest: bool) -> dict[str, Any] | None:
        folder = self._local_dir(trainer)
        if folder is None or not trainer.is_global_zero:
            return None
        report = prune_hpc_checkpoints(folder, self.keep, fix_highest=fix_highest)
        if report.get("incomplete_only"):
            rank_zero_warn(f"HPCCheckpointPrune: no complete hpc checkpoint in {folder} "
                           f"({', '.join(report['incomplete_only'])}): nothing pruned; a SLURM resume will fail "
                           "to load")
        if report["moved"]:
            rank_zero_warn(f"HPCCheckpointPrune: {report['moved'][1]} is incomplete (save cut short); replaced by the "
                           f"newest complete checkpoint {report['moved'][0]}")
        if self.verbose and report["deleted"]:
            rank_zero_info(f"HPCCheckpointPrune: deleted {len(report['deleted'])} older hpc checkpoint(s): "
                           f"{', '.join(Path(p).name for p in report['deleted'])}")
        return report

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.prune(trainer, fix_highest=True)
        trainer.strategy.barrier("HPCCheckpointPrune.setup")  # nobody loads before rank 0 is done

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved = True  # called before the file is written: prune once it is complete (next hook below)

    def _after_save(self, trainer: L.Trainer) -> None:
        if self._saved:
            self._saved = False
            self.prune(trainer, fix_highest=False)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._after_save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._after_save(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._after_save(trainer)


def slurm_job_id(env: dict | None = None) -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array jobs (lightning#15022), else the job id."""
    e = os.environ if env is None else env
    if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
    return e.get("SLURM_JOB_ID")


class SafeRequeue(Callback):
    """SIGUSR1 (``--signal=SIGUSR1@90``) → HPC checkpoint at a step boundary on all ranks → fit stops → requeue: by
    the batch script when ``marker`` (default: env ``CTRLGEN_REQUEUE_MARKER``) names a file for rank 0 to write, else
    ``scontrol requeue`` from rank 0 at once.

    Active only for ``fit`` under ``SLURMEnvironment`` with ``auto_requeue=True`` (Lightning's default there); installed
    in ``setup``, before Lightning registers its handlers, so Lightning keeps its SIGTERM handling but leaves SIGUSR1
    to this callback. ``every_n_steps`` > 1 checks the flag less often (one tiny all-reduce per check).
    """

    def __init__(self, every_n_steps: int = 1, marker: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SafeRequeue: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        # set: rank 0 writes this file and the batch script requeues once srun has returned (module docstring)
        self.marker = marker if marker is not None else (os.environ.get(REQUEUE_MARKER_ENV) or None)
        self._pid: int | None = None
        self._signum: int | None = None
        self._previous: Any = None
        self._requested = False
        self._done = False
        self.saved_path: str | None = None

    @property
    def armed(self) -> bool:
        return self._signum is not None

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: Slurm signals every process of the step
            return
        self._requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        connector = getattr(trainer, "_accelerator_connector", None)  # what Lightning's signal connector consults
        env = getattr(connector, "cluster_environment", None) or getattr(trainer.strategy, "cluster_environment", None)
        if stage != "fit" or self.armed or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        if env.requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        self._pid, self._signum = os.getpid(), int(env.requeue_signal)
        self._previous = signal.getsignal(self._signum)
        signal.signal(self._signum, self._handler)
        self._requested = self._done = False
        rank_zero_info(f"SafeRequeue: signal {self._signum} -> hpc checkpoint at the next step boundary, then "
                       "`scontrol requeue`")

    @staticmethod
    def _accumulating(trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> bool:
        """Whether this batch is inside an accumulation (no optimizer step at its end): the module's own accumulation
        (``ManualOptimModule.accumulating``), else Lightning's (every ``accumulate_grad_batches``-th batch and the
        epoch's last one step)."""
        own = getattr(pl_module, "accumulating", None)
        if isinstance(own, bool):
            return own
        k = int(trainer.accumulate_grad_batches or 1)
        return (batch_idx + 1) % k != 0 and batch_idx + 1 != trainer.num_training_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (not self.armed or self._done or trainer.global_step % self.every_n_steps
                or self._accumulating(trainer, pl_module, batch_idx)):
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):  # any rank signalled
            return
        self._done = True
        # private, no public equivalent in lightning 2.6.6: the next hpc_ckpt_<n>.ckpt, named as Lightning's own
        # `ckpt_path="hpc"` resume and its SIGUSR1 handler expect
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        rank_zero_info(f"SafeRequeue: requeue signal received; saving {path} at global step {trainer.global_step}")
        trainer.save_checkpoint(path)  # every rank, at the same point (a collective for sharded strategies)
        self.saved_path = str(path)
        if trainer.is_global_zero:
            if self.marker:
                self._write_marker(str(path), trainer.global_step)
            else:
                self._requeue()
        trainer.should_stop = True  # no step past the checkpoint: the requeued run continues at global_step + 1

    def _write_marker(self, ckpt: str, step: int) -> None:
        marker = Path(self.marker)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"job": slurm_job_id(), "checkpoint": ckpt, "global_step": step}))
        os.replace(tmp, marker)  # the script never sees a half-written marker
        rank_zero_info(f"SafeRequeue: checkpoint saved; the batch script requeues the job once all ranks have exited "
                       f"(marker {marker})")

    @staticmethod
    def _requeue() -> None:
        job = slurm_job_id()
        if job is None or not re.fullmatch(r"[0-9_]+", job):
            rank_zero_warn(f"SafeRequeue: no usable SLURM job id ({job!r}); not requeued")
            return
        try:
            rc = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            rank_zero_warn("SafeRequeue: `scontrol` not found in the job environment; the job is NOT requeued")
            return
        if rc == 0:
            rank_zero_info(f"SafeRequeue: requeued SLURM job {job}")
        else:
            rank_zero_warn(f"SafeRequeue: `scontrol requeue {job}` failed with exit code {rc}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.armed and os.getpid() == self._pid and threading.current_thread() is threading.main_thread():
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._signum = None
