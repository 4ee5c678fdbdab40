"""The slurm tier's cluster: ``CTRLGEN_SLURM=1`` brings the local single-node Slurm up for the session
(``slurm/local_cluster.sh up``: installs the packages if missing, needs root) and takes it down at the end, also when a
test fails or the run is interrupted. Without it, the tests use a cluster that is already running, or skip."""

from __future__ import annotations

import atexit
import os
import subprocess

import pytest

from tests.slurm.slurmctl import LOCAL_CLUSTER, cluster_running

_state = {"owned": False, "down": False}


def _down() -> None:
    if _state["owned"] and not _state["down"]:
        _state["down"] = True
        subprocess.run([str(LOCAL_CLUSTER), "down"], timeout=120, check=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    """``{"owned": bool}``: owned = this session started it and will stop it (``local_cluster.sh down``)."""
    if os.environ.get("CTRLGEN_SLURM") != "1":
        if cluster_running():
            yield {"owned": False}
            return
        pytest.skip("slurm tier: no Slurm cluster is running; set CTRLGEN_SLURM=1 to bring up the local one "
                    "(slurm/local_cluster.sh up; root, Debian/apt) or start it yourself")
    if os.geteuid() != 0:
        pytest.fail("CTRLGEN_SLURM=1 but not root: slurm/local_cluster.sh needs root (daemons, /etc/slurm, apt)")
    _state.update(owned=True, down=False)
    atexit.register(_down)  # also on KeyboardInterrupt / an aborted session
    try:
        r = subprocess.run([str(LOCAL_CLUSTER), "up"], capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh up failed:\n{r.stdout}\n{r.stderr}")
        yield {"owned": True}
    finally:
        _down()


@pytest.fixture
def slurm_down():
    """Stop the session's cluster now (``local_cluster.sh down``); a no-op if this session does not own it."""
    return _down
