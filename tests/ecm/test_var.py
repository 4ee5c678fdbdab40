"""VAR transformer (spec §3.4–§3.9; §8 checks 1–5, 8, 9, 11, 13)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.lightning_modules.ecm import samplers as samplers_mod
from ctrlgen.lightning_modules.ecm import var as var_mod
from ctrlgen.lightning_modules.ecm.checkpoint import read_manifest
from ctrlgen.lightning_modules.ecm.sampling import temperature_schedule
from ctrlgen.lightning_modules.ecm.scales import block_causal_bias, ends_for, lvl_index
from ctrlgen.lightning_modules.ecm.var import VAR, VAR_PRESETS, build_var, drop_labels
from ctrlgen.lightning_modules.ecm.vqvae import build_vqvae

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures"  # vendored copies of shared/fixtures/*.tsv


def _n(m):
    return sum(p.numel() for p in m.parameters())


def lively_tiny(**kw) -> VAR:
    """Tiny VAR with a non-negligible head/γ so that logit comparisons are meaningful."""
    torch.manual_seed(0)
    m = build_var("tiny", **{"depth": 2, "embed_dim": 128, "num_heads": 2, **kw})
    m.init_weights(init_head=1.0, aln_gamma=0.5)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(1)
    return build_vqvae("tiny").eval()


def test_state_dict_equals_manifest():
    with torch.device("meta"):
        m = VAR(depth=16)
    sd = m.state_dict()
    man = read_manifest(MANIFESTS / "var_d16_state_dict.tsv")
    assert len(man) == 220 and list(sd) == [k for k, _, _ in man]
    for k, shape, dtype in man:
        assert tuple(sd[k].shape) == shape and sd[k].dtype == dtype, k


@pytest.mark.parametrize("depth,count", [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360), (30, 2_010_020_356)])
def test_param_counts(depth, count):
    with torch.device("meta"):
        m = build_var(f"d{depth}")
    assert _n(m) == count
    assert m.C == 64 * depth and m.num_heads == depth and m.L == 680
    assert m.blocks[-1].drop_path.p == pytest.approx(0.1 * depth / 24)
    assert isinstance(m.blocks[0].drop_path, nn.Identity)  # linear from 0
    if depth == 16:
        assert _n(m.blocks[0]) == 18_888_720 and _n(m) - 16 * 18_888_720 == 8_064_000


def test_buffers_rebuilt_equal():
    m = build_var("tiny")
    sd = m.state_dict()
    assert "lvl_1L" in sd and "attn_bias_for_masking" in sd  # persistent
    assert torch.equal(m.lvl_1L, lvl_index(m.patch_nums).view(1, -1)) and m.lvl_1L.dtype == torch.int64
    assert torch.equal(m.attn_bias_for_masking, block_causal_bias(m.patch_nums))
    m.verify_buffers()
    with torch.no_grad():
        m.attn_bias_for_masking.zero_()
    with pytest.raises(ValueError, match="attn_bias_for_masking"):
        m.verify_buffers()


def test_init_rules():
    torch.manual_seed(0)
    C, depth = 1024, 2
    m = VAR(depth=depth, embed_dim=C, num_heads=16, vocab_size=256, num_classes=20, patch_nums=(1, 2), aln_gamma=1e-3)
    std = math.sqrt(1 / (3 * C))
    assert std == pytest.approx(0.018042, abs=1e-6)

    def rel(t, target):
        return abs(t.float().std().item() / target - 1)

    assert rel(m.class_emb.weight, std) < 0.03 and rel(m.word_embed.weight, std) < 0.03
    assert rel(m.pos_1LC, std) < 0.05
    assert rel(m.head.weight, 0.02 * std) < 0.03 and torch.all(m.head.bias == 0)
    assert rel(m.head_nm.ada_lin[1].weight, 0.5 * std) < 0.03
    b = m.blocks[1]
    assert rel(b.attn.proj.weight, std / math.sqrt(2 * depth)) < 0.03
    assert rel(b.ffn.fc2.weight, std / math.sqrt(2 * depth)) < 0.03
    assert rel(b.ada_lin[1].weight[: 2 * C], 1e-3 * std) < 0.03
    assert rel(b.ada_lin[1].weight[2 * C:], 0.5 * std) < 0.03
    assert torch.all(b.ada_lin[1].bias == 0) and torch.all(b.attn.proj.bias == 0)
    assert torch.allclose(b.attn.scale_mul_1H11, torch.full_like(b.attn.scale_mul_1H11, math.log(4)))
    assert var_mod.default_aln_gamma(16) == 1e-3 and var_mod.default_aln_gamma(24) == 1e-4
    assert var_mod.default_aln_gamma(30) == 1e-5


def test_ce_at_init_is_ln_v():
    torch.manual_seed(0)
    m = build_var("tiny", vocab_size=4096, cond_drop_rate=0.0).eval()
    B = 4
    with torch.no_grad():
        logits = m(torch.randint(0, 10, (B,)), torch.randn(B, m.L - 1, m.Cvae))
    ce = F.cross_entropy(logits.reshape(-1, 4096), torch.randint(0, 4096, (B * m.L,)))
    assert abs(ce.item() - math.log(4096)) < 1e-3


def test_forward_contract_default_schedule():
    torch.manual_seed(0)
    m = VAR(depth=2, embed_dim=128, num_heads=2).eval()  # default V=4096, Cvae=32, 10 scales
    x = torch.randn(2, 679, 32)
    with torch.no_grad():
        logits = m(torch.tensor([0, 999]), x)
        assert logits.shape == (2, 680, 4096) and logits.dtype == torch.float32
        assert m(torch.tensor([0, 1]), x, prog_si=7).shape == (2, 255, 4096)
        assert m(torch.tensor([0, 1]), None, prog_si=0).shape == (2, 1, 4096)


def test_truncated_forward_equals_prefix():
    m = lively_tiny()
    lab, x = torch.tensor([1, 7]), torch.randn(2, m.L - 1, m.Cvae)
    with torch.no_grad():
        full = m(lab, x)
        assert full.std() > 0.1
        for si, ed in enumerate(ends_for(m.patch_nums)):
            assert torch.allclose(m(lab, x[:, : ed - 1], prog_si=si), full[:, :ed], atol=1e-5)


def test_causality_by_scale():
    m = lively_tiny()
    lab, x = torch.tensor([2, 3]), torch.randn(2, m.L - 1, m.Cvae)
    eds = ends_for(m.patch_nums)
    with torch.no_grad():
        base = m(lab, x)
        for k in range(len(eds) - 1):
            x2 = x.clone()
            x2[:, eds[k] - 1:] += torch.randn_like(x2[:, eds[k] - 1:])  # inputs of scales > k
            out = m(lab, x2)
            assert torch.allclose(out[:, : eds[k]], base[:, : eds[k]], atol=1e-6)
            assert not torch.allclose(out[:, eds[k]:], base[:, eds[k]:], atol=1e-4)


def test_no_global_monkey_patching():
    classes = (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Embedding)
    before = {c: c.reset_parameters for c in classes}
    torch.manual_seed(5)
    ref = nn.Linear(64, 64)
    build_var("tiny")
    build_vqvae("tiny")
    assert {c: c.reset_parameters for c in classes} == before
    torch.manual_seed(5)
    after = nn.Linear(64, 64)
    assert torch.equal(ref.weight, after.weight) and torch.equal(ref.bias, after.bias)
    bound = 1 / math.sqrt(64)
    assert after.weight.abs().max() <= bound and after.weight.std() > 0.5 * bound / math.sqrt(3)


def test_class_dropout_only_in_training():
    m = lively_tiny(cond_drop_rate=0.5)
    lab, x = torch.tensor([1, 2, 3, 4]), torch.randn(4, m.L - 1, m.Cvae)
    rng = torch.get_rng_state()
    with torch.no_grad():
        a, b = m(lab, x), m(lab, x)
    assert torch.equal(a, b)
    assert torch.equal(rng, torch.get_rng_state())  # eval forward draws no random numbers
    m.cond_drop_rate = 1.0
    m.train()
    for blk in m.blocks:
        blk.drop_path = nn.Identity()
    with torch.no_grad():
        dropped = m(lab, x)
        m.eval()
        null = m(torch.full_like(lab, m.num_classes), x)
    assert torch.allclose(dropped, null, atol=1e-6)
    assert torch.equal(drop_labels(lab, 0.0, 10), lab)
    assert torch.all(drop_labels(lab, 1.0, 10) == 10)


def test_kv_cache_sampling_matches_teacher_forcing(tiny_vae):
    m = lively_tiny()
    B = 3
    lab = torch.tensor([0, 4, 9])
    img, idx, raw = m.autoregressive_infer_cfg(B, lab, vqvae=tiny_vae, g_seed=3, cfg=2.0, top_k=100, top_p=0.95,
                                               return_logits=True)
    assert img.shape == (B, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert [t.shape for t in idx] == [(B, p * p) for p in m.patch_nums]
    x = tiny_vae.idx_to_var_input(idx)
    with torch.no_grad():
        tf = m(torch.cat((lab, torch.full_like(lab, m.num_classes))), x.repeat(2, 1, 1))
    cached = torch.cat(raw, dim=1)
    assert cached.shape == tf.shape == (2 * B, m.L, m.V)
    assert torch.allclose(cached, tf, atol=1e-4, rtol=1e-4)
    assert all(b.attn.cached_k is None and not b.attn.caching for b in m.blocks)  # caches released


def test_sampling_is_seeded_and_deterministic(tiny_vae):
    m = lively_tiny()
    kw = {"vqvae": tiny_vae, "cfg": 1.5, "top_k": 50, "top_p": 0.9, "return_logits": True, "decode": False}
    a = m.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=11, **kw)
    b = m.autoregressive_infer_cfg(2, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(11), **kw)
    c = m.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=12, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))
    assert not all(torch.equal(p, q) for p, q in zip(a[1], c[1]))
    d = m.autoregressive_infer_cfg(2, torch.tensor([1, 2]), g_seed=11, temperature_schedule=[1.0] * 6, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a[1], d[1]))


def test_sampler_divides_by_per_scale_temperature(tiny_vae, monkeypatch):
    seen = []
    real = samplers_mod.sample_top_k_top_p

    def spy(logits, top_k, top_p, generator=None, temperature=1.0):
        seen.append(temperature)
        return real(logits, top_k, top_p, generator=generator, temperature=temperature)

    monkeypatch.setattr(samplers_mod, "sample_top_k_top_p", spy)  # module-local (the eager loop), undone by pytest
    m = lively_tiny()
    temps = temperature_schedule(6, "step", temp_high=1.0, temp_low=0.8, switch_scale=4)
    m.autoregressive_infer_cfg(2, 3, vqvae=tiny_vae, g_seed=0, temperature_schedule=temps, decode=False)
    assert seen == [1.0, 1.0, 1.0, 1.0, 0.8, 0.8]


def test_bf16_autocast_returns_fp32_logits():
    m = lively_tiny()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.tensor([1, 2]), torch.randn(2, m.L - 1, m.Cvae), prog_si=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_presets():
    assert set(VAR_PRESETS) >= {"d16", "d20", "d24", "d30", "tiny"}
    t = build_var("tiny")
    assert t.patch_nums == (1, 2, 3, 4, 6, 8) and t.V == 512 and t.Cvae == 16 and t.L == 130
    assert _n(t) < 10_000_000


# ----------------------------------------------------------------------------- CUDA (skipped on CPU CI)
def _bench(fn, warmup=2, iters=5):
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_d16_kv_cache_and_fused_sdpa():
    """fp32 KV-cache sampling == teacher forcing and the masked bf16 path runs on a fused SDPA kernel. The bs-64
    train/sample/encode timings and peak memory are only printed (for the log), not asserted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, B = "cuda", 64
    torch.manual_seed(0)
    with torch.device(dev):
        var = VAR(depth=16, cond_drop_rate=0.0)
        vae = build_vqvae().eval()
    var.init_weights(init_head=1.0, aln_gamma=0.5)
    var.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:  # fp32: cached sampling logits == teacher forcing on the sampled tokens
        lab = torch.arange(4, device=dev)
        _, idx, raw = var.autoregressive_infer_cfg(4, lab, vqvae=vae, g_seed=0, return_logits=True, decode=False)
        with torch.no_grad():
            tf = var(torch.cat((lab, torch.full_like(lab, 1000))), vae.idx_to_var_input(idx).repeat(2, 1, 1))
        err = (torch.cat(raw, 1) - tf).abs().max().item()
        print(f"\n[cuda d16] fp32 kv-cache vs teacher forcing max|diff| = {err:.2e} (logit std {tf.std():.3f})")
        assert err < 2e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    var.init_weights(**var.init_cfg)
    x, lab = torch.randn(B, 679, 32, device=dev), torch.randint(0, 1000, (B,), device=dev)
    tgt = torch.randint(0, 4096, (B, 680), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        for ed_si in (7, 9):  # the masked training path must not fall back to the math kernel
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                assert torch.isfinite(var(lab, x, prog_si=ed_si)).all()
    var.train()
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, fused=True)

    def step(si):
        ed = var.begin_ends[si][1]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(var(lab, x, prog_si=si).view(-1, 4096), tgt[:, :ed].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t680, t255 = _bench(lambda: step(9)), _bench(lambda: step(7))
    mem = torch.cuda.max_memory_allocated() / 2**30
    var.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        t_s = _bench(lambda: var.autoregressive_infer_cfg(B, lab, vqvae=vae, g_seed=0), warmup=1, iters=3)
        img = torch.rand(B, 3, 256, 256, device=dev) * 2 - 1
        t_e = _bench(lambda: vae.img_to_idx(img), warmup=1, iters=3)
    print(f"[cuda d16 bs{B} {torch.cuda.get_device_name()}] train 680 tok {t680 * 1e3:.1f} ms ({B / t680:.0f} img/s), "
          f"255 tok {t255 * 1e3:.1f} ms ({B / t255:.0f} img/s), peak {mem:.1f} GiB; CFG sampling {t_s:.3f} s "
          f"({B / t_s:.0f} img/s); VQVAE encode {B / t_e:.0f} img/s")
