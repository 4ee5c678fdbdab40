"""``common/frozen.freeze``: one frozen-component mechanism for every base (VAR/VQVAE, diffusers UNet + LoRA).

A frozen base keeps eval mode through ``train()`` and validation passes while the dropout of a trainable LoRA inside it
follows the model's mode; only trainable parameters reach the optimizer and the checkpoint; the base's provenance
(path + sha256 of a file or of a ``save_pretrained`` directory) is recorded and checked on load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.frozen import fingerprint, freeze, frozen_components, is_frozen
from ctrlgen.lightning_modules.common.lora import add_lora, is_lora_key
from tests.helpers.tiny_lora_module import ATTN_TARGETS, TinyLoraModule, tiny_unet, write_tiny_unet


def _modes(unet: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """(names of modules in train mode, names of the trainable LoRA dropouts, names of the frozen-LoRA dropouts)."""
    on = {n for n, m in unet.named_modules() if m.training}
    drops = {n for n, m in unet.named_modules() if isinstance(m, nn.Dropout) and ".lora_dropout." in n}
    return on, {n for n in drops if n.endswith(".young")}, {n for n in drops if n.endswith(".old")}


class _Holder(BaseGenModule):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.head = nn.Linear(4, 4)


@pytest.mark.parametrize("order", ["lora_then_freeze", "freeze_then_lora"])
def test_frozen_unet_is_eval_but_trainable_lora_dropout_follows_train(order):
    unet = tiny_unet()
    if order == "freeze_then_lora":
        freeze(unet)
    add_lora(unet, ATTN_TARGETS, "young", r=2, dropout=0.25, seed=0)
    add_lora(unet, ["to_q"], "old", r=2, dropout=0.25, seed=1, trainable=False)  # frozen adapter: its dropout is off
    set_young = [n for n, p in unet.named_parameters() if p.requires_grad]
    if order == "lora_then_freeze":
        freeze(unet)
    assert is_frozen(unet)
    assert set_young == [n for n, p in unet.named_parameters() if p.requires_grad]
    assert set_young and all(is_lora_key(n, "young") for n in set_young)  # the base's own weights: no grads
    m = _Holder(unet)
    for _ in range(2):
        m.train()
        on, young, old = _modes(unet)
        assert young and young <= on and not (old & on)
        assert all(".lora_" in n for n in on), sorted(n for n in on if ".lora_" not in n)[:5]  # base modules: eval
        assert m.training and m.head.training
        m.eval()
        assert not any(x.training for x in m.modules())
    # plain nn.Module.train on the frozen base itself is not guarded; the holder's train() puts it right again
    unet.train()
    m.train()
    assert all(".lora_" in n for n in _modes(unet)[0])


def test_frozen_components_found_once_and_frozen_params_refused_by_the_optimizer():
    m = _Holder(add_lora(tiny_unet(), ATTN_TARGETS, r=2))
    assert list(frozen_components(m)) == ["unet"]
    assert m.checkpoint_frozen_prefixes() == ("unet.",)
    lora = [p for n, p in m.named_parameters() if is_lora_key(n)]
    groups = m.param_groups()
    assert {id(p) for p in groups} == {id(p) for p in lora} | {id(p) for p in m.head.parameters()}
    m.build_optimizer(torch.optim.AdamW, groups, None)
    with pytest.raises(ValueError, match=r"parameters of frozen bases reach the optimizer \(unet\.conv_in\.weight"):
        m.build_optimizer(torch.optim.AdamW, list(m.parameters()), None)


def test_directory_fingerprint_follows_weights_and_config_only(tmp_path):
    d = write_tiny_unet(tmp_path / "unet")
    first = fingerprint(d)
    (d / "README.md").write_text("notes")
    assert fingerprint(d) == first  # not a weight or config file
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "sample_size": 16}))
    changed = fingerprint(d)
    assert changed != first
    shutil.copy(d / "diffusion_pytorch_model.safetensors", d / "extra.safetensors")
    assert fingerprint(d) not in (first, changed)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no weight file .*save_pretrained"):
        fingerprint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fingerprint(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ LoRA on a diffusers UNet
def _fit(shards, unet_dir, root, monkeypatch, seen, extra=()):
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    real = TinyLoraModule.model_step

    def recording(self, batch, stage):
        if stage == "train":  # during the training step: which modules are in train mode, and did a validation run
            seen.append({"validated": self.trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed > 0,
                         "on": {n for n, m in self.unet.named_modules() if m.training},
                         "dropouts": {n for n, m in self.unet.named_modules()
                                      if isinstance(m, nn.Dropout) and ".lora_dropout." in n}})
        return real(self, batch, stage)

    monkeypatch.setattr(TinyLoraModule, "model_step", recording)
    return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny_lora.yaml", f"--model.init_args.unet_dir={unet_dir}",
                            "--model.init_args.lora_dropout=0.2", f"--data.init_args.train_shards={shards['train']}",
                            f"--data.init_args.val_shards={shards['val']}", "--trainer.max_steps=3",
                            "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
                            f"--trainer.default_root_dir={root}", *extra])


def test_lora_unet_fit_keeps_base_eval_and_records_the_directory(shapes_shards, tmp_path, monkeypatch):
    unet_dir = write_tiny_unet(tmp_path / "unet")
    seen: list[dict] = []
    cli = _fit(shapes_shards, unet_dir, tmp_path / "run", monkeypatch, seen)
    after_val = [s for s in seen if s["validated"]]
    assert len(seen) == 3 and len(after_val) == 2
    for s in seen:
        assert s["dropouts"] and s["dropouts"] <= s["on"]  # LoRA dropout (p=0.2) active in every training step
        assert all(".lora_" in n for n in s["on"]), sorted(n for n in s["on"] if ".lora_" not in n)[:5]
    m = cli.model
    lora = {id(p) for n, p in m.named_parameters() if is_lora_key(n)}
    assert {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]} == lora
    m.train()  # after fit and a plain train(): still only LoRA parts in train mode
    assert all(".lora_" in n for n, x in m.unet.named_modules() if x.training)
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["ctrlgen_bases"] == {"unet": {"path": str(unet_dir), "sha256": fingerprint(unet_dir)}}
    assert set(ckpt["state_dict"]) == {n for n, _ in m.named_parameters() if is_lora_key(n)}

    def load(**kw):
        fresh = TinyLoraModule(unet_dir=str(unet_dir), lora_dropout=0.2, **kw)
        c = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
        fresh.on_load_checkpoint(c)
        fresh.load_state_dict(c["state_dict"])  # strict: the frozen UNet comes from the live module
        return fresh

    load()  # the same directory loads quietly
    write_tiny_unet(unet_dir, seed=1)  # other base weights in the same place
    now = fingerprint(unet_dir)
    with pytest.raises(ValueError, match=rf"made on the frozen unet {re.escape(str(unet_dir))} \(sha256 "
                                         rf"{ckpt['ctrlgen_bases']['unet']['sha256'][:12]}…\), but this run loads "
                                         rf"{re.escape(str(unet_dir))} \(sha256 {now[:12]}…\)[\s\S]*"
                                         r"Point model\.init_args\.unet_dir at the original weights"):
        load()
    with pytest.warns(UserWarning, match="base_mismatch=warn to go on anyway"):
        load(base_mismatch="warn")
    # resuming through the CLI on the changed directory fails before any training
    with pytest.raises(ValueError, match="made on the frozen unet"):
        _fit(shapes_shards, unet_dir, tmp_path / "run", monkeypatch, [], ["--ckpt_path=last"])


# ------------------------------------------------------------------------------------------------ ECM's frozen VAR
def test_frozen_var_stays_eval_during_training_after_a_validation_pass(shapes_shards, tmp_path, monkeypatch):
    """In an ECM run with a validation pass after every step, every training step that follows a validation sees the
    VAR and the VQVAE entirely in eval mode and the control net in train mode."""
    import lightning.pytorch as pl

    from ctrlgen.datamodules.ecm import ECMDataModule
    from ctrlgen.lightning_modules.ecm import ECMModule

    seen: list[dict] = []
    real = ECMModule.model_step

    def recording(self, batch, stage):
        if stage == "train":
            seen.append({"validated": self.trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed > 0,
                         "var": {n for n, m in self.var.named_modules() if m.training},
                         "vqvae": {n for n, m in self.vqvae.named_modules() if m.training},
                         "control": all(m.training for m in self.control.modules())})
        return real(self, batch, stage)

    monkeypatch.setattr(ECMModule, "model_step", recording)
    torch.manual_seed(0)
    model = ECMModule(var_preset="demo", vqvae_preset="demo32_lite", var_overrides={"depth": 2},
                      control={"patch": 4, "width": 32, "vit_depth": 1, "vit_heads": 2, "every": 1, "offset": 0},
                      trunc_probs={2: 0.5, 5: 0.5}, val_control_batches=0)
    dm = ECMDataModule(train_shards=shapes_shards["train"], val_shards=shapes_shards["val"], resolution=32,
                       mid_reso=1.0, batch_size=2, eval_batch_size=2, num_workers=0, train_batches_per_epoch=3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, val_check_interval=1, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    after_val = [s for s in seen if s["validated"]]
    assert len(seen) == 3 and len(after_val) == 2
    for s in seen:
        assert s["var"] == set() and s["vqvae"] == set() and s["control"], s
    model.train()
    assert not any(m.training for m in model.var.modules()) and model.control.training


def test_finetune_baseline_var_trains_and_follows_vars_decay_list():
    """ECM's full-FT baseline: the VAR is no frozen component (train mode, in the optimizer, in checkpoints) and its
    parameters are split into decay / no-decay exactly as VARModule splits them (VAR's own list)."""
    import ctrlgen.lightning_modules.ecm as ecm
    from ctrlgen.lightning_modules.ecm.control import CONTROL_PRESETS

    tiny = {"var_preset": "tiny", "vqvae_preset": "tiny", "var_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2}}
    torch.manual_seed(0)
    ft = ecm.ECMModule(**tiny, control={**CONTROL_PRESETS["tiny"], "every": 1, "offset": 0}, finetune_base=True)
    var_module = ecm.VARModule(**tiny)
    assert list(frozen_components(ft)) == ["vqvae"] and ft.train().var.training

    def split(m, prefix):
        names = {id(p): n for n, p in m.named_parameters()}
        decay, no_decay = ({names[id(p)] for p in g["params"]} for g in m.param_groups())
        return ({n for n in decay if n.startswith(prefix)}, {n for n in no_decay if n.startswith(prefix)})

    assert split(ft, "var.") == split(var_module, "var.")
    decay, no_decay = split(ft, "var.")
    assert "var.class_emb.weight" in decay and "var.pos_1LC" in no_decay  # VAR decays class_emb (ECM's list does not)
    assert "control.gates" in split(ft, "control.")[1]
    frozen_ecm = ecm.ECMModule(**tiny, control={**CONTROL_PRESETS["tiny"], "every": 1, "offset": 0})
    assert list(frozen_components(frozen_ecm)) == ["vqvae", "var"]
    assert split(frozen_ecm, "var.") == (set(), set())


def test_pretrained_loader_records_the_directory(tmp_path):
    from ctrlgen.lightning_modules.common.frozen import SOURCE_ATTR
    from ctrlgen.lightning_modules.common.pretrained import load_frozen

    d = write_tiny_unet(tmp_path / "u")
    unet = load_frozen("UNet2DConditionModel", d)
    assert is_frozen(unet) and getattr(unet, SOURCE_ATTR) == {"path": str(Path(d)), "sha256": fingerprint(d)}
    add_lora(unet, ATTN_TARGETS, r=2)  # a trainable adapter keeps the recorded source
    assert getattr(unet, SOURCE_ATTR)["sha256"] == fingerprint(d)
