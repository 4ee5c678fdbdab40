"""The recipe follows the cluster (common/recipe.py): lr from the global batch, epoch length from samples, schedule
length from the run — unit maths here, a real fit below, two DDP ranks in tests/test_ddp.py."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from ctrlgen.datamodules.base import ResumableDataModule
from ctrlgen.lightning_modules.common.recipe import bind_total_steps, global_batch_size, planned_iterations, scale_lr
from ctrlgen.lightning_modules.common.schedules import WarmupLinear, warmup_linear_factor


def _trainer(**kw):
    base = dict(max_steps=-1, max_epochs=None, limit_train_batches=1.0, accumulate_grad_batches=1, world_size=1,
                datamodule=None)
    return SimpleNamespace(**{**base, **kw})


def test_global_batch_counts_devices_and_accumulation():
    dm = SimpleNamespace(batch_size=96)
    assert global_batch_size(_trainer(world_size=8, datamodule=dm)) == 768
    assert global_batch_size(_trainer(world_size=2, accumulate_grad_batches=3, datamodule=dm)) == 576
    assert global_batch_size(_trainer(world_size=2, accumulate_grad_batches=3, datamodule=dm), accumulate=False) == 192
    with pytest.raises(ValueError, match="datamodule .*SimpleNamespace.* has no integer batch_size"):
        global_batch_size(_trainer(datamodule=SimpleNamespace()))


def test_scale_lr_scales_every_group_and_initial_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 1e-3, "initial_lr": 1e-3}], lr=1e-4)
    assert scale_lr(opt, 3.0) == pytest.approx([3e-4, 3e-3])
    assert opt.param_groups[1]["initial_lr"] == pytest.approx(3e-3) and "initial_lr" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="must be positive, got 0"):
        scale_lr(opt, 0)


def test_planned_iterations_is_the_tighter_bound():
    dm = SimpleNamespace(batches_per_epoch=10)
    assert planned_iterations(_trainer(max_epochs=3, datamodule=dm)) == 30
    assert planned_iterations(_trainer(max_epochs=3, max_steps=25, datamodule=dm)) == 25
    assert planned_iterations(_trainer(max_epochs=3, accumulate_grad_batches=4, datamodule=dm)) == 9  # ceil(10/4)
    assert planned_iterations(_trainer(max_epochs=3, accumulate_grad_batches=4, datamodule=dm), accumulate=False) == 30
    assert planned_iterations(_trainer(max_epochs=2, limit_train_batches=4, datamodule=dm)) == 8
    assert planned_iterations(_trainer(max_epochs=2, limit_train_batches=0.5, datamodule=dm)) == 10
    assert planned_iterations(_trainer(max_steps=7)) == 7
    assert planned_iterations(_trainer(max_steps=100, max_epochs=5, datamodule=dm), max_iterations=12) == 12
    with pytest.raises(ValueError, match="total_steps: null needs a bounded run"):
        planned_iterations(_trainer(max_epochs=-1, datamodule=dm))
    with pytest.raises(ValueError, match="total_steps: null needs a bounded run"):
        planned_iterations(_trainer(max_epochs=5, max_steps=50), max_iterations=-1)  # no epoch length, max_steps ignored


def test_unbound_warmup_linear_refuses_to_step_and_binds():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = WarmupLinear(opt, total_steps=None, warmup_frac=0.2, start_factor=0.1)
    with pytest.raises(RuntimeError, match="never bound to the run's length"):
        sch.step()
    opt = torch.optim.SGD([p], lr=2.0)
    sch = WarmupLinear(opt, total_steps=None, warmup_frac=0.2, start_factor=0.1, end_factor=0.5)
    assert bind_total_steps(sch, 20) and sch.warmup_steps == 4 and sch.total_steps == 20
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([2.0 * warmup_linear_factor(s, 4, 20, 0.5, 0.1) for s in range(20)])
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(2.0) and lrs[19] == pytest.approx(1.0)
    assert not bind_total_steps(sch, 50)  # already bound: left alone
    # the bound length travels in the scheduler's state (a resumed run keeps the planned schedule)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sch2 = WarmupLinear(opt2, total_steps=None, warmup_frac=0.2, start_factor=0.1, end_factor=0.5)
    sch2.load_state_dict(sch.state_dict())
    assert (sch2.total_steps, sch2.warmup_steps, sch2.last_epoch) == (20, 4, 20)
    with pytest.raises(ValueError, match=r"give warmup_steps \(3\) or warmup_frac \(0.1\), not both"):
        WarmupLinear(opt, warmup_steps=3, warmup_frac=0.1)


def test_samples_per_epoch_follow_the_world_size():
    dm = ResumableDataModule(batch_size=96, train_samples_per_epoch=1_281_167)
    for world, n in ((1, 13346), (8, 1669), (16, 835)):
        dm.rank_and_world = (0, world)
        assert dm.batches_per_epoch == n  # ceil(1,281,167 / (96 × world))
    assert ResumableDataModule(batch_size=4).batches_per_epoch == 1000
    with pytest.raises(ValueError, match=r"give train_batches_per_epoch \(10\) or train_samples_per_epoch \(40\)"):
        ResumableDataModule(train_batches_per_epoch=10, train_samples_per_epoch=40)
    with pytest.raises(ValueError, match="train_samples_per_epoch must be >= 1, got 0"):
        ResumableDataModule(train_samples_per_epoch=0)


def test_fit_scales_lr_and_binds_the_schedule(shapes_shards, tmp_path):
    """A real fit: per-device batch 4 × accumulate 2 = 8 = 2 × lr_reference_batch 4 → lr × 2; the schedule is bound
    to max_epochs × ⌈(40 samples / 4) / 2⌉ = 2 × 5 = 10 optimizer steps and ends at end_factor."""
    from ctrlgen.datamodules.ecm import ECMDataModule
    from ctrlgen.lightning_modules.common.schedules import WarmupLinear as WL
    from tests.helpers.tiny_module import TinyAEModule

    L.seed_everything(0)
    model = TinyAEModule(optimizer=lambda p: torch.optim.SGD(p, lr=0.5), lr_reference_batch=4,
                         scheduler=lambda o: WL(o, total_steps=None, warmup_frac=0.2, end_factor=0.1))
    dm = ECMDataModule(train_shards=shapes_shards["train"], batch_size=4, num_workers=0, resolution=32,
                       train_samples_per_epoch=40)
    seen = []

    class Rec(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Rec()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert (sched.total_steps, sched.warmup_steps, sched.base_lrs) == (10, 2, [1.0])
    assert trainer.global_step == 10 and len(seen) == 20
    expected = [warmup_linear_factor(s, 2, 10, 0.1) for s in range(10)]
    assert seen[::2] == pytest.approx(expected) and seen[-1] == pytest.approx(0.1)

    # resumed with another global batch (no accumulation: x1 instead of x2) and one more epoch: the checkpoint's
    # base lr and bound length prevail (a fresh bind would give base lr 0.5 and 15 steps)
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    seen.clear()
    model2 = TinyAEModule(optimizer=lambda p: torch.optim.SGD(p, lr=0.5), lr_reference_batch=4,
                          scheduler=lambda o: WL(o, total_steps=None, warmup_frac=0.2, end_factor=0.1))
    dm2 = ECMDataModule(train_shards=shapes_shards["train"], batch_size=4, num_workers=0, resolution=32,
                        train_samples_per_epoch=40)
    t2 = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, callbacks=[Rec()], default_root_dir=tmp_path)
    t2.fit(model2, datamodule=dm2, ckpt_path=ckpt)
    sched2 = t2.lr_scheduler_configs[0].scheduler
    assert (sched2.total_steps, sched2.base_lrs) == (10, [1.0]) and seen and seen[0] == pytest.approx(0.1)
