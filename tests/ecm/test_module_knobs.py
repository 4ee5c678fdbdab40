"""Knobs of VARModule / ECMModule that pick a speed path: ``grad_checkpointing`` (activation checkpointing) and
``sampler`` (eager / static / CUDA-graph sampling for validation grids, test and predict)."""
import re

import lightning.pytorch as pl
import pytest
import torch

import ctrlgen.lightning_modules.ecm as ecm
from ctrlgen.lightning_modules.ecm.control import CONTROL_PRESETS

TINY = {"var_preset": "tiny", "vqvae_preset": "tiny", "var_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2}}
CONTROL = {**CONTROL_PRESETS["tiny"], "every": 1, "offset": 0}


def _module(name: str, **kw):
    torch.manual_seed(0)
    if name == "ECMModule":
        kw.setdefault("control", CONTROL)
    return getattr(ecm, name)(**TINY, **kw)


@pytest.mark.parametrize("module", ["VARModule", "ECMModule"])
def test_module_knob_reaches_the_networks(module):
    m = _module(module, grad_checkpointing=True)
    assert m.var.grad_checkpointing is True and m.hparams.grad_checkpointing is True
    if module == "ECMModule":
        assert m.control.grad_checkpointing is True
    assert "grad_checkpointing" in type(m).runtime_args


def test_sampler_knob_same_images_as_eager():
    """sampler='static' in the module: validation/test/predict images equal the eager sampler's (same per-batch
    generator), with and without control; the knob is a runtime arg (test/predict may switch it)."""
    m = _module("ECMModule", sampler="static").eval()
    with torch.no_grad():
        m.control.gates.fill_(0.5)  # the control changes the images
    g = torch.Generator().manual_seed(3)
    batch = {"label": torch.tensor([1, 4]), "cond": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
             "key": ["a", "b"]}
    for control in (True, False):
        fast = m.sample(batch, control=control)
        m.sample_kwargs["sampler"] = "eager"
        slow = m.sample(batch, control=control)
        m.sample_kwargs["sampler"] = "static"
        assert fast.shape == (2, 3, 64, 64) and torch.equal(fast, slow), control
    assert "sampler" in ecm.ECMModule.runtime_args and "sampler" in ecm.VARModule.runtime_args


def test_sampler_knob_errors():
    with pytest.raises(ValueError, match=r"sampler must be one of eager\|static\|graph, got 'fast'"):
        _module("VARModule", sampler="fast")
    m = _module("VARModule", sampler="graph")
    m.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="'graph' captures CUDA graphs and needs a CUDA device; this run is on cpu"):
        m.setup("fit")


def test_early_centric_default_per_mode_and_explicit_ablation():
    """early_centric unset: truncated training for ECM, full sequences for the full-fine-tune baseline; an explicit
    true with finetune_base is honoured (and warned about), never silently dropped."""
    assert _module("ECMModule").early_centric is True
    assert _module("ECMModule", early_centric=False).early_centric is False
    assert _module("ECMModule", finetune_base=True).early_centric is False
    with pytest.warns(UserWarning, match="truncated sequences"):
        assert _module("ECMModule", finetune_base=True, early_centric=True).early_centric is True


def test_checkpoint_records_frozen_bases_and_refuses_another(tmp_path):
    """ecm.md §2.5: the checkpoint names the frozen bases it left out (path + sha256); loading it on other base files
    fails naming both (or warns with base_mismatch=warn); the same file loads quietly."""
    from ctrlgen.lightning_modules.ecm.checkpoint import sha256_of
    from ctrlgen.lightning_modules.ecm.var import build_var

    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        files[name] = tmp_path / f"var_{name}.pth"
        torch.save(build_var("tiny", **TINY["var_overrides"]).state_dict(), files[name])
    m = _module("ECMModule", var_weights=str(files["a"]))
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["ctrlgen_bases"] == {"vqvae": None, "var": {"path": str(files["a"]), "sha256": sha256_of(files["a"])}}
    assert not any(k.startswith(("var.", "vqvae.")) for k in ckpt["state_dict"])

    def load(**kw):
        c = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
        _module("ECMModule", **kw).on_load_checkpoint(c)
        return c

    assert "var.blocks.0.attn.mat_qkv.weight" in load(var_weights=str(files["a"]))["state_dict"]
    with pytest.raises(ValueError, match=rf"made on the frozen var {re.escape(str(files['a']))} \(sha256 "
                                         rf"{sha256_of(files['a'])[:12]}…\), but this run loads "
                                         rf"{re.escape(str(files['b']))}"):
        load(var_weights=str(files["b"]))
    with pytest.raises(ValueError, match=r"but this run loads random weights \(no file\)"):
        load()
    with pytest.warns(UserWarning, match="base_mismatch=warn to go on anyway"):
        load(var_weights=str(files["b"]), base_mismatch="warn")
    # VARModule trains its VAR: only the VQVAE is a frozen base it records
    v = _module("VARModule", var_weights=str(files["a"]))
    vck = {"state_dict": v.state_dict()}
    v.on_save_checkpoint(vck)
    assert vck["ctrlgen_bases"] == {"vqvae": None}


