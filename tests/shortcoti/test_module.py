"""ShortCoTIModule on a tiny random Janus with real prompt files (spec §3.1, §8.11): fit, frozen parts, resume."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from ctrlgen.datamodules.prompts import PromptDataModule
from ctrlgen.lightning_modules.shortcoti.module import ShortCoTIModule
from ctrlgen.lightning_modules.shortcoti.rewards import TokenSubsetReward
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

PROMPTS = ["a red cube", "two blue spheres", "three green stars left of a ring", "a yellow heart",
           "four pink boxes above two cones", "one cyan disk"]


@pytest.fixture
def prompt_files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "task_type": "color"}) + "\n" for p in PROMPTS))
    val = tmp_path / "val.txt"
    val.write_text("a red ring\ntwo purple crosses\n")
    return str(train), str(val)


def _module(mode: str = "adaptive", **kw) -> ShortCoTIModule:
    args = {"rewards": [TokenSubsetReward(codes=range(16))], "tiny": {"init_std": 0.1}, "G": 4,
            "cot": {"max_new_tokens": 8}, "image": {"cfg": 3.0}, "eval_cot_max_new_tokens": 6,
            "length": {"mode": mode, "target": 3, "cap": 3, "ranges": {"token_subset": [0.0, 1.0]}},
            "loss": {"beta": 0.01}, "optimizers": {"policy": partial(torch.optim.AdamW, lr=1e-3)},
            "max_iterations": 4}
    args.update(kw)
    return ShortCoTIModule(**args)


def _fit(module, files, root, ckpt_path=None, val=False, every=None):
    train, val_file = files
    data = PromptDataModule(train_prompts=train, val_prompts=val_file if val else None, prompts_per_batch=1,
                            num_workers=0, seed=0)
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=every)] if every else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=10, logger=CSVLogger(root, name="csv"),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(every), callbacks=callbacks, num_sanity_val_steps=0,
                        limit_val_batches=1 if val else 0, val_check_interval=2 if val else None,
                        check_val_every_n_epoch=None if val else 1, default_root_dir=root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _trainable(m):
    return {n: p.detach().clone() for n, p in m.policy.model.named_parameters() if p.requires_grad}


def test_fit_logs_trains_only_the_language_model(prompt_files, tmp_path):
    L.seed_everything(0)
    m = _module()
    frozen = m.policy.frozen_state()
    ref = {k: v.clone() for k, v in m.ref.state_dict().items()}
    before = _trainable(m)
    trainer = _fit(m, prompt_files, tmp_path, val=True)
    assert m.iteration == 4 and trainer.global_step == 4
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.policy.trainable_parameters()}
    assert all(n.startswith(("model.language_model.", "lm_head.")) for n, p in m.policy.model.named_parameters()
               if id(p) in opt_params)
    after = m.policy.frozen_state()
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(torch.equal(ref[k], v) for k, v in m.ref.state_dict().items())
    assert any(not torch.equal(before[n], p) for n, p in _trainable(m).items())
    metrics = trainer.callback_metrics
    for key in ("train/reward", "train/reward_std", "train/cot_words", "train/cot_tokens_p90", "train/kl",
                "train/reward/token_subset", "train/length_weight", "train/easiness", "train/policy/loss",
                "val/loss", "val/reward", "val/cot_words"):
        assert key in metrics, key
    assert torch.isfinite(metrics["train/policy/loss"])
    assert 0.25 <= float(metrics["train/length_weight"]) <= 1.0


@pytest.mark.parametrize("mode", ["none", "cap", "target"])
def test_length_modes_run_and_cap_holds(mode, prompt_files, tmp_path):
    L.seed_everything(0)
    m = _module(mode, max_iterations=1)
    _fit(m, prompt_files, tmp_path)
    roll = m.rollout(["two blue spheres"], [{}])
    assert roll.cot.mask.shape[0] == 4 and roll.image.tokens.shape == (4, m.policy.num_image_tokens)
    if mode == "cap":  # no CoT longer than the cap reaches an image prompt; dropped tokens have mask 0
        assert m.cot_cfg.max_new_tokens == 6
        assert all(len(t.split()) <= 3 for t in roll.cot.texts)
        assert float(roll.metrics["cot_words_max"]) <= 3
        assert (roll.cot.mask.sum(1) <= 4).all()
    if mode == "none":
        assert float(roll.metrics["reward_length"]) == 0.0


def test_mu_two_steps_twice_per_rollout_and_refuses_accumulation(prompt_files, tmp_path):
    L.seed_everything(0)
    m = _module("target", loss={"beta": 0.0, "num_iterations": 2}, max_iterations=2)
    assert m.ref is None
    trainer = _fit(m, prompt_files, tmp_path)
    assert m.iteration == 2 and trainer.global_step == 4
    assert "train/clip_ratio/region" in trainer.callback_metrics
    with pytest.raises(ValueError, match="num_iterations > 1"):
        _module(loss={"num_iterations": 2}, accumulate_grad_batches=2)


def test_resume_reproduces_the_uninterrupted_run(prompt_files, tmp_path):
    L.seed_everything(0)
    straight = _module()
    _fit(straight, prompt_files, tmp_path / "a")
    L.seed_everything(0)
    first = _module(max_iterations=2)
    _fit(first, prompt_files, tmp_path / "b", every=2)
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("ref.") for k in state["state_dict"])  # the frozen reference is not saved
    L.seed_everything(0)
    resumed = _module()
    _fit(resumed, prompt_files, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.iteration == 4
    a, b = _trainable(straight), _trainable(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = straight.ref.state_dict(), resumed.ref.state_dict()
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
