"""Static checks of the sbatch templates and the cluster script (no cluster; the slurm tier runs them for real)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.slurm.slurmctl import REPO

SLURM = REPO / "slurm"
TRAIN = ["train.sbatch", "train_multinode.sbatch"]
ALL = [*TRAIN, "test.sbatch", "local_cluster.sh"]


def _directives(text: str) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith("#SBATCH")]


def _body(text: str) -> str:
    return text[text.index("# ---- body"):]


@pytest.mark.parametrize("name", ALL)
def test_bash_syntax(name):
    bash = shutil.which("bash")
    r = subprocess.run([bash, "-n", str(SLURM / name)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", TRAIN)
def test_train_template_requeue_contract(name):
    text = (SLURM / name).read_text()
    d = _directives(text)
    assert "--signal=SIGUSR1@90" in d  # every job step (the ranks), not B: (batch shell only; lightning#20542)
    assert not any("B:" in x for x in d)
    assert "--requeue" in d and "--open-mode=append" in d
    assert any(x.startswith("--ntasks-per-node=") for x in d) and not any(x.startswith("--ntasks=") for x in d)
    srun = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun) == 1 and "-m ctrlgen.lightning_modules.cli" in srun[0] and '"${args[@]}"' in srun[0]
    assert not re.search(r"^[^#]*--ckpt_path", text, re.MULTILINE)  # HPC resume, never --ckpt_path
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text
    assert '--trainer.devices=${SLURM_NTASKS_PER_NODE:-1}' in text and '--trainer.num_nodes=${SLURM_NNODES:-1}' in text
    assert text.index("slurm.py\" preflight") < text.index("args=(")  # refuse before using the counts
    assert '--trainer.logger.init_args.id=$RUN' in text and "RUN=${SLURM_JOB_NAME}-${JOB}" in text
    assert "lightning_modules/common/slurm.py\" preflight" in text


def test_multinode_body_equals_single_node_body():
    a, b = ((SLURM / n).read_text() for n in TRAIN)
    assert _body(a) == _body(b), "slurm/train.sbatch and train_multinode.sbatch must share their body verbatim"
    assert "--nodes=2" in _directives(b) and "--nodes=1" in _directives(a)


def test_test_template():
    text = (SLURM / "test.sbatch").read_text()
    d = _directives(text)
    assert "--no-requeue" in d and not any(x.startswith("--signal") for x in d)
    assert 'args+=("--ckpt_path=$CKPT")' in text and "RUN=${SLURM_JOB_NAME}-${JOB}-test" in text
    assert re.search(r"^srun .*-m ctrlgen.lightning_modules.cli", text, re.MULTILINE)


def test_cluster_script_follows_the_recipe():
    text = (SLURM / "local_cluster.sh").read_text()
    for key in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "AccountingStorageType=accounting_storage/none",
                "SlurmctldPidFile=${CTLD_PID}", "runuser -u munge -- /usr/sbin/munged", "/usr/sbin/slurmctld",
                "/usr/sbin/slurmd", "slurmctld slurmd slurm-client munge"):
        assert key in text, key
    assert not re.search(r"pkill|killall", text)  # teardown by pidfile only
