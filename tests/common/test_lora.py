"""LoRA adapters (common/lora.py) on a tiny diffusers UNet, a tiny CLIP text encoder and plain torch modules; the
checkpoint rule for LoRA inside frozen bases (BaseGenModule); a CtrlgenCLI fit + resume of TinyLoraModule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.lora import (
    add_lora,
    export_lora,
    is_lora_key,
    load_lora_file,
    load_lora_state_dict,
    lora_param_count,
    lora_state_dict,
    merge_lora,
    set_adapter_weights,
    unmerge_lora,
)
from tests.conftest import assert_same_state
from tests.helpers.tiny_lora_module import (
    ATTN_TARGETS,
    tiny_text_encoder,
    tiny_unet,
    unet_inputs,
    write_tiny_unet,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.o, self.other = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.other(self.o(self.q(x) * self.k(x).sigmoid()))


def _linear_sum(model: nn.Module, targets: list[str], r: int) -> int:
    """Σ r·(in + out) over the nn.Linear layers whose names end with a target (computed before injection)."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))


def _unet_out(unet, seed=0):
    x, t, ctx = unet_inputs(2, seed)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _trained_unet(adapter="young", steps=3, alpha=8.0, seed=0):
    unet = add_lora(tiny_unet(), ATTN_TARGETS, adapter, r=4, alpha=alpha, init="gaussian", seed=seed)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x, t, ctx = unet_inputs(2, 100 + i)
        loss = unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet


# ------------------------------------------------------------------------------------------------- injection, counts
def test_trainable_counts_match_hand_computed_sums():
    toy = add_lora(Toy(), ["q", "k", "o"], r=2)
    assert lora_param_count(toy) == 2 * (8 + 16) * 2 + 2 * (16 + 8) == 144
    trainable = {n for n, p in toy.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_key(n, "default") for n in trainable)
    assert sum(p.numel() for p in toy.parameters() if p.requires_grad) == 144

    unet = tiny_unet()
    expected = _linear_sum(unet, ATTN_TARGETS, 4)
    # 3 transformer blocks at 16 channels (8 linears 16->16, cross dim 16) + 1 at 32 (6 linears 32->32, to_k/to_v 16->32)
    assert expected == 4 * (3 * 8 * (16 + 16) + 6 * (32 + 32) + 2 * (16 + 32)) == 4992
    add_lora(unet, ATTN_TARGETS, "young", r=4)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == lora_param_count(unet, "young") == expected

    te = tiny_text_encoder()
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    expected = _linear_sum(te, targets, 8)
    assert expected == 2 * 4 * 8 * (16 + 16)
    add_lora(te, targets, "old", r=8)
    assert sum(p.numel() for p in te.parameters() if p.requires_grad) == expected


def test_bad_targets_and_duplicate_names_fail():
    with pytest.raises(ValueError, match="not found"):
        add_lora(Toy(), ["nope"])
    toy = add_lora(Toy(), ["q"], "a")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(toy, ["q"], "a")


def test_second_adapter_freezes_first_and_shares_seeded_init():
    unet = add_lora(tiny_unet(), ATTN_TARGETS, "young", r=4, seed=0)
    add_lora(unet, ATTN_TARGETS, "old", r=4, seed=0)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if not is_lora_key(n, "old"))
    assert lora_param_count(unet, "old") == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    young, old = lora_state_dict(unet, "young"), lora_state_dict(unet, "old")
    assert young.keys() == old.keys()
    a_keys = [k for k in young if ".lora_A." in k]
    assert a_keys and all(torch.equal(young[k], old[k]) for k in young)  # same seed: identical A (and B = 0)
    assert young[a_keys[0]].abs().sum() > 0


