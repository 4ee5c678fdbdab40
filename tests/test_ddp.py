"""2 processes on CPU (DDP, gloo): equal batches per rank, different noise per rank, one config; lr and epoch length
follow the world size."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli_recorded

pytestmark = pytest.mark.slow

CHECK = """
import json, os
import lightning as L
class Record(L.Callback):
    def on_train_end(self, trainer, pl_module):
        out = {"rank": trainer.global_rank, "batches": len(pl_module.seen_keys),
               "keys": pl_module.seen_keys, "noise": [n.flatten().tolist() for n in pl_module.seen_noise],
               "lr": trainer.optimizers[0].param_groups[0]["lr"], "epoch_batches": trainer.num_training_batches}
        open(os.environ["CTRLGEN_TEST_OUT"] + f"/rank{trainer.global_rank}.json", "w").write(json.dumps(out))
"""


def test_ddp_two_ranks_equal_batches(shapes_shards, tmp_path):
    args = ["fit", "-c", "tests/configs/tiny.yaml", "-c", "configs/trainer/ddp_cpu.yaml",
            f"--data.init_args.train_shards={shapes_shards['train']}", f"--data.init_args.val_shards={shapes_shards['val']}",
            "--trainer.max_steps=6", "--data.init_args.train_samples_per_epoch=24",
            "--data.init_args.train_batches_per_epoch=null", "--trainer.val_check_interval=3",
            "--model.init_args.lr_reference_batch=4",
            "--data.init_args.num_workers=1", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    r, ranks = run_cli_recorded(tmp_path, CHECK, args)
    assert "distributed_backend=gloo" in r.stderr + r.stdout
    assert ranks[0]["batches"] == ranks[1]["batches"] == 6
    # the recipe follows the world size (common/recipe.py): 24 samples / (4 per rank x 2 ranks) = 3 batches per epoch;
    # lr 1e-3 per 4 samples x global batch 8 = 2e-3 on every rank
    assert ranks[0]["epoch_batches"] == ranks[1]["epoch_batches"] == 3
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(2e-3)
    assert ranks[0]["noise"] != ranks[1]["noise"]  # per-rank generator: noise differs across ranks
    assert ranks[0]["keys"] != ranks[1]["keys"]  # ranks draw different samples
    assert len(list((tmp_path / "run").rglob("config.yaml"))) == 1  # written once, by rank 0
