"""Multi-scale VQVAE (spec §3.2, §8 checks 1, 2, 4)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctrlgen.lightning_modules.ecm.checkpoint import read_manifest
from ctrlgen.lightning_modules.ecm.scales import phi_table
from ctrlgen.lightning_modules.ecm.vqvae import (
    VQVAE,
    build_vqvae,
    straight_through,
    vq_scale_loss,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures"  # vendored copies of shared/fixtures/*.tsv


def _n(m):
    return sum(p.numel() for p in m.parameters())


def _meta_default():
    with torch.device("meta"):
        return VQVAE()


def test_state_dict_equals_manifest():
    sd = _meta_default().state_dict()
    man = read_manifest(MANIFESTS / "vae_ch160v4096z32_state_dict.tsv")
    assert len(man) == 324
    assert list(sd) == [k for k, _, _ in man]
    for k, shape, dtype in man:
        assert tuple(sd[k].shape) == shape and sd[k].dtype == dtype, k


def test_param_counts():
    m = _meta_default()
    assert _n(m) == 108_948_355
    assert _n(m.encoder) == 44_107_872 and _n(m.decoder) == 64_653_923
    assert _n(m.quantize) == 168_064 and _n(m.quant_conv) + _n(m.post_quant_conv) == 18_496
    assert m.quantize.quant_resi.table == phi_table() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert len(m.decoder.up[0].block) == len(m.encoder.down[0].block) + 1  # dec = enc + 1


@pytest.fixture(scope="module")
def small256():
    """Default ch_mult/z/V/patch_nums at 256 px with ch = 32 (cheap stand-in for the shape contract)."""
    torch.manual_seed(0)
    return build_vqvae("vae_ch160v4096z32", ch=32, num_res_blocks=1).eval()


def test_shape_contract_256(small256):
    vae = small256
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    idx = vae.img_to_idx(img)
    assert [tuple(i.shape) for i in idx] == [(1, p * p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert all(i.dtype == torch.int64 and int(i.max()) < 4096 for i in idx)
    x = vae.idx_to_var_input(idx)
    assert x.shape == (1, 679, 32) and x.dtype == torch.float32
    with torch.no_grad():
        out = vae.idx_to_img(idx)
    assert out.shape == (1, 3, 256, 256) and out.min() >= -1 and out.max() <= 1
    assert vae.image_size == 256
    # truncated encoding: only scales 0..3
    assert len(vae.img_to_idx(img, last_si=3)) == 4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vae = build_vqvae("tiny")
    with torch.no_grad():  # spread the codebook so that many codes get used
        vae.quantize.embedding.weight.normal_(0, 0.5)
    return vae.eval()


def test_tiny_preset(tiny):
    assert tiny.image_size == 64 and tiny.patch_nums == (1, 2, 3, 4, 6, 8) and tiny.Cvae == 16


def test_teacher_forcing_matches_sampling_step(tiny):
    img = torch.rand(3, 3, 64, 64) * 2 - 1
    idx = tiny.img_to_idx(img)
    x = tiny.idx_to_var_input(idx)
    q = tiny.quantize
    f_hat = torch.zeros(3, 16, 8, 8)
    chunks = []
    with torch.no_grad():
        for si, pn in enumerate(tiny.patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(3, 16, pn, pn)
            f_hat, nxt = tiny.next_autoregressive_input(si, f_hat, h)
            if si < len(tiny.patch_nums) - 1:
                chunks.append(nxt.flatten(2).transpose(1, 2))
    assert torch.allclose(torch.cat(chunks, 1), x, atol=1e-6)
    assert torch.allclose(f_hat, tiny.idx_to_fhat(idx), atol=1e-6)
    # prefix of scales → inputs only through that scale
    assert tiny.idx_to_var_input(idx[:3]).shape == (3, 1 + 4 + 9 - 1, 16)
    assert torch.allclose(tiny.idx_to_var_input(idx[:3]), x[:, :13], atol=1e-6)
    # the area-down rule: input of scale 1 = 2×2 area-down of φ_0(up(embed(idx_0)))
    f0 = q.phi(0, F.interpolate(q.embedding(idx[0]).transpose(1, 2).reshape(3, 16, 1, 1), size=(8, 8), mode="bicubic"))
    assert torch.allclose(x[:, :4], F.interpolate(f0, size=(2, 2), mode="area").flatten(2).transpose(1, 2), atol=1e-6)


def test_encode_consistent_with_quantizer(tiny):
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f_st, loss, usages = tiny.quantize(tiny.encode(img), ret_usages=True)
    assert torch.allclose(f_st, tiny.idx_to_fhat(tiny.img_to_idx(img)), atol=1e-5)
    assert loss.ndim == 0 and loss > 0 and len(usages) == 6


def test_training_forward_straight_through():
    torch.manual_seed(0)
    vae = build_vqvae("tiny").train()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, vq_loss, usages = vae(img, ret_usages=True)
    assert rec.shape == img.shape and vq_loss.ndim == 0
    assert len(usages) == 6 and all(0 <= u <= 100 for u in usages)
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0  # EMA of code hits updated in training
    (F.mse_loss(rec, img) + vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    vae.eval()
    before = vae.quantize.ema_vocab_hit_SV.clone()
    with torch.no_grad():
        vae(img)
    assert torch.equal(before, vae.quantize.ema_vocab_hit_SV)  # no EMA update in eval


def test_pure_loss_helpers():
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    f_hat = torch.randn(2, 4, 3, 3, requires_grad=True)
    st = straight_through(f_hat, f)
    assert torch.allclose(st, f_hat)
    st.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f)) and f_hat.grad is None
    f.grad = None
    loss = vq_scale_loss(f_hat, f, 0.25)
    assert torch.allclose(loss, 1.25 * F.mse_loss(f_hat, f))
    loss.backward()
    assert torch.allclose(f.grad, -0.25 * 2 * (f_hat - f).detach() / f.numel())
    assert torch.allclose(f_hat.grad, 2 * (f_hat - f).detach() / f.numel())


def test_latent_size_mismatch_raises(tiny):
    with pytest.raises(ValueError, match="finest patch_num"):
        tiny.quantize(torch.randn(1, 16, 7, 7))


def test_token_maths_ignores_autocast(tiny):
    # 8 seeded images: the bf16 encoder changes some code for all of 20 seeds tried (for 19 of 20 with 2 images)
    img = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    idx = tiny.img_to_idx(img)
    # tokenising under the trainer's bf16 autocast gives the fp32 codes (the encoder is shielded); the encoder itself
    # under autocast would pick other codes (positive control: the shield is what makes them equal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(tiny.img_to_idx(img), idx))
        assert not all(torch.equal(a, b) for a, b in zip(tiny.quantize.f_to_idx(tiny.encode(img)), idx))
    with torch.no_grad():
        ref = tiny.idx_to_var_input(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = tiny.idx_to_var_input(idx)
            f = tiny.idx_to_fhat(idx)
    assert x.dtype == f.dtype == torch.float32 and torch.equal(x, ref)
