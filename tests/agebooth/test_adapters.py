"""Age LoRAs on a tiny diffusers UNet (agebooth/adapters.py, common/lora.py factor readers): diffusers
``set_adapters`` equivalence, fresh-LoRA identity, AgeBooth legacy keys, save/``load_lora_weights`` round trips,
one materialisation per α (agebooth.md §3, §5, §9, §14)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.agebooth import fusion
from ctrlgen.lightning_modules.agebooth.adapters import (
    AgeFusion,
    activate,
    load_age_lora,
)
from ctrlgen.lightning_modules.common.lora import (
    LoraFactors,
    add_lora,
    add_lora_factors,
    is_lora_key,
    lora_factors_state_dict,
    merge_lora,
    model_lora_factors,
    read_lora_factors,
    unmerge_lora,
)
from safetensors.torch import save_file

from tests.helpers.tiny_lora_module import (
    ATTN_TARGETS,
    tiny_unet,
    unet_inputs,
    write_tiny_pipeline,
)

N_ATTN_LINEARS = 32  # tiny UNet: 4 transformer blocks × (attn1, attn2) × (to_q, to_k, to_v, to_out.0)



def _out(unet, seed=0):
    x, t, ctx = unet_inputs(2, seed)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _attn_linears(unet) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in ATTN_TARGETS)}


def _random_lora(unet, seed: int, r: int = 4) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {p: LoraFactors(torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3)
            for p, (o, i) in sorted(_attn_linears(unet).items())}


def _with_delta(deltas: dict[str, torch.Tensor]):
    """A fresh tiny UNet with ΔW added to its base weights by hand."""
    unet = tiny_unet()
    with torch.no_grad():
        for p, d in deltas.items():
            unet.get_submodule(p).weight += d
    return unet


@pytest.fixture(scope="module")
def pair():
    u = tiny_unet()
    return _random_lora(u, 1), _random_lora(u, 2)


# ------------------------------------------------------------------------------ exactness against diffusers / hand
def test_linear_fusion_equals_set_adapters_and_hand_added_deltas(pair):
    young, old = pair
    unet = tiny_unet()
    add_lora_factors(unet, young, "young")
    add_lora_factors(unet, old, "old")
    fused = tiny_unet()
    age = AgeFusion(young, old, "linear")
    for a in (0.0, 0.3, 1.0):
        unet.set_adapters(["young", "old"], weights=[a, 1 - a])
        ref = _out(unet)
        hand = _out(_with_delta(fusion.delta(fusion.linear_fusion(young, old, a))))
        by_hand = _out(_with_delta({p: a * young[p].delta() + (1 - a) * old[p].delta() for p in young}))
        age.apply(fused, a)
        assert (ref - by_hand).abs().max() <= 1e-6
        assert (_out(fused) - ref).abs().max() <= 1e-6
        assert (hand - by_hand).abs().max() <= 1e-6
    assert not torch.allclose(_out(fused), _out(tiny_unet()), atol=1e-3)  # the LoRAs do change the output


def test_fresh_lora_leaves_the_unet_output_unchanged():
    base = _out(tiny_unet())
    unet = add_lora(tiny_unet(), ATTN_TARGETS, "young", r=4, init="gaussian", seed=0)
    add_lora(unet, ATTN_TARGETS, "old", r=4, init="gaussian", seed=0)
    assert torch.equal(_out(unet), base)
    a_y, a_o = model_lora_factors(unet, "young"), model_lora_factors(unet, "old")
    assert all(torch.equal(a_y[p].down, a_o[p].down) and not a_y[p].up.any() for p in a_y)  # shared A, B = 0
    AgeFusion(a_y, a_o, "linear").apply(unet, 0.5)
    assert torch.equal(_out(unet), base)


# ------------------------------------------------------------------------------------------------ file formats
def test_agebooth_legacy_keys_load_onto_the_right_layers(tmp_path, pair):
    young, _ = pair
    file = tmp_path / "pytorch_lora_weights.safetensors"
    sd = lora_factors_state_dict(young, "unet", style="legacy")
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in sd)
    save_file(sd, str(file))
    loaded = load_age_lora(tmp_path)
    assert set(loaded) == set(_attn_linears(tiny_unet())) and len(loaded) == N_ATTN_LINEARS
    unet = add_lora_factors(tiny_unet(), loaded, "young")
    on_model = model_lora_factors(unet, "young")
    assert all(torch.equal(on_model[p].down, young[p].down) and torch.equal(on_model[p].up, young[p].up)
               and on_model[p].scale == 1.0 for p in young)
    expected = _out(_with_delta(fusion.delta(young)))
    assert (_out(unet) - expected).abs().max() <= 1e-6
    ref = tiny_unet()  # diffusers reads the same file with scale 1 onto the same layers
    ref.load_lora_adapter(str(file), prefix="unet", adapter_name="young")
    assert (_out(ref) - expected).abs().max() <= 1e-6


def test_reader_accepts_peft_keys_processor_keys_and_alphas():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g)
    peft = read_lora_factors({"unet.a.attn1.to_q.lora_A.weight": down, "unet.a.attn1.to_q.lora_B.weight": up,
                              "text_encoder.q_proj.lora_A.weight": down}, metadata={"unet.lora_alpha": 8, "unet.r": 2})
    assert list(peft) == ["a.attn1.to_q"] and peft["a.attn1.to_q"].scale == 4.0
    proc = read_lora_factors({"unet.a.attn1.processor.to_out_lora.down.weight": down,
                              "unet.a.attn1.processor.to_out_lora.up.weight": up, "unet.a.attn1.to_out.0.alpha":
                              torch.tensor(1.0)})
    assert list(proc) == ["a.attn1.to_out.0"] and proc["a.attn1.to_out.0"].scale == 0.5
    with pytest.raises(KeyError, match="needs both"):
        read_lora_factors({"unet.a.to_q.lora.down.weight": down})
    with pytest.raises(KeyError, match="not a LoRA factor"):
        read_lora_factors({"unet.a.to_q.weight": down})
    with pytest.raises(KeyError, match="no LoRA keys under prefix 'unet'.*text_encoder"):
        read_lora_factors({"text_encoder.q.lora_A.weight": down})


def test_loading_onto_the_wrong_model_or_with_a_path_like_name_fails(pair):
    young, _ = pair
    with pytest.raises(KeyError, match="missing"):
        add_lora_factors(tiny_unet(), {"nope.to_q": young[next(iter(young))]}, "young")
    path = next(iter(young))
    wrong = {path: LoraFactors(young[path].down[:, :3], young[path].up)}
    with pytest.raises(KeyError, match="another model"):
        add_lora_factors(tiny_unet(), wrong, "young")
    with pytest.raises(ValueError, match="substring"):
        add_lora_factors(tiny_unet(), young, "b")  # 'b' is in 'down_blocks': false missing keys in peft/diffusers


def test_fused_adapters_round_trip_through_save_and_load_lora_weights(tmp_path, pair):
    from diffusers import DiffusionPipeline

    young, old = pair
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe")
    for name, lora in (("young", young), ("old", old)):
        save_file(lora_factors_state_dict(lora, "unet", style="legacy"), str(tmp_path / f"{name}.safetensors"))
    age = AgeFusion.from_files(tmp_path / "young.safetensors", tmp_path / "old.safetensors", mode="svdmix")
    unet = tiny_unet()
    age.apply(unet, 0.4)
    ref = _out(unet)
    file = age.save(tmp_path / "mix" / "age_mix_0.4.safetensors", unet)
    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name="young.safetensors", adapter_name="young")
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="age_mix")
    assert pipe.get_active_adapters() == ["age_mix"]  # load_lora_weights activates only the adapter just loaded
    assert (_out(pipe.unet) - ref).abs().max() <= 1e-6
    pipe.load_lora_weights(str(tmp_path), weight_name="old.safetensors", adapter_name="old")
    assert pipe.get_active_adapters() == ["old"]
    activate(pipe.unet, {"age_mix": 1.0})
    assert pipe.get_active_adapters() == ["age_mix"]
    assert (_out(pipe.unet) - ref).abs().max() <= 1e-6
    ours = tiny_unet()
    back = read_lora_factors(file)
    add_lora_factors(ours, back, "age_mix")
    assert (_out(ours) - ref).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------- materialisation
def test_materialised_svdmix_matches_merged_weights_and_does_no_work_per_call(monkeypatch, pair):
    young, old = pair
    unet = tiny_unet()
    age = AgeFusion(young, old, "svdmix")
    counts = {"svd": 0, "delta": 0}
    true_svd, true_delta = fusion._svd, LoraFactors.delta

    def svd(x):
        counts["svd"] += 1
        return true_svd(x)

    def delta(self):
        counts["delta"] += 1
        return true_delta(self)

    monkeypatch.setattr(fusion, "_svd", svd)
    monkeypatch.setattr(LoraFactors, "delta", delta)
    age.apply(unet, 0.2)
    assert counts == {"svd": 4 * N_ATTN_LINEARS, "delta": 0}  # two SVDs per factor pair and LoRA, cached
    age.apply(unet, 0.7)
    assert counts["svd"] == 4 * N_ATTN_LINEARS  # a new α reuses the SVDs and the injected adapter
    for step in range(5):  # a denoising loop: ordinary forwards only
        _out(unet, step)
    assert counts == {"svd": 4 * N_ATTN_LINEARS, "delta": 0}
    adapter_out = _out(unet)
    age.apply(unet, 0.7, merge=True)
    merged_out = _out(unet)
    assert ((adapter_out - merged_out).norm() / merged_out.norm()) <= 1e-5


def test_merge_restores_base_bit_exactly_where_unmerge_drifts(pair):
    young, old = pair
    unet = tiny_unet()
    age = AgeFusion(young, old, "linear")
    age.apply(unet, 0.5)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    fused_out = _out(unet)
    age.apply(unet, 0.5, merge=True)  # adapters disabled, ΔW in the base weights
    assert (_out(unet) - fused_out).abs().max() <= 1e-5
    age.restore(unet)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in base.items())
    assert (_out(unet) - fused_out).abs().max() <= 1e-6  # the age_mix adapter is active again
    merge_lora(unet)
    unmerge_lora(unet)
    drift = max((unet.state_dict()[k] - v).abs().max().item() for k, v in base.items() if not is_lora_key(k))
    assert 0 < drift < 1e-5
