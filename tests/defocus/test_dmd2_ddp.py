"""DMD2Module on 2 CPU ranks (DDP, gloo): the generator and guidance weights stay identical across ranks through
generator and guidance-only turns, and the backward-simulation depth agrees on every iteration."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli_recorded
from tests.defocus.test_dmd2_module import write_dmd2_shards

pytestmark = pytest.mark.slow

RECORD = """
import json, os
import lightning as L
import torch


class Record(L.Callback):
    def __init__(self):
        self.sums, self.backsim = [], []

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.sums.append({net: sum(p.detach().double().abs().sum().item() for p in getattr(pl_module, net).parameters())
                          for net in ("generator", "guidance", "teacher")})
        self.backsim.append(pl_module.last_backsim)

    def on_train_end(self, trainer, pl_module):
        out = os.environ["CTRLGEN_TEST_OUT"] + f"/rank{trainer.global_rank}"
        torch.save({k: v.detach().cpu() for k, v in pl_module.generator.state_dict().items()}, out + ".pt")
        open(out + ".json", "w").write(json.dumps({"iteration": pl_module.iteration, "sums": self.sums,
                                                   "backsim": self.backsim}))
"""


def test_ddp_two_ranks_generator_identical_and_backsim_agrees(tmp_path, monkeypatch):
    for k, v in write_dmd2_shards(tmp_path / "shards").items():
        monkeypatch.setenv(k, v)
    args = ["fit", "-c", "configs/defocus/dmd2_tiny.yaml", "-c", "configs/trainer/ddp_cpu.yaml",
            "--trainer.strategy.init_args.find_unused_parameters=true", "--model.init_args.max_iterations=6",
            "--trainer.val_check_interval=3", "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    r, ranks = run_cli_recorded(tmp_path, RECORD, args)
    assert "distributed_backend=gloo" in r.stderr + r.stdout
    assert all(rec["iteration"] == 6 and len(rec["sums"]) == 6 for rec in ranks)
    assert ranks[0]["sums"] == ranks[1]["sums"]  # exact, after every iteration
    assert ranks[0]["backsim"] == ranks[1]["backsim"] and len(set(ranks[0]["backsim"])) > 1
    g = [s["generator"] for s in ranks[0]["sums"]]
    assert g[0] == g[1] != g[2] == g[3] != g[4] == g[5]  # generator steps at iterations 0, 2, 4 only
    assert len({s["guidance"] for s in ranks[0]["sums"]}) == 6 and len({s["teacher"] for s in ranks[0]["sums"]}) == 1
    sd0, sd1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
