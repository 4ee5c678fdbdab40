"""A real offline W&B run: written where the CLI says, with the logged metric keys, media and the CLI config."""

from __future__ import annotations

import subprocess
import time

from tests.conftest import REPO, cli_env, ctrlgen_cmd
from tests.utils.wandb_records import config_keys, history


def test_offline_run_holds_metrics_media_and_config(shapes_shards, tmp_path):
    env = cli_env()
    env["WANDB_MODE"] = "offline"
    args = ["fit", "-c", "tests/configs/tiny.yaml", "-c", "configs/logger/wandb.yaml",
            f"--data.init_args.train_shards={shapes_shards['train']}",
            f"--data.init_args.val_shards={shapes_shards['val']}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger.init_args.id=ctrlgen-test-run"]
    r = subprocess.run(ctrlgen_cmd() + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*-ctrlgen-test-run"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    run = runs[0]
    files = list(run.glob("run-*.wandb"))
    assert len(files) == 1
    keys: set[str] = set()
    deadline = time.monotonic() + 90
    while "val/loss" not in keys and time.monotonic() < deadline:  # wandb-core may still be flushing under load
        keys = {k for row in history(files[0]) for k in row}
        if "val/loss" not in keys:
            time.sleep(2)
    for k in ("train/loss", "val/loss", "data/skipped", "perf/samples_per_sec", "trainer/global_step"):
        assert k in keys, (k, sorted(keys))
    assert any(k.startswith("samples/reconstruction") for k in keys)
    assert list((run / "files" / "media" / "images").rglob("*.png")), "sample grid not logged"
    assert "cli" in config_keys(files[0])  # the resolved CLI config reached W&B
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    dry = subprocess.run([str(REPO / ".venv" / "bin" / "wandb"), "sync", "--dry-run", str(run)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert dry.returncode == 0, dry.stderr
