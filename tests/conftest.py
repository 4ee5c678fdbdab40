"""Shared fixtures: offline environment for every test, tiny shapes shards, process-group cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the environment above

# one intra-op thread per test process: tiny models on a shared 2-core box are many times slower oversubscribed
torch.set_num_threads(1)


# what Lightning's process launcher writes into the launching process's environment (``_SubprocessScriptLauncher``
# sets them even for a one-device DDP fit): a later ``ctrlgen fit`` subprocess inheriting LOCAL_RANK would start no
# ranks of its own and wait for them forever
LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    for k in LAUNCHER_VARS:  # restored to the state before the test (absent) by monkeypatch at teardown
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> dict[str, str]:
    """8 train, 2 val and 2 test shards of 8 samples each at 32 px (brace patterns)."""
    from ctrlgen.datamodules.synth import synth

    out = tmp_path_factory.mktemp("shapes")
    synth("shapes", out, n_train=64, n_val=16, n_test=16, size=32, shard_size=8)  # val/test: 2 equal shards each
    return {
        "dir": str(out),
        "train": str(out / "train-{000000..000007}.tar"),
        "val": str(out / "val-{000000..000001}.tar"),
        "test": str(out / "test-{000000..000001}.tar"),
    }


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def ctrlgen_cmd() -> list[str]:
    return [sys.executable, "-m", "ctrlgen.lightning_modules.cli"]


def run_cli_recorded(tmp_path: Path, recorder_src: str, args: list[str], ranks: int = 2,
                     module: str = "record_cb") -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``ctrlgen <args>`` in a subprocess with ``recorder_src`` (a module defining a ``Record`` callback that writes
    ``$CTRLGEN_TEST_OUT/rank{r}.json``) appended to the trainer callbacks; fails with stderr's tail on a non-zero
    exit and returns the process and the per-rank records."""
    (tmp_path / f"{module}.py").write_text(recorder_src)
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    env["CTRLGEN_TEST_OUT"] = str(tmp_path)
    r = subprocess.run(ctrlgen_cmd() + args + [f"--trainer.callbacks+={module}.Record"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return r, [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(ranks)]


def assert_same_state(sa: dict, sb: dict, atol: float = 1e-6) -> None:
    """Two state dicts hold the same keys and values equal within ``atol`` (resume == uninterrupted run)."""

    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:10]
    for k, a in sa.items():
        assert torch.allclose(a, sb[k], atol=atol, rtol=0), k