def test_test_metrics_score_only_rows_of_their_condition_type(monkeypatch):
    """With condition_types [depth, canny], canny F1 is computed on the canny rows only (against their maps), and the
    depth RMSE on the depth rows only; with one type every row counts."""
    m = _module("ECMModule", condition_types=["depth", "canny"], eval_base=False)
    g = torch.Generator().manual_seed(0)
    batch = {"label": torch.arange(4), "cond_type": torch.tensor([0, 1, 1, 0]),
             "cond": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "image": torch.zeros(4, 3, 16, 16)}
    images = torch.rand(4, 3, 16, 16, generator=g)
    seen = []

    def spy(pred, cond_edges):
        seen.append((pred, cond_edges))

    monkeypatch.setattr(m.f1_ecm, "update", spy)  # (torchmetrics binds update per instance)
    monkeypatch.setattr(m, "_step", lambda b, stage: torch.tensor(0.0))
    monkeypatch.setattr(m, "sample", lambda b, control: images)
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    m.test_step(batch, 0)
    (pred, edges), = seen
    assert torch.equal(pred, images[[1, 2]]) and torch.equal(edges, batch["cond"][[1, 2], 0] > 0)
    assert m._rows_of(batch, "depth").tolist() == [0, 3] and m._rows_of(batch, "normal") is None
    one = _module("ECMModule", condition_types=["canny"])
    assert one._rows_of(batch, "canny").tolist() == [0, 1, 2, 3]  # one type: cond_type is not consulted
    assert m._rows_of({**batch, "cond_type": torch.zeros(4, dtype=torch.long)}, "canny") is None


def test_data_and_model_must_agree_on_condition_types_and_extractor():
    """The type order is the type-embedding index and the metric routing; with canny_on_the_fly the loader's extractor
    must be the metric's. A mismatch fails at setup, before training, naming both settings."""
    from ctrlgen.datamodules.ecm import ECMDataModule

    m = _module("ECMModule", condition_types=["canny", "depth"])

    def dm(**kw):
        return ECMDataModule(resolution=16, batch_size=1, num_workers=0, **kw)

    m.check_datamodule(dm(condition_types=["canny", "depth"]))
    with pytest.raises(ValueError, match=re.escape("data.init_args.condition_types ['depth', 'canny'] differs from "
                                                   "model.init_args.condition_types ['canny', 'depth']")):
        m.check_datamodule(dm(condition_types=["depth", "canny"]))
    m.check_datamodule(dm(condition_types=["canny", "depth"], edge_extractor="other"))  # maps read from the shards
    with pytest.raises(ValueError, match=r"data.init_args.edge_extractor 'other' differs from model.init_args.edge_"):
        m.check_datamodule(dm(condition_types=["canny", "depth"], edge_extractor="other", canny_on_the_fly=True))


def test_dropout_draws_differ_across_ranks_and_repeat_per_batch(monkeypatch):
    """Class dropout, control dropout and drop-path draw from torch's global RNG; BaseGenModule re-seeds it per (seed,
    rank, optimizer step, micro-batch) before every training batch, so ranks drop different rows (Lightning seeds
    every rank alike) and the same step of the same rank draws the same again (also after a resume)."""
    from ctrlgen.datamodules.seeding import derive_seed
    from ctrlgen.lightning_modules.ecm.var import drop_labels

    m = _module("VARModule")
    labels = torch.arange(64)

    def dropped(rank: int, step: int) -> torch.Tensor:
        monkeypatch.setattr(type(m), "global_rank", property(lambda self: rank))
        monkeypatch.setattr(type(m), "global_step", property(lambda self: step))
        m.on_train_batch_start({}, 0)
        return drop_labels(labels, 0.5, 1000) == 1000

    a = dropped(0, 3)
    assert torch.equal(dropped(0, 3), a) and 0 < int(a.sum()) < 64
    assert not torch.equal(dropped(1, 3), a) and not torch.equal(dropped(0, 4), a)
    seeds = {derive_seed(7, r, e, b, s) for r in range(2) for e in range(2) for b in range(3) for s in range(3)}
    assert len(seeds) == 36 and all(0 <= x < 2**63 for x in seeds)


