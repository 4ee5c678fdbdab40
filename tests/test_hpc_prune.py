"""callbacks/hpc_prune.py: keep only the newest complete hpc_ckpt_N.ckpt (platform.md §2)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ctrlgen.callbacks.hpc_prune as hpc
from ctrlgen.callbacks.hpc_prune import (
    HPCCheckpointPrune,
    SafeRequeue,
    hpc_checkpoints,
    is_complete,
    prune_hpc_checkpoints,
)


def _ckpt(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "w": torch.full((64,), float(step))}, path)
    return path


def _truncate(path: Path, step: int) -> Path:
    _ckpt(path, step)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a save cut short: no zip central directory
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_keeps_only_newest_complete(tmp_path):
    for n in (1, 2, 10):
        _ckpt(tmp_path / f"hpc_ckpt_{n}.ckpt", n)
    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "hpc_ckpt_3.ckpt.tmp").write_bytes(b"x")
    assert [n for n, _ in hpc_checkpoints(tmp_path)] == [1, 2, 10]  # numeric order, not lexical
    report = prune_hpc_checkpoints(tmp_path)
    assert _names(tmp_path) == ["hpc_ckpt_10.ckpt", "hpc_ckpt_3.ckpt.tmp", "last.ckpt"]
    assert len(report["deleted"]) == 2 and report["moved"] is None
    assert prune_hpc_checkpoints(tmp_path)["deleted"] == []  # idempotent


def test_keep_two(tmp_path):
    for n in (1, 2, 3):
        _ckpt(tmp_path / f"hpc_ckpt_{n}.ckpt", n)
    prune_hpc_checkpoints(tmp_path, keep=2)
    assert _names(tmp_path) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]


def test_truncated_newest_is_replaced_by_newest_complete(tmp_path):
    _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 1)
    _ckpt(tmp_path / "hpc_ckpt_2.ckpt", 2)
    _truncate(tmp_path / "hpc_ckpt_3.ckpt", 3)
    assert not is_complete(tmp_path / "hpc_ckpt_3.ckpt") and is_complete(tmp_path / "hpc_ckpt_2.ckpt")
    report = prune_hpc_checkpoints(tmp_path)
    # the name Lightning's SLURM resume already picked (the highest) now holds the newest loadable checkpoint
    assert _names(tmp_path) == ["hpc_ckpt_3.ckpt"]
    assert torch.load(tmp_path / "hpc_ckpt_3.ckpt")["global_step"] == 2
    assert report["moved"] == (str(tmp_path / "hpc_ckpt_2.ckpt"), str(tmp_path / "hpc_ckpt_3.ckpt"))
    # after a save (no resume pending) an incomplete file is just dropped
    _ckpt(tmp_path / "hpc_ckpt_4.ckpt", 4)
    _truncate(tmp_path / "hpc_ckpt_5.ckpt", 5)
    prune_hpc_checkpoints(tmp_path, fix_highest=False)
    assert _names(tmp_path) == ["hpc_ckpt_4.ckpt"]


def test_nothing_complete_touches_nothing(tmp_path):
    _truncate(tmp_path / "hpc_ckpt_1.ckpt", 1)
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"")
    report = prune_hpc_checkpoints(tmp_path)
    assert _names(tmp_path) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"] and len(report["incomplete_only"]) == 2
    assert prune_hpc_checkpoints(tmp_path / "missing") == {"kept": [], "deleted": [], "moved": None}


def test_sharded_directories(tmp_path):
    for n in (1, 2):
        d = tmp_path / f"hpc_ckpt_{n}.ckpt"
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"x")
        (d / "meta.pt").write_bytes(b"x")
    partial = tmp_path / "hpc_ckpt_3.ckpt"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x")  # metadata never written
    prune_hpc_checkpoints(tmp_path)
    assert _names(tmp_path) == ["hpc_ckpt_3.ckpt"] and (tmp_path / "hpc_ckpt_3.ckpt" / "meta.pt").exists()


def test_callback_rank_zero_only_and_after_save(tmp_path):
    barriers = []
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=False,
                              strategy=SimpleNamespace(barrier=lambda name=None: barriers.append(name)))
    cb = HPCCheckpointPrune()
    for n in (1, 2):
        _ckpt(tmp_path / f"hpc_ckpt_{n}.ckpt", n)
    cb.setup(trainer, None, "fit")
    assert len(_names(tmp_path)) == 2 and barriers  # other ranks only wait
    trainer.is_global_zero = True
    cb.on_train_batch_end(trainer)  # no save since: nothing to do
    assert len(_names(tmp_path)) == 2
    cb.on_save_checkpoint(trainer, None, {})
    _ckpt(tmp_path / "hpc_ckpt_3.ckpt", 3)  # the file is written after the hook
    cb.on_train_batch_end(trainer)
    assert _names(tmp_path) == ["hpc_ckpt_3.ckpt"]
    trainer.default_root_dir = "s3://bucket/run"
    assert cb.prune(trainer, fix_highest=True) is None  # remote dirs are left alone
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        HPCCheckpointPrune(keep=0)


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "prune",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_STEP_ID": "0", "SLURM_NODELIST": "localhost"}


def test_slurm_resume_survives_a_truncated_newest_checkpoint(shapes_shards, tmp_path, monkeypatch):
    """Lightning's SLURM resume loads the highest hpc_ckpt_N blindly; with the callback a cut-short save costs only
    the steps since the previous one."""
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    def fit(steps, *extra):
        return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny.yaml",
                                f"--data.init_args.train_shards={shapes_shards['train']}",
                                "--trainer.limit_val_batches=0",
                                f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={tmp_path}", *extra])

    first = fit(2)
    first.trainer.save_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")
    _truncate(tmp_path / "hpc_ckpt_2.ckpt", 99)
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="central directory"):  # without the callback: hpc_ckpt_2 does not load
        fit(4)
    resumed = fit(4, "--trainer.callbacks+=ctrlgen.callbacks.hpc_prune.HPCCheckpointPrune")
    assert Path(resumed.trainer.ckpt_path) == tmp_path / "hpc_ckpt_2.ckpt"  # the path Lightning picked ...
    assert resumed.trainer.global_step == 4 and len(resumed.model.seen_noise) == 2  # ... held step 2's state
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]


def test_safe_requeue_ignores_forked_children_and_non_slurm():
    cb = SafeRequeue()
    cb._pid = os.getpid() + 1  # as seen from a forked DataLoader worker: the parent's pid
    cb._handler(signal.SIGUSR1, None)
    assert not cb._requested
    cb._pid = os.getpid()
    cb._handler(signal.SIGUSR1, None)
    assert cb._requested
    before = signal.getsignal(signal.SIGUSR1)
    idle = SafeRequeue()
    idle.setup(SimpleNamespace(strategy=SimpleNamespace(cluster_environment=None)), None, "fit")  # not SLURM
    assert not idle.armed and signal.getsignal(signal.SIGUSR1) == before
    assert hpc.slurm_job_id({"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}) == "5_2"
    assert hpc.slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        SafeRequeue(every_n_steps=0)


@pytest.mark.parametrize("by_script", [False, True], ids=["scontrol", "marker"])
def test_safe_requeue_saves_at_step_boundary_requeues_and_resumes_exactly(shapes_shards, tmp_path, monkeypatch,
                                                                           by_script):
    """Under (fake) SLURM: SIGUSR1 during step 3 → hpc_ckpt_1 holds exactly step 3, the fit stops there and either
    `scontrol requeue <job>` is called once, or (under the template, ``CTRLGEN_REQUEUE_MARKER`` set) only the marker
    file is written for the batch script; the next fit resumes from it and trains steps 4..6 only."""
    import lightning as L

    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    class Signal(L.Callback):  # stand-in for Slurm's --signal: arrives in the middle of step 3
        def on_before_optimizer_step(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    calls = []
    monkeypatch.setattr(hpc.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    marker = tmp_path / "markers" / ".requeue-4242"
    if by_script:
        monkeypatch.setenv(hpc.REQUEUE_MARKER_ENV, str(marker))
    monkeypatch.setattr("tests.test_hpc_prune.Signal", Signal, raising=False)  # importable by class path

    def fit(*extra):
        return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny.yaml", "--trainer.limit_val_batches=0",
                                f"--data.init_args.train_shards={shapes_shards['train']}", "--trainer.max_steps=6",
                                "--data.init_args.num_workers=1", f"--trainer.default_root_dir={tmp_path}",
                                "--trainer.callbacks+=ctrlgen.callbacks.hpc_prune.SafeRequeue", *extra])

    before = signal.getsignal(signal.SIGUSR1)
    first = fit("--trainer.callbacks+=tests.test_hpc_prune.Signal")
    assert first.trainer.global_step == 3
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    if by_script:
        assert calls == [] and json.loads(marker.read_text()) == {
            "job": "4242", "checkpoint": str(tmp_path / "hpc_ckpt_1.ckpt"), "global_step": 3}
        marker.unlink()  # what the batch script does before `scontrol requeue`
    else:
        assert calls == [["scontrol", "requeue", "4242"]] and not marker.exists()
    assert signal.getsignal(signal.SIGUSR1) == before  # SafeRequeue.teardown put the previous handler back
    resumed = fit()
    assert Path(resumed.trainer.ckpt_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert resumed.trainer.global_step == 6 and len(resumed.model.seen_noise) == 3
    assert len(calls) == (0 if by_script else 1) and not marker.exists()  # no second requeue
