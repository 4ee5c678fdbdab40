"""The slurm tier: real ``sbatch`` jobs on the local single-node Slurm (``slurm/local_cluster.sh``, platform.md §2.1).

Every training job is the real ``slurm/train.sbatch``, parametrised for CPU on the command line and by env vars
(2 tasks, 1 CPU each, no GPU, gloo): what is tested is the file users submit.

1. 2 ranks train tiny configs of the LightningModules and exit 0 under SLURMEnvironment; ``slurm/test.sbatch``
   evaluates the result.
2. SIGUSR1 mid-run → hpc_ckpt_1.ckpt at a step boundary (ctrlgen.callbacks.hpc_prune.SafeRequeue) → requeued by rank 0 →
   released → resumes → finishes: every step 1..max_steps trained exactly once, one W&B run id, one config.yaml, an
   appended log.
3. A job without ``srun`` or with mismatched tasks/devices/nodes is refused with a clear message, fast.
4. ``local_cluster.sh down`` leaves no slurmctld/slurmd/munged.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.slurmctl import (
    FINISHED,
    REPO,
    cluster_running,
    daemons_alive,
    job_env,
    job_info,
    read,
    release_requeued,
    sbatch,
    wait_done,
    wait_for,
)
from tests.utils.wandb_records import records

pytestmark = pytest.mark.slurm

CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=5:00"]
# tiny configs of the LightningModules, trained by the same template (a fixed list: a missing config fails)
MODULE_CONFIGS = [
    pytest.param("tiny-ae", "tests/configs/tiny.yaml", [], id="tiny_ae"),
    pytest.param("ecm-vqvae", "configs/ecm/demo_vqvae.yaml",  # ECM stage 1 (VQVAEModule), shrunk for 2 CPU ranks
                 ["--data.init_args.batch_size=4", "--data.init_args.train_batches_per_epoch=4"], id="ecm_vqvae"),
]


def _data(shards: dict[str, str]) -> list[str]:
    return [f"--data.init_args.train_shards={shards['train']}", f"--data.init_args.val_shards={shards['val']}",
            "--data.init_args.num_workers=1"]


def _probes(d: Path, attempt: int = 0) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(d.glob(f"probe-r*-a{attempt}.json"))]


def _assert_ok(info: dict[str, str], log: str) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"job {info.get('JobId')} ended {info.get('JobState')} exit {info.get('ExitCode')}:\n{log[-6000:]}"


def _assert_two_slurm_ranks(probes: list[dict], job: int, log: str) -> None:
    assert sorted(p["rank"] for p in probes) == [0, 1], log[-4000:]
    for p in probes:
        assert p["cluster_environment"] == "SLURMEnvironment", p
        assert p["world_size"] == 2 and p["strategy"] == "DDPStrategy" and p["backend"] == "gloo", p
        assert p["step_id"] not in (None, "") and p["job_id"] == str(job), p  # started by srun, in this job
        assert p["master_port"] == str(20000 + job % 20000), p  # the template's port, not Lightning's 15000+
    assert "All distributed processes registered. Starting with 2 processes" in log
    assert "SLURM auto-requeueing enabled" in log


@pytest.mark.parametrize("name,config,extra", MODULE_CONFIGS)
def test_train_template_two_ranks(slurm_cluster, shapes_shards, tmp_path, name, config, extra):
    env = job_env(CTRLGEN_RUNS=str(tmp_path / "runs"), CTRLGEN_PROBE_DIR=str(tmp_path / "probe"))
    job = sbatch([*CPU_JOB, f"--job-name=ct-{name}", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                  "-c", config, "-c", "configs/logger/wandb.yaml", *_data(shapes_shards), *extra,
                  "--trainer.max_steps=6",
                  "--trainer.val_check_interval=3", "--trainer.check_val_every_n_epoch=null",
                  "--trainer.limit_val_batches=1", "--trainer.callbacks+=tests.slurm.helpers.SlurmProbe"], env)
    info = wait_done(job, 240)
    log = read(tmp_path / f"ct-{name}-{job}.out")
    _assert_ok(info, log)
    assert "ctrlgen preflight ok" in log and "`Trainer.fit` stopped: `max_steps=6` reached." in log, log[-4000:]
    _assert_two_slurm_ranks(_probes(tmp_path / "probe"), job, log)
    run = tmp_path / "runs" / f"ct-{name}-{job}"
    assert [p.name for p in run.rglob("config.yaml")] == ["config.yaml"]  # written once, by rank 0
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and wandb_runs[0].name.endswith(f"-ct-{name}-{job}"), wandb_runs
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists(), sorted(p.name for p in run.rglob("*"))
    if name != "tiny-ae":
        return
    # slurm/test.sbatch on the checkpoint: its own run dir, 2 ranks, exact test split (2 shards over 2 ranks)
    tjob = sbatch([*CPU_JOB, "--job-name=ct-test", f"--output={tmp_path}/%x-%j.out", "slurm/test.sbatch", str(last),
                   "-c", config, "-c", "configs/logger/wandb.yaml", *_data(shapes_shards),
                   f"--data.init_args.test_shards={shapes_shards['test']}"], env)
    tinfo = wait_done(tjob, 240)
    tlog = read(tmp_path / f"ct-test-{tjob}.out")
    _assert_ok(tinfo, tlog)
    assert f"Restoring states from the checkpoint path at {last}" in tlog, tlog[-4000:]
    assert "test/loss" in tlog, tlog[-4000:]
    assert (tmp_path / "runs" / f"ct-test-{tjob}-test").is_dir()


def test_requeue_resumes_exactly(slurm_cluster, shapes_shards, tmp_path):
    max_steps = 24
    probe = tmp_path / "probe"
    env = job_env(CTRLGEN_RUNS=str(tmp_path / "runs"), CTRLGEN_PROBE_DIR=str(probe), CTRLGEN_PROBE_SLEEP="0.4",
                  WANDB_SERVICE=_dead_wandb_service(tmp_path))  # a submitter's stale wandb-core: the template unsets it
    job = sbatch([*CPU_JOB, "--job-name=ct-requeue", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                  "-c", "tests/configs/tiny.yaml", "-c", "configs/logger/wandb.yaml", *_data(shapes_shards),
                  f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=8",
                  "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=1",
                  "--trainer.callbacks+=tests.slurm.helpers.SlurmProbe"], env)
    logf = tmp_path / f"ct-requeue-{job}.out"
    steps = probe / "steps.txt"
    run = tmp_path / "runs" / f"ct-requeue-{job}"

    # mid-run: a few steps done, far from the end
    wait_for(job, lambda i: len(read(steps).splitlines()) >= 6 or i.get("JobState") in FINISHED, 180,
             "6 training steps")
    assert job_info(job).get("JobState") == "RUNNING", read(logf)[-4000:]
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)  # stand-in for the time limit
    info = wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 120,
                    "requeued and PENDING")
    # Slurm holds a requeued job ~120 s; the reason may read None for a moment before the scheduler's next pass
    wait_for(job, lambda i: i.get("Reason") == "BeginTime" or i.get("JobState") != "PENDING", 30, "the BeginTime hold")
    info = job_info(job)
    assert info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime", info
    assert (run / "hpc_ckpt_1.ckpt").exists(), sorted(p.name for p in run.iterdir())
    # the batch script requeued only after srun returned: no rank of the first attempt is left, release the hold now
    assert subprocess.run(["pgrep", "-f", f"ct-requeue-{job}"], capture_output=True, check=False).returncode != 0
    release_requeued(job)  # not within the second slurmd revoked the first attempt's credential
    info = wait_done(job, 240)
    log = read(logf)
    _assert_ok(info, log)

    # one log, appended: both attempts, the signal, the requeue by rank 0, the resume from the HPC checkpoint
    assert f"ctrlgen job {job} run ct-requeue-{job} restart 0" in log
    assert f"ctrlgen job {job} run ct-requeue-{job} restart 1" in log
    assert "SafeRequeue: requeue signal received; saving" in log, log[-6000:]
    assert f"ctrlgen: all ranks exited after the requeue signal; requeueing job {job}" in log, log[-6000:]
    assert log.index("SafeRequeue: requeue signal received") < log.index("ctrlgen: all ranks exited") \
        < log.index("restart 1")
    assert "Handling auto-requeue signal" not in log  # Lightning's in-handler save (also run by DataLoader workers)
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in log, log[-6000:]
    assert f"`Trainer.fit` stopped: `max_steps={max_steps}` reached." in log
    _assert_two_slurm_ranks(_probes(probe, 1), job, log)

    # steps: attempt 0 ran 1..g and stopped at the step boundary where it saved the checkpoint (step g), attempt 1
    # ran g+1..max: every step trained exactly once, none repeated, none lost
    import torch

    ckpt = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    g = ckpt["global_step"]
    rows = [tuple(map(int, line.split())) for line in read(steps).splitlines() if line.strip()]
    a0 = [s for a, s in rows if a == 0]
    a1 = [s for a, s in rows if a == 1]
    assert a0 == list(range(1, len(a0) + 1)), a0
    assert 6 <= g == a0[-1] < max_steps, (g, a0)
    assert a1 == list(range(g + 1, max_steps + 1)), (g, a1)
    assert a0 + a1 == list(range(1, max_steps + 1))
    assert ckpt.get("loops", {}).get("fit_loop") is not None  # a full training-state checkpoint

    # one W&B run id across the requeue (one offline dir per attempt), one config.yaml, one hpc checkpoint kept
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2, wandb_runs
    for d in wandb_runs:
        assert d.name.endswith(f"-ct-requeue-{job}") and (d / f"run-ct-requeue-{job}.wandb").exists(), d
        kinds = [r.WhichOneof("record_type") for r in records(d / f"run-ct-requeue-{job}.wandb")]
        assert "exit" in kinds, (d, kinds[-5:])  # both attempts finished their W&B run (none killed mid-teardown)
    assert [p.relative_to(run).as_posix() for p in run.rglob("config.yaml")] == ["config.yaml"]
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]


def _dead_wandb_service(tmp: Path) -> str:
    """A ``WANDB_SERVICE`` value naming a wandb-core socket that does not exist (what a submitter that used wandb
    in-process exports; a job that kept it would fail to connect or log through the submitter's process)."""
    from wandb.sdk.lib.service.service_token import UnixServiceToken

    return UnixServiceToken(parent_pid=os.getpid(), path=str(tmp / "no-such-wandb-core.sock")).env_value


def _guard_script(tmp: Path, entry: str, srun: bool, devices: int, num_nodes: int, shards: dict[str, str]) -> Path:
    cmd = [sys.executable, "-m", entry, "fit", "-c", "tests/configs/tiny.yaml", *_data(shards),
           "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.num_nodes={num_nodes}",
           f"--trainer.default_root_dir={tmp / 'run'}", "--trainer.max_steps=2"]
    launch = "srun " if srun else ""
    script = tmp / "job.sbatch"
    script.write_text("#!/bin/bash\n"  # a hand-written job: the mistakes the templates avoid
                      f"cd {REPO}\n"
                      f"{launch}{shlex.join(cmd)}\n")
    return script


@pytest.mark.parametrize("entry", ["ctrlgen.lightning_modules.cli"])
@pytest.mark.parametrize("case", ["no_srun", "mismatch"])
def test_bad_launch_is_refused_fast(slurm_cluster, shapes_shards, tmp_path, entry, case):
    if case == "no_srun":  # python run by the batch script itself in a 2-task job: Lightning would hang forever
        script = _guard_script(tmp_path, entry, srun=False, devices=2, num_nodes=1, shards=shapes_shards)
        expect = ["not started by `srun`", "SLURM_NTASKS=2"]
    else:  # srun'd, but 2 tasks per node vs devices=1 and 1 node vs num_nodes=2
        script = _guard_script(tmp_path, entry, srun=True, devices=1, num_nodes=2, shards=shapes_shards)
        expect = ["--ntasks-per-node=2", "trainer.devices=1", "--nodes=1", "trainer.num_nodes=2"]
    job = sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=3:00", "--job-name=ct-guard",
                  f"--output={tmp_path}/%x-%j.out", str(script)], job_env())
    info = wait_done(job, 120)  # refused within seconds of the imports, never the time limit
    log = read(tmp_path / f"ct-guard-{job}.out")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-3000:])
    assert "ctrlgen SLURM launch guard: refusing to start" in log, log[-3000:]
    for e in expect:
        assert e in log, (e, log[-3000:])
    assert not re.search(r"^Initializing distributed", log, re.MULTILINE)  # refused before any process group


def test_zz_down_leaves_no_daemons(slurm_cluster, slurm_down):
    """Last in this module: ``local_cluster.sh down`` stops everything this session started."""
    if not slurm_cluster["owned"]:
        pytest.skip("the cluster was not started by this session (CTRLGEN_SLURM unset): leaving it running")
    slurm_down()
    assert daemons_alive() == {}
    assert not cluster_running()
