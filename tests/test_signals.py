"""SIGTERM/SIGINT during fit: a checkpoint at the next step boundary, a non-zero exit that says so, exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import REPO, assert_same_state, cli_env, ctrlgen_cmd

SENDER = '''
import os, signal
import lightning as L


class SendAtStep(L.Callback):
    """Sends the signal to this process at the start of training batch STEP (-1: in setup, before any step)."""

    def __init__(self):
        self.step, self.sig = int(os.environ["SEND_AT_STEP"]), getattr(signal, os.environ["SEND_SIGNAL"])

    def setup(self, trainer, pl_module, stage):
        if self.step < 0:
            os.kill(os.getpid(), self.sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
'''


def _fit(shards, root, steps, extra=(), env_extra=None, timeout=300):
    env = cli_env()
    env.update(env_extra or {})
    args = ["fit", "-c", "tests/configs/tiny.yaml", f"--data.init_args.train_shards={shards['train']}",
            f"--trainer.max_steps={steps}", "--data.init_args.train_batches_per_epoch=4",
            "--trainer.limit_val_batches=0", "--data.init_args.num_workers=1", f"--trainer.default_root_dir={root}",
            *extra]
    return subprocess.run(ctrlgen_cmd() + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_fit_saves_at_a_step_boundary_and_resumes_exactly(shapes_shards, tmp_path, sig):
    (tmp_path / "send_cb.py").write_text(SENDER)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env()['PYTHONPATH']}", "SEND_AT_STEP": "3",
           "SEND_SIGNAL": sig}
    r = _fit(shapes_shards, tmp_path / "b", 50, ["--trainer.callbacks+=send_cb.SendAtStep"], env)
    signum = getattr(signal, sig)
    assert r.returncode == 128 + signum, r.stderr[-3000:]
    assert f"stopped by {sig} at step 4" in r.stderr, r.stderr[-2000:]
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the step that was running completed
    resumed = _fit(shapes_shards, tmp_path / "b", 7, ["--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _fit(shapes_shards, tmp_path / "a", 7)
    assert straight.returncode == 0, straight.stderr[-3000:]
    sa = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    sb = torch.load(last, weights_only=False)
    assert sa["global_step"] == sb["global_step"] == 7
    assert_same_state(sa["state_dict"], sb["state_dict"])


def test_sigterm_before_the_first_step_exits_promptly_without_checkpoint(shapes_shards, tmp_path):
    (tmp_path / "send_cb.py").write_text(SENDER)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env()['PYTHONPATH']}", "SEND_AT_STEP": "-1",
           "SEND_SIGNAL": "SIGTERM"}
    t0 = time.perf_counter()
    r = _fit(shapes_shards, tmp_path / "run", 50, ["--trainer.callbacks+=send_cb.SendAtStep"], env, timeout=120)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "SIGTERM before the first training step: exiting without a checkpoint" in r.stderr
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert time.perf_counter() - t0 < 120