def test_only_lora_params_change_after_optimizer_steps():
    base = {k: v.clone() for k, v in tiny_unet().state_dict().items()}
    unet = _trained_unet()
    sd = unet.state_dict()
    for k, v in sd.items():
        if is_lora_key(k):
            continue
        assert torch.equal(v, base[k.replace(".base_layer", "")]), k  # frozen base bitwise unchanged
    b = [v for k, v in sd.items() if ".lora_B." in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # B started at 0 and was trained


# ---------------------------------------------------------------------------------------------------- state dicts
def test_lora_state_dict_roundtrip_and_mismatch_errors():
    unet = _trained_unet()
    sd = lora_state_dict(unet, "young")
    assert all(".young." not in k and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in sd)
    fresh = add_lora(tiny_unet(), ATTN_TARGETS, "young", r=4, alpha=8.0, seed=5)
    load_lora_state_dict(fresh, sd, "young")
    assert torch.equal(_unet_out(fresh), _unet_out(unet))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(fresh, dict(list(sd.items())[:-1]), "young")
    with pytest.raises(KeyError, match="no adapter"):
        lora_state_dict(fresh, "old")


# ---------------------------------------------------------------------------------------------- diffusers export
def test_export_loads_in_diffusers_unet_and_pipeline_with_identical_outputs(tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from tests.helpers.tiny_lora_module import write_tiny_pipeline

    pipe_dir = write_tiny_pipeline(tmp_path / "pipe")
    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"), local_files_only=True)
    add_lora(unet, ATTN_TARGETS, "young", r=4, alpha=8.0, init=False, seed=0)  # random A and B, scale alpha/r = 2
    te = tiny_text_encoder()
    add_lora(te, ["q_proj", "v_proj"], "young", r=2, init=False, seed=1)
    ids = torch.tensor([[0, 5, 9, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref_unet, ref_te = _unet_out(unet), te(ids).last_hidden_state
    file = export_lora(tmp_path / "lora" / "young.safetensors", {"unet": unet, "text_encoder": te}, "young")

    fresh = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"), local_files_only=True)
    assert not torch.allclose(_unet_out(fresh), ref_unet, atol=1e-3)
    fresh.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet", adapter_name="young")
    assert torch.allclose(_unet_out(fresh), ref_unet, atol=1e-6, rtol=0)

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    pipe.text_encoder.load_state_dict(tiny_text_encoder().state_dict())  # same base as `te`
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="young")
    assert torch.allclose(_unet_out(pipe.unet), ref_unet, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids).last_hidden_state, ref_te, atol=1e-6, rtol=0)

    ours = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"), local_files_only=True)
    load_lora_file(file, {"unet": ours}, "young")
    assert torch.allclose(_unet_out(ours), ref_unet, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())


# ------------------------------------------------------------------------------------------- merge, combination
def test_merge_and_unmerge_keep_outputs_and_restore_base():
    unet = add_lora(tiny_unet(), ATTN_TARGETS, "young", r=4, alpha=8.0, init=False, seed=0)
    base = {k: v.clone() for k, v in unet.state_dict().items() if not is_lora_key(k)}
    before = _unet_out(unet)
    merge_lora(unet)
    merged = unet.state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in base.items())  # the LoRA went into W
    assert torch.allclose(_unet_out(unet), before, atol=1e-5, rtol=1e-5)
    unmerge_lora(unet)
    assert all(torch.allclose(unet.state_dict()[k], v, atol=1e-6) for k, v in base.items())
    assert torch.allclose(_unet_out(unet), before, atol=1e-5, rtol=1e-5)


def test_weighted_combination_is_linear_in_the_adapter_deltas():
    toy = add_lora(Toy(), ["q"], "young", r=2, alpha=4.0, init=False, seed=0)
    add_lora(toy, ["q"], "old", r=2, alpha=2.0, init=False, seed=1)
    w0, b0 = toy.q.base_layer.weight, toy.q.base_layer.bias
    x = torch.randn(5, 8)
    set_adapter_weights(toy, {"young": 0.3, "old": 0.7})
    expected = x @ w0.T + b0
    for name, w, scale in (("young", 0.3, 4.0 / 2), ("old", 0.7, 2.0 / 2)):
        expected = expected + w * scale * x @ toy.q.lora_A[name].weight.T @ toy.q.lora_B[name].weight.T
    with torch.no_grad():
        assert torch.allclose(toy.q(x), expected, atol=1e-6)
    assert [n for n, p in toy.named_parameters() if p.requires_grad] == ["q.lora_A.old.weight", "q.lora_B.old.weight"]


def test_weighted_combination_equals_diffusers_set_adapters_and_merges():
    young = _trained_unet("young", steps=2)
    unet = add_lora(tiny_unet(), ATTN_TARGETS, "young", r=4, alpha=8.0, trainable=False)
    load_lora_state_dict(unet, lora_state_dict(young, "young"), "young")
    add_lora(unet, ATTN_TARGETS, "old", r=4, alpha=8.0, init=False, seed=3, trainable=False)
    outs = {}
    for a in (0.0, 0.25, 1.0):
        set_adapter_weights(unet, {"young": a, "old": 1 - a})
        outs[a] = _unet_out(unet)
    unet.set_adapters(["young", "old"], weights=[0.25, 0.75])  # diffusers' own API, same semantics
    assert torch.allclose(_unet_out(unet), outs[0.25], atol=1e-6)
    # linear in α (each layer's delta is linear, the UNet is not: compare with the endpoints only at α = 0, 1)
    set_adapter_weights(unet, {"young": 1.0})
    assert torch.allclose(_unet_out(unet), _unet_out(young), atol=1e-6)
    set_adapter_weights(unet, {"young": 0.25, "old": 0.75})
    merge_lora(unet)  # materialise the α mix once (agebooth.md §9)
    assert torch.allclose(_unet_out(unet), outs[0.25], atol=1e-5)
    unmerge_lora(unet)
    with pytest.raises(KeyError, match="unknown adapters"):
        set_adapter_weights(unet, {"middle": 1.0})


# -------------------------------------------------------------------------------------------- checkpoint rule
class _Frozen(BaseGenModule):
    frozen_prefixes = ("base.",)

    def __init__(self):
        super().__init__()
        self.base = add_lora(Toy(), ["q", "o"], r=2)
        self.base.register_buffer("stat", torch.zeros(3))
        self.head = nn.Linear(8, 2)


def test_checkpoint_keeps_trainable_keys_under_frozen_prefixes():
    m = _Frozen()
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert kept == {n for n, _ in m.named_parameters() if is_lora_key(n)} | {"head.weight", "head.bias"}
    fresh = _Frozen()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: frozen keys taken from the live module
    assert torch.equal(fresh.base.q.lora_A.default.weight, m.base.q.lora_A.default.weight)

    _Frozen.keep_in_checkpoint = ("base.stat",)
    try:
        ckpt = {"state_dict": m.state_dict()}
        m.on_save_checkpoint(ckpt)
        assert "base.stat" in ckpt["state_dict"] and "base.q.base_layer.weight" not in ckpt["state_dict"]
    finally:
        _Frozen.keep_in_checkpoint = ()
    # a trainable key missing from the checkpoint is not silently re-initialised: strict loading names it
    ckpt = {"state_dict": {k: v for k, v in m.state_dict().items() if ".lora_B." not in k and not k.startswith("base.")}}
    fresh.on_load_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="lora_B"):
        fresh.load_state_dict(ckpt["state_dict"])


# ----------------------------------------------------------------------------------------- CLI fit and resume
def _fit(shards, unet_dir, root, steps, extra=()):
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    return CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny_lora.yaml", f"--model.init_args.unet_dir={unet_dir}",
                            f"--data.init_args.train_shards={shards['train']}",
                            f"--data.init_args.val_shards={shards['val']}", f"--trainer.max_steps={steps}",
                            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                            f"--trainer.default_root_dir={root}", *extra])


def test_cli_fit_checkpoint_holds_only_lora_and_resume_is_exact(shapes_shards, tmp_path):
    unet_dir = write_tiny_unet(tmp_path / "unet")
    straight = _fit(shapes_shards, unet_dir, tmp_path / "a", 4)
    _fit(shapes_shards, unet_dir, tmp_path / "b", 2)
    ckpt_path = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("unet.") and is_lora_key(k, "default") for k in keys), keys[:5]
    assert len(keys) == sum(1 for n, _ in straight.model.named_parameters() if is_lora_key(n))
    base_bytes = (unet_dir / "diffusion_pytorch_model.safetensors").stat().st_size
    assert ckpt_path.stat().st_size < base_bytes / 4, (ckpt_path.stat().st_size, base_bytes)

    resumed = _fit(shapes_shards, unet_dir, tmp_path / "b", 4, ["--ckpt_path=last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert_same_state(sa, sb)
    assert torch.equal(torch.cat(straight.model.seen_t[2:]), torch.cat(resumed.model.seen_t))
    init = sum(v.abs().sum() for k, v in sa.items() if ".lora_B." in k)
    assert init > 0  # the LoRA trained (B starts at 0)
