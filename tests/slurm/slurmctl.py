"""Small helpers around the Slurm commands for the slurm test tier (sbatch, scontrol, waiting)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "munged")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def cluster_running() -> bool:
    """A Slurm controller answers and has an idle/usable node."""
    return any(re.match(r"(idle|mix|alloc|comp)", st) for st in node_states(timeout=10))


def daemons_alive() -> dict[str, list[int]]:
    """{daemon: [pids]} for the Slurm/munge daemons still running (exact process names)."""
    out = {}
    for name in (*DAEMONS, "slurmstepd"):
        r = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
        pids = [int(p) for p in r.stdout.split()]
        if pids:
            out[name] = pids
    return out


def job_env(**extra: str) -> dict[str, str]:
    """Environment a test job is submitted with (sbatch exports it): offline, 1 thread, the repo's interpreter."""
    # not WANDB_SERVICE either: an earlier in-process W&B test left this pytest's wandb-core address there (the
    # templates unset it too; test_requeue_resumes_exactly checks the template does)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PYTEST_", "SBATCH_", "SRUN_")) and k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), CTRLGEN_PYTHON=sys.executable, CTRLGEN_ACCELERATOR="cpu")
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str]) -> int:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return int(r.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, timeout=30,
                       check=False)
    if r.returncode != 0:
        return {}
    info = {}
    for tok in r.stdout.split():
        if "=" in tok:
            k, _, v = tok.partition("=")
            info.setdefault(k, v)
    return info


def wait_for(job: int, pred, timeout: float, what: str, poll: float = 0.5) -> dict[str, str]:
    """Poll ``scontrol show job`` until ``pred(info)``; on timeout cancel the job and fail with its state."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job)
        if info and pred(info):
            return info
        time.sleep(poll)
    detail = _why_pending(job) if info.get("JobState") == "PENDING" else ""
    subprocess.run(["scancel", str(job)], capture_output=True, check=False)
    raise AssertionError(f"job {job}: {what} not reached within {timeout:.0f} s; last state {info.get('JobState')} "
                         f"reason {info.get('Reason')} (job cancelled){detail}")


def _why_pending(job: int) -> str:
    """The job, node and partition as the controller sees them (a pending job's reason is about one of them)."""
    out = []
    for what in (["job", str(job)], ["node"], ["partition"]):
        try:
            r = subprocess.run(["scontrol", "show", *what], capture_output=True, text=True, timeout=30, check=False)
            out.append(f"\n== scontrol show {' '.join(what)}\n{(r.stdout or r.stderr).strip()}")
        except (subprocess.TimeoutExpired, OSError) as err:
            out.append(f"\n== scontrol show {' '.join(what)}: {err}")
    return "".join(out)


def wait_done(job: int, timeout: float) -> dict[str, str]:
    return wait_for(job, lambda i: i.get("JobState") in FINISHED, timeout, "a final state")


def node_states(timeout: float = 30) -> list[str]:
    """Compact state of every node (``idle``, ``alloc``, ``comp``, ...) as ``sinfo -N`` prints it; [] when there is
    no Slurm or its controller does not answer."""
    if shutil.which("sinfo") is None:
        return []
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=timeout,
                           check=False)
    except (subprocess.TimeoutExpired, OSError):
        return []
    return r.stdout.split() if r.returncode == 0 else []


def release_requeued(job: int, timeout: float = 60) -> None:
    """Start a requeued job now instead of after Slurm's ~120 s BeginTime hold, safely.

    When slurmd terminates the first attempt it revokes the job's credential, with one-second resolution: a
    relaunch allocated in the same second carries a credential it counts as revoked, and slurmctld fails the job
    ("Killing non-startable batch JobId=N: Job credential revoked", FAILED 1:0, nothing run; seen under load).
    So wait until no node is still completing, then until the wall-clock second has changed twice, then release.
    """
    deadline = time.monotonic() + timeout
    while any(s.startswith("comp") for s in node_states()):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job}: a node is still completing after {timeout:.0f} s: {node_states()}")
        time.sleep(0.25)
    t0 = int(time.time())
    while int(time.time()) < t0 + 2:
        time.sleep(0.1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
