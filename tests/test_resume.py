"""Checkpoint and resume: N steps straight == N/2 steps + resume from last.ckpt + N/2 steps (CPU, ≤ 1e-6).

The run uses dropout (global RNG), per-rank generator noise and a shuffled, resampled WebDataset stream, so it checks
that all three random streams and the data position are restored.
"""

from __future__ import annotations

import torch

from ctrlgen.lightning_modules.cli import CtrlgenCLI
from tests.conftest import assert_same_state


def _fit(shards, root, steps, extra=()):
    return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny.yaml", f"--data.init_args.train_shards={shards['train']}",
                            f"--data.init_args.val_shards={shards['val']}", f"--trainer.max_steps={steps}",
                            "--data.init_args.train_batches_per_epoch=4", "--trainer.val_check_interval=1",
                            "--trainer.limit_val_batches=1",
                            "--data.init_args.num_workers=1", f"--trainer.default_root_dir={root}", *extra])


def test_resume_reproduces_uninterrupted_run(shapes_shards, tmp_path):
    straight = _fit(shapes_shards, tmp_path / "a", 6)  # crosses an epoch boundary (4 batches/epoch) after the split
    half = _fit(shapes_shards, tmp_path / "b", 3)
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").exists()
    resumed = _fit(shapes_shards, tmp_path / "b", 6, ["--ckpt_path=last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert_same_state(sa, sb)
    # the per-rank noise stream continued where it stopped
    assert torch.equal(torch.cat(straight.model.seen_noise[3:]), torch.cat(resumed.model.seen_noise))
    assert not torch.allclose(half.model.state_dict()["enc.0.weight"], sb["enc.0.weight"])


def test_frozen_prefixes_stay_out_of_checkpoints(shapes_shards, tmp_path):
    from tests.helpers.tiny_module import TinyAEModule

    TinyAEModule.frozen_prefixes = ("dec.",)
    try:
        cli = _fit(shapes_shards, tmp_path, 2, ["--model.init_args.freeze_decoder=true"])
        ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
        assert not any(k.startswith("dec.") for k in ckpt["state_dict"])
        assert any(k.startswith("enc.") for k in ckpt["state_dict"])
        model = TinyAEModule(freeze_decoder=True)
        before = model.dec[1].weight.clone()
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"])  # strict: the frozen part is kept from the live module
        assert torch.equal(model.dec[1].weight, before)
        assert torch.equal(model.enc[0].weight, cli.model.enc[0].weight)
    finally:
        TinyAEModule.frozen_prefixes = ()


def test_resume_from_checkpoint_saved_at_train_end_mid_epoch(shapes_shards, tmp_path):
    """No validation: last.ckpt is written when max_steps stops the run in the middle of an epoch, after Lightning has
    already counted that epoch as finished; the data stream must still resume inside it (not one epoch further)."""
    extra = ["--trainer.limit_val_batches=0"]
    straight = _fit(shapes_shards, tmp_path / "a", 6, extra)
    _fit(shapes_shards, tmp_path / "b", 3, extra)  # 3 of 4 batches of epoch 0
    resumed = _fit(shapes_shards, tmp_path / "b", 6, [*extra, "--ckpt_path=last"])
    assert straight.model.seen_keys[3:] == resumed.model.seen_keys  # the same samples, in order
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert_same_state(sa, sb)
