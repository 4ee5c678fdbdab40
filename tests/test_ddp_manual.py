"""2 processes on CPU (DDP, gloo) with manual optimisation: the tiny GAN's generator and critic stay identical across
ranks through generator and critic-only turns, per-rank noise differs, rank-identical choices agree; with gradient
accumulation the early micro-batches skip DDP's all-reduce and the ranks still agree after every step."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli_recorded

pytestmark = pytest.mark.slow

RECORD = """
import json, os
import lightning as L
import torch

from tests.helpers.tiny_gan import TinyGANModule


class SyncRecordingGAN(TinyGANModule):  # per backward: (micro-batch, whether DDP all-reduces its gradients)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.syncs = []

    def manual_backward(self, loss, *args, **kwargs):
        self.syncs.append([self.micro_batch, bool(self.trainer.strategy.model.require_backward_grad_sync)])
        return super().manual_backward(loss, *args, **kwargs)


class Record(L.Callback):
    def __init__(self):
        self.sums = []

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.sums.append({net: sum(p.detach().double().abs().sum().item() for p in getattr(pl_module, net).parameters())
                          for net in ("generator", "critic")})

    def on_train_end(self, trainer, pl_module):
        out = os.environ["CTRLGEN_TEST_OUT"] + f"/rank{trainer.global_rank}"
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, out + ".pt")
        rec = {"iteration": pl_module.iteration, "global_step": trainer.global_step, "sums": self.sums,
               "levels": pl_module.seen_levels, "noise": [n.flatten().tolist() for n in pl_module.seen_noise],
               "syncs": getattr(pl_module, "syncs", None)}
        open(out + ".json", "w").write(json.dumps(rec))
"""


def test_ddp_manual_two_ranks_stay_identical(shapes_shards, tmp_path):
    args = ["fit", "-c", "tests/configs/tiny_gan.yaml", "-c", "configs/trainer/ddp_cpu.yaml",
            "--trainer.strategy.init_args.find_unused_parameters=true",
            f"--data.init_args.train_shards={shapes_shards['train']}", f"--data.init_args.val_shards={shapes_shards['val']}",
            "--model.init_args.max_iterations=6", "--model.init_args.update_every={generator: 3}",
            "--trainer.val_check_interval=3", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    r, ranks = run_cli_recorded(tmp_path, RECORD, args)
    assert "distributed_backend=gloo" in r.stderr + r.stdout
    for rec in ranks:  # generator turns at iterations 0 and 3, critic every iteration
        assert rec["iteration"] == 6 and rec["global_step"] == 2 + 6 and len(rec["sums"]) == 6
    assert ranks[0]["sums"] == ranks[1]["sums"]  # identical after every iteration (exact)
    g = [s["generator"] for s in ranks[0]["sums"]]
    c = [s["critic"] for s in ranks[0]["sums"]]
    assert g[0] == g[1] == g[2] != g[3] == g[4] == g[5]  # the generator moves on its turns only (0 and 3)
    assert len(set(c)) == 6  # the critic moves every iteration
    sd0, sd1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert ranks[0]["levels"] == ranks[1]["levels"] and len(set(ranks[0]["levels"])) > 1  # rank-identical choices
    assert ranks[0]["noise"] != ranks[1]["noise"]  # per-rank generator: latents differ across ranks


def test_ddp_manual_accumulation_skips_early_all_reduce_and_ranks_agree(shapes_shards, tmp_path):
    args = ["fit", "-c", "tests/configs/tiny_gan.yaml", "-c", "configs/trainer/ddp_cpu.yaml",
            "--trainer.strategy.init_args.find_unused_parameters=true", "--model.class_path=record_cb.SyncRecordingGAN",
            f"--data.init_args.train_shards={shapes_shards['train']}",
            f"--data.init_args.val_shards={shapes_shards['val']}", "--model.init_args.max_iterations=3", "--model.init_args.accumulate_grad_batches=2",
            "--trainer.val_check_interval=2", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    _, ranks = run_cli_recorded(tmp_path, RECORD, args)
    for rec in ranks:  # generator at iterations 0 and 2, critic every iteration; 2 batches per iteration
        assert rec["iteration"] == 3 and rec["global_step"] == 2 + 3 and len(rec["sums"]) == 6
        assert rec["syncs"] == [[0, False], [0, False], [1, True], [1, True], [0, False], [1, True],
                                [0, False], [0, False], [1, True], [1, True]]
    assert ranks[0]["sums"] == ranks[1]["sums"]  # identical after every batch (exact)
    g = [s["generator"] for s in ranks[0]["sums"]]
    c = [s["critic"] for s in ranks[0]["sums"]]
    assert g[0] != g[1] == g[2] == g[3] == g[4] != g[5]  # steps on the last micro-batch of iterations 0 and 2
    assert c[0] != c[1] == c[2] != c[3] == c[4] != c[5]  # steps on the last micro-batch of every iteration
    assert ranks[0]["noise"] != ranks[1]["noise"]
