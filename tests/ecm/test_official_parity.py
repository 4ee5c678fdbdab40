"""Parity with the official FoundationVision/VAR code (issue 14): a tiny official VQVAE + depth-2 VAR, their seeded
weights and their outputs live in ``tests/fixtures/var_parity/official_var_tiny.safetensors`` (made by
``tests/fixtures/var_parity/make_fixture.py`` from an official checkout; commit in the file's metadata).

The weights go through ctrlgen's strict loader (``checkpoint.load_state_dict_strict``) into ctrlgen's own VQVAE
and VAR; then tokens, teacher-forcing input, teacher-forced logits, the reconstruction and five KV-cache samples
(labels given / drawn by the sampler / null class, with and without top-k/top-p, ``more_smooth``) must match.
Tokens are compared exactly; floats within 1e-5 (both run fp32 on the CPU, the same operations in the same order).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctrlgen.lightning_modules.ecm.checkpoint import load_state_dict_strict
from ctrlgen.lightning_modules.ecm.var import VAR
from ctrlgen.lightning_modules.ecm.vqvae import VQVAE

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "var_parity" / "official_var_tiny.safetensors"
ATOL = 1e-5


def _unpack(q: torch.Tensor, scale: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Packed nibbles (k + 8, high first) × 2^e → fp32 (layout documented in make_fixture.py)."""
    k = torch.stack((q // 16, q % 16), dim=1).flatten()[:math.prod(shape)].float() - 8
    return (k * scale).view(shape)


@pytest.fixture(scope="module")
def fx():
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} missing: run tests/fixtures/var_parity/make_fixture.py <official VAR checkout>")
    with safe_open(str(FIXTURE), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    shapes = json.loads(meta["shapes"])
    sds: dict[str, dict[str, torch.Tensor]] = {"vqvae": {}, "var": {}}
    for full, shape in shapes.items():
        model, key = full.split(".", 1)
        sds[model][key] = _unpack(t[f"{full}.q"], t[f"{full}.scale"], shape)
    for k, v in t.items():
        model, _, key = k.partition(".")
        if model in sds and not k.endswith((".q", ".scale")):
            sds[model][key] = v
    return {"t": t, "meta": meta, "sds": sds, "samples": json.loads(meta["samples"])}


@pytest.fixture(scope="module")
def models(fx, tmp_path_factory):
    """ctrlgen models built from the official constructor arguments, loaded from checkpoint files."""
    vk, rk = json.loads(fx["meta"]["vqvae_kwargs"]), json.loads(fx["meta"]["var_kwargs"])
    assert not vk["using_znorm"] and not rk["shared_aln"] and rk["attn_l2_norm"]  # the variants ctrlgen builds
    # ch_mult and num_res_blocks are fixed inside the official VQVAE class
    vae = VQVAE(ch=vk["ch"], ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=vk["z_channels"],
                vocab_size=vk["vocab_size"], patch_nums=vk["v_patch_nums"], beta=vk["beta"],
                quant_resi=vk["quant_resi"], num_phi=vk["share_quant_resi"], quant_conv_ks=vk["quant_conv_ks"])
    var = VAR(depth=rk["depth"], embed_dim=rk["embed_dim"], num_heads=rk["num_heads"], vocab_size=vk["vocab_size"],
              cvae=vk["z_channels"], num_classes=rk["num_classes"], patch_nums=rk["patch_nums"],
              mlp_ratio=rk["mlp_ratio"], drop_path_rate=rk["drop_path_rate"], cond_drop_rate=rk["cond_drop_rate"],
              norm_eps=rk["norm_eps"])
    d = tmp_path_factory.mktemp("parity")
    for name, m in (("vqvae", vae), ("var", var)):
        save_file(fx["sds"][name], str(d / f"{name}.safetensors"))
        load_state_dict_strict(m, d / f"{name}.safetensors")
    return vae.eval(), var.eval()


def _images(fx) -> torch.Tensor:
    return fx["t"]["images_u8"].float() / 127.5 - 1


def _idx(t: dict, prefix: str) -> list[torch.Tensor]:
    return [t[f"{prefix}.{si}"] for si in range(len([k for k in t if k.startswith(f"{prefix}.")]))]


def test_fixture_is_small_and_from_the_official_code(fx):
    assert FIXTURE.stat().st_size < 5 * 2**20
    assert fx["meta"]["official_repo"] == "https://github.com/FoundationVision/VAR"
    assert len(fx["meta"]["official_commit"]) == 40


def test_weights_round_trip_through_the_strict_loader(fx, models):
    vae, var = models
    for name, m in (("vqvae", vae), ("var", var)):
        sd = m.state_dict()
        assert set(sd) == set(fx["sds"][name])
        for k, v in fx["sds"][name].items():
            assert torch.equal(sd[k], v), f"{name}.{k}"


@torch.no_grad()
def test_vqvae_tokens_teacher_forcing_and_reconstruction(fx, models):
    vae, _ = models
    t = fx["t"]
    idx = vae.img_to_idx(_images(fx))
    want = _idx(t, "idx")
    assert len(idx) == len(want) == len(vae.patch_nums)
    for si, (a, b) in enumerate(zip(idx, want)):
        assert torch.equal(a, b), f"scale {si}: {int((a != b).sum())} tokens differ"
    torch.testing.assert_close(vae.idx_to_var_input(want), t["var_input"], atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.idx_to_img(want), t["recon"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_teacher_forced_logits(fx, models):
    _, var = models
    t = fx["t"]
    logits = var(t["labels"], t["var_input"])
    assert logits.shape == t["logits"].shape
    torch.testing.assert_close(logits, t["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["default", "filtered", "random_labels", "unconditional", "more_smooth"])
def test_kv_cache_sampler(fx, models, name):
    vae, var = models
    t, s = fx["t"], fx["samples"][name]
    labels = torch.tensor(s["label_B"]) if isinstance(s["label_B"], list) else s["label_B"]
    seen = []
    handle = var.class_emb.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].clone()))
    try:
        img, idx, _ = var.autoregressive_infer_cfg(s["B"], labels, vqvae=vae, g_seed=s["g_seed"], cfg=s["cfg"],
                                                   top_k=s["top_k"], top_p=s["top_p"], more_smooth=s["more_smooth"],
                                                   return_logits=True)
    finally:
        handle.remove()
    assert torch.equal(seen[0][:s["B"]], t[f"sample.{name}.labels"])
    want = _idx(t, f"sample.{name}.idx")
    assert len(idx) == len(want)
    for si, (a, b) in enumerate(zip(idx, want)):
        assert torch.equal(a, b), f"{name}, scale {si}: {int((a != b).sum())} of {b.numel()} tokens differ"
    torch.testing.assert_close(img, t[f"sample.{name}.img"], atol=ATOL, rtol=0)


def test_more_smooth_needs_the_eager_sampler(models):
    vae, var = models
    with pytest.raises(ValueError, match="more_smooth=True needs sampler='eager'"):
        var.autoregressive_infer_cfg(1, 0, vqvae=vae, g_seed=0, more_smooth=True, sampler="static")