def test_trunc_scale_synced_across_ranks_or_drawn_per_rank():
    """sync_across_ranks (default): one s per step on every rank (no stragglers); false: per rank, still a function of
    (seed, rank, step) (resume draws it again) and distributed as trunc_probs."""
    probs = {2: 0.2, 3: 0.6, 4: 0.2}
    synced = _module("ECMModule", trunc_probs=probs)
    assert synced.sync_across_ranks is True
    for step in range(50):
        assert len({synced.trunc_scale(step, r) for r in range(4)}) == 1
    own = _module("ECMModule", trunc_probs=probs, sync_across_ranks=False)
    draws = torch.tensor([[own.trunc_scale(step, r) for r in range(4)] for step in range(1000)])
    assert torch.equal(draws[:20], torch.tensor([[own.trunc_scale(step, r) for r in range(4)] for step in range(20)]))
    assert (draws != draws[:, :1]).any(1).float().mean() > 0.5  # ranks disagree on most steps
    freq = {k: float((draws == k).float().mean()) for k in probs}
    assert all(abs(freq[k] - p) < 0.03 for k, p in probs.items()), freq


def test_cond_encoder_initialised_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    src = _module("ECMModule")
    with torch.no_grad():
        for p in src.control.cond_encoder.parameters():
            p.add_(torch.randn_like(p))
    enc = {k: v.clone().contiguous() for k, v in src.control.cond_encoder.state_dict().items()}
    save_file(enc, str(tmp_path / "enc.safetensors"))
    torch.save({"state_dict": {f"control.cond_encoder.{k}": v for k, v in enc.items()}}, tmp_path / "ecm.ckpt")
    for name in ("enc.safetensors", "ecm.ckpt"):
        m = _module("ECMModule", cond_encoder_weights=str(tmp_path / name))
        got = m.control.cond_encoder.state_dict()
        assert all(torch.equal(got[k], v) for k, v in enc.items()), name
        assert m.cond_encoder_info["path"].endswith(name)
        assert all(p.requires_grad for p in m.control.cond_encoder.parameters())  # it trains from there
    bad = dict(enc, **{"proj.weight": enc["proj.weight"][:, :-1]})
    bad.pop("norm.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth[\s\S]*norm\.bias[\s\S]*proj\.weight"):
        _module("ECMModule", cond_encoder_weights=str(tmp_path / "bad.pth"))


def test_var_weight_decay_follows_var_by_default():
    """VAR's train.py decays every ≥2-D weight but those named in its no-decay list: class_emb and word_embed decay,
    the position/level embeddings and the attention scale do not; no_decay_keys overrides the list."""
    m = _module("VARModule")
    names = {id(p): n for n, p in m.var.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in m.param_groups())
    assert {"class_emb.weight", "word_embed.weight", "blocks.0.attn.mat_qkv.weight"} <= decay
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= no_decay
    m2 = _module("VARModule", no_decay_keys=["class_emb", "lvl_embed", "pos_", "scale_mul"])
    assert "class_emb.weight" in {n for n, p in m2.var.named_parameters() if id(p) in
                                  {id(q) for q in m2.param_groups()[1]["params"]}}


def test_var_network_can_be_injected_from_the_config(tmp_path):
    """``model.init_args.var_net`` (lightning-hydra-template's injected ``net``): the VAR given as ``class_path`` +
    ``init_args`` is the module's network; its arguments win over ``var_preset`` and stay out of hparams."""
    import yaml

    from ctrlgen.lightning_modules.cli import CtrlgenCLI
    from ctrlgen.lightning_modules.ecm import VAR
    from ctrlgen.lightning_modules.ecm.scales import TINY_PATCH_NUMS

    net = {"class_path": "ctrlgen.lightning_modules.ecm.var.VAR",
           "init_args": {"depth": 2, "embed_dim": 64, "num_heads": 2, "vocab_size": 512, "cvae": 16,
                         "num_classes": 10, "patch_nums": list(TINY_PATCH_NUMS)}}
    cfg = tmp_path / "inject.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"init_args": {"var_net": net}}}))
    cli = CtrlgenCLI(args=["-c", "configs/ecm/demo_var.yaml", "-c", str(cfg), "--model.init_args.vqvae_weights=null",
                           f"--trainer.default_root_dir={tmp_path}"], run=False)
    var = cli.model.var
    assert isinstance(var, VAR) and len(var.blocks) == 2 and var.C == 64  # the demo preset has depth 4, width 128
    assert "var_net" not in cli.model.hparams
    plain = CtrlgenCLI(args=["-c", "configs/ecm/demo_var.yaml", "--model.init_args.vqvae_weights=null",
                             f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert len(plain.model.var.blocks) == 4
