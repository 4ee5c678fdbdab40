"""ctrlgen.callbacks.RunCheckpoint: last.ckpt always holds the newest state (lightning 2.6.6's ModelCheckpoint lets it lag)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ctrlgen.callbacks import RunCheckpoint
from ctrlgen.datamodules.ecm import ECMDataModule
from tests.helpers.tiny_module import TinyAEModule


def _run(cls, shards, root, max_steps=7, ckpt_path=None):
    L.seed_everything(0)
    # mode=max on a loss that falls: the monitored metric never improves after the first validation (a GAN or RL run
    # whose validation loss is not a progress measure looks the same to the callback)
    cb = cls(dirpath=root / "checkpoints", monitor="val/loss", mode="max", save_top_k=1, save_last=True,
             filename="step{step:03d}", auto_insert_metric_name=False)
    dm = ECMDataModule(train_shards=shards["train"], val_shards=shards["val"], batch_size=4, num_workers=0,
                       resolution=32, train_batches_per_epoch=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=2,
                        check_val_every_n_epoch=None, limit_val_batches=1, logger=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    model = TinyAEModule()
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("cls", [ModelCheckpoint, RunCheckpoint], ids=["lightning", "ctrlgen"])
def test_last_checkpoint_is_the_newest_state(shapes_shards, tmp_path, cls):
    trainer, model = _run(cls, shapes_shards, tmp_path)
    assert trainer.global_step == 7  # validations at steps 2, 4, 6 (val/loss falls: never "improves" under max)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    if cls is ModelCheckpoint:  # pins the lightning behaviour this callback exists for: an upgrade that fixes it shows
        assert last["global_step"] < 7
        return
    assert last["global_step"] == 7  # written at train end, between two validations
    assert torch.equal(last["state_dict"]["enc.0.weight"], model.enc[0].weight.detach())
    best = [p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")]
    assert len(best) == 1  # top-k logic unchanged
    # `--ckpt_path last` continues from step 7, not from an older point
    resumed, _ = _run(cls, shapes_shards, tmp_path, max_steps=9, ckpt_path="last")
    assert resumed.global_step == 9
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9


def _ckpt(path, step):
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)


def test_atomic_save_leaves_no_partial_file_on_a_full_disk(tmp_path, monkeypatch):
    """A save that fails mid-write (ENOSPC after half the bytes) keeps the previous checkpoint and leaves no partial
    or temporary file; the error names the checkpoint."""
    import errno

    import ctrlgen.callbacks.checkpoint as ck

    io = ck.AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(3)}}, target)
    good = target.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(len(good) // 2)  # half of it reached the disk, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"saving checkpoint .*last\.ckpt failed .*No space left.*untouched"):
        io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == good and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert ck.read_step(target) == 3


def test_run_checkpoint_installs_the_atomic_io(shapes_shards, tmp_path):
    from ctrlgen.callbacks.checkpoint import AtomicCheckpointIO

    trainer, _ = _run(RunCheckpoint, shapes_shards, tmp_path, max_steps=2)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_newest_intact_checkpoint_passes_over_a_truncated_or_stale_last(tmp_path):
    from ctrlgen.callbacks.checkpoint import newest_intact_checkpoint

    _ckpt(tmp_path / "last.ckpt", 3)
    _ckpt(tmp_path / "step0000003.ckpt", 3)
    assert newest_intact_checkpoint(tmp_path) == tmp_path / "last.ckpt"  # equal steps: last.ckpt
    _ckpt(tmp_path / "step0000005.ckpt", 5)  # a kill between the step checkpoint and last.ckpt
    with pytest.warns(UserWarning, match=r"last\.ckpt holds step 3; resuming from .*step0000005\.ckpt \(step 5\)"):
        assert newest_intact_checkpoint(tmp_path) == tmp_path / "step0000005.ckpt"
    data = (tmp_path / "step0000005.ckpt").read_bytes()
    (tmp_path / "step0000005.ckpt").unlink()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match=r"last\.ckpt is not a complete checkpoint; resuming from .*step0000003"):
        assert newest_intact_checkpoint(tmp_path) == tmp_path / "step0000003.ckpt"
    (tmp_path / "step0000003.ckpt").unlink()
    with pytest.warns(UserWarning, match=r"none of \['last\.ckpt'\] .* is a complete checkpoint"):
        assert newest_intact_checkpoint(tmp_path) is None
    assert newest_intact_checkpoint(tmp_path / "empty") is None
