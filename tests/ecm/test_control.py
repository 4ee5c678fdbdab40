"""ECM control net (spec §2.1–§2.2; §8 checks 2, 7, 8, 9, 12)."""
import re

import pytest
import torch
import torch.nn.functional as F

from ctrlgen.lightning_modules.ecm.control import (
    CONTROL_PRESETS,
    ECMControlNet,
    adapter_positions,
    freeze_backbone,
    per_scale_tokens,
)
from ctrlgen.lightning_modules.ecm.scales import ends_for
from ctrlgen.lightning_modules.ecm.var import VAR, build_var
from ctrlgen.lightning_modules.ecm.vqvae import build_vqvae


def _n(m, trainable_only=False):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def tiny_var(depth=4):
    torch.manual_seed(0)
    v = build_var("tiny", depth=depth, embed_dim=128, num_heads=2)
    v.init_weights(init_head=1.0, aln_gamma=0.5)  # non-negligible logits
    return freeze_backbone(v)


def tiny_ctl(var, gates=None, **kw):
    torch.manual_seed(1)
    c = ECMControlNet(var, **{**CONTROL_PRESETS["tiny"], "every": 2, "offset": 1, **kw}).eval()
    if gates is not None:
        with torch.no_grad():
            c.gates.fill_(gates)
            if c.gate_in is not None:
                c.gate_in.fill_(gates)
    return c


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(2)
    return build_vqvae("tiny").eval()


@pytest.mark.parametrize("depth,count,n_ad", [(16, 58_265_280, 4), (20, 103_084_004, 5), (24, 168_617_232, 6)])
def test_param_counts_meta(depth, count, n_ad):
    with torch.device("meta"):
        var = freeze_backbone(VAR(depth=depth))
        ctl = ECMControlNet(var)
    assert _n(ctl, trainable_only=True) == _n(ctl) == count
    assert len(ctl.adapters) == n_ad and len(ctl.ffns) == 1
    if depth == 16:
        assert ctl.after_blocks == [3, 7, 11, 15]
        assert _n(ctl.cond_encoder) == 7_886_464 and ctl.gates.numel() + ctl.gate_in.numel() == 5_120
        assert _n(ctl.adapters[0]) == 4_197_392 + 6_297_600 and _n(ctl.ffns) == 8_393_728
    # the frozen VAR is not part of the control net (its checkpoint excludes the base)
    assert all(m is not var for m in ctl.modules())
    assert not any(k.startswith(("blocks.", "head", "class_emb", "pos_")) for k in ctl.state_dict())
    assert all(not p.requires_grad for p in var.parameters())


def test_placement_and_knobs():
    assert adapter_positions(16) == [3, 7, 11, 15] and adapter_positions(24)[-1] == 23
    assert adapter_positions(16, after_blocks=[9, 0]) == [0, 9]
    with pytest.raises(ValueError, match=re.escape("invalid adapter positions [4] for depth 4")):
        adapter_positions(4, after_blocks=[4])
    var = tiny_var()
    shared = tiny_ctl(var)
    sep = tiny_ctl(var, share_ffn=False)
    assert len(sep.ffns) == len(sep.adapters) == 2
    assert _n(sep) - _n(shared) == _n(shared.ffns[0])
    scal = tiny_ctl(var, gate_kind="scalar")
    assert scal.gates.shape == (2, 1) and scal.gate_in.shape == (1,)
    assert tiny_ctl(var, inject_input=False).gate_in is None


def test_control_tokens_shapes_and_area_mean():
    var = tiny_var()
    ctl = tiny_ctl(var)
    cond = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        grid = ctl.cond_encoder(cond)
        r = ctl.control_tokens(cond)
    assert grid.shape == (2, 128, 8, 8)
    assert r.shape == (2, var.L, 128)
    toks = per_scale_tokens(grid, var.patch_nums, "area")
    assert [tuple(t.shape) for t in toks] == [(2, p * p, 128) for p in var.patch_nums]
    assert torch.allclose(toks[0][:, 0], grid.mean(dim=(2, 3)), atol=1e-6)  # scale 0 = global mean
    assert torch.equal(toks[-1], grid.flatten(2).transpose(1, 2))
    assert torch.allclose(torch.cat(toks, 1), r)
    for mode in ("bilinear", "bicubic"):
        assert [t.shape[1] for t in per_scale_tokens(grid, var.patch_nums, mode)] == [p * p for p in var.patch_nums]
    with pytest.raises(ValueError, match="condition image"):
        ctl.control_tokens(torch.rand(1, 3, 32, 32))
    typed = tiny_ctl(var, num_condition_types=3)
    assert typed.type_embed is not None and typed.type_embed.num_embeddings == 3
    assert typed.control_tokens(cond, torch.tensor([0, 2])).shape == (2, var.L, 128)
    with pytest.raises(ValueError, match="type_idx is required with a type embedding"):
        typed.control_tokens(cond)


def test_zero_gate_identity_teacher_forcing():
    var = tiny_var()
    ctl = tiny_ctl(var)
    lab, x, cond = torch.tensor([1, 5]), torch.randn(2, var.L - 1, var.Cvae), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = var(lab, x)
        assert torch.equal(ctl(var, lab, x, cond), ref)
        assert torch.equal(ctl(var, lab, x, cond, prog_si=3), var(lab, x, prog_si=3))
        ctl.gates.fill_(0.3)
        assert not torch.allclose(ctl(var, lab, x, cond), ref, atol=1e-3)


def test_zero_gate_identity_sampling(vae):
    var = tiny_var()
    ctl = tiny_ctl(var)
    cond = torch.rand(2, 3, 64, 64)
    kw = {"cfg": 1.5, "top_k": 100, "top_p": 0.95, "g_seed": 5, "return_logits": True}
    a = var.autoregressive_infer_cfg(2, torch.tensor([3, 4]), vqvae=vae, **kw)
    b = ctl.sample(var, vae, 2, torch.tensor([3, 4]), cond, temperature_schedule=[1.0] * 6, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


def test_causality_with_adapters():
    var = tiny_var()
    ctl = tiny_ctl(var, gates=0.5)
    lab, x = torch.tensor([1, 2]), torch.randn(2, var.L - 1, var.Cvae)
    with torch.no_grad():
        r = ctl.control_tokens(torch.rand(2, 3, 64, 64))
        base = ctl(var, lab, x, r=r)
        eds = ends_for(var.patch_nums)
        for k in range(len(eds) - 1):
            r2, x2 = r.clone(), x.clone()
            r2[:, eds[k]:] += torch.randn_like(r2[:, eds[k]:])  # control tokens of scales > k
            x2[:, eds[k] - 1:] += torch.randn_like(x2[:, eds[k] - 1:])  # inputs of scales > k
            out = ctl(var, lab, x2, r=r2)
            assert torch.allclose(out[:, : eds[k]], base[:, : eds[k]], atol=1e-6)
            assert not torch.allclose(out[:, eds[k]:], base[:, eds[k]:], atol=1e-4)
        for si, ed in enumerate(eds):  # truncated forward == prefix of the full forward
            assert torch.allclose(ctl(var, lab, x, r=r, prog_si=si), base[:, :ed], atol=1e-5)


@pytest.mark.parametrize("cfg_control", ["both", "cond_only"])
def test_kv_cache_sampling_matches_teacher_forcing_with_adapters(vae, cfg_control):
    var = tiny_var()
    ctl = tiny_ctl(var, gates=0.7)
    B, lab, cond = 2, torch.tensor([6, 8]), torch.rand(2, 3, 64, 64)
    img, idx, raw = ctl.sample(var, vae, B, lab, cond, cfg_control=cfg_control, cfg=2.0, top_k=100, top_p=0.95,
                               g_seed=9, return_logits=True, temperature_schedule=[1.0, 1.0, 1.0, 0.9, 0.8, 0.8])
    assert img.shape == (B, 3, 64, 64)
    x = vae.idx_to_var_input(idx)
    with torch.no_grad():
        r = ctl.control_tokens(cond)
        lab2, x2 = torch.cat((lab, torch.full_like(lab, var.num_classes))), x.repeat(2, 1, 1)
        both = var(lab2, x2, hook=ctl.make_hook(torch.cat((r, r))))
        # cond_only: control tokens for the B cond rows only; the adapters never see the B null rows
        tf = both if cfg_control == "both" else var(lab2, x2, hook=ctl.make_hook(r, rows_off=B))
        plain = var(lab2, x2)
    cached = torch.cat(raw, 1)
    assert torch.allclose(cached, tf, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(tf[:B], plain[:B], atol=1e-3)  # adapters really active
    if cfg_control == "cond_only":
        assert torch.equal(tf[B:], plain[B:])  # null-class rows: exactly the plain VAR
        assert torch.allclose(tf[:B], both[:B], atol=1e-5, rtol=1e-5)  # cond rows: as with control on every row
    assert all(a.attn.cached_k is None for a in ctl.adapters)


def test_init_modes_and_gradient_reaches_gates_first():
    var = tiny_var()
    ctl = tiny_ctl(var)
    for j, b in enumerate(ctl.after_blocks):
        assert torch.equal(ctl.adapters[j].attn.mat_qkv.weight, var.blocks[b].attn.mat_qkv.weight)
        assert torch.equal(ctl.adapters[j].ada_lin[1].weight, var.blocks[b].ada_lin[1].weight)
    assert torch.equal(ctl.ffns[0].fc1.weight, var.blocks[ctl.after_blocks[0]].ffn.fc1.weight)
    vi = tiny_ctl(var, init="var_init")
    assert not torch.equal(vi.adapters[0].attn.mat_qkv.weight, var.blocks[1].attn.mat_qkv.weight)
    assert torch.all(vi.gates == 0) and torch.all(vi.ffns[0].fc1.bias == 0)
    with pytest.raises(ValueError, match=re.escape("unknown init 'nope' (copy_backbone|var_init)")):
        tiny_ctl(var, init="nope")

    ctl.train()
    lab, x, cond = torch.tensor([1, 2]), torch.randn(2, var.L - 1, var.Cvae), torch.rand(2, 3, 64, 64)
    logits = ctl(var, lab, x, cond)
    F.cross_entropy(logits.reshape(-1, var.V), torch.randint(0, var.V, (2 * var.L,))).backward()
    assert ctl.gates.grad.abs().sum() > 0 and ctl.gate_in.grad.abs().sum() > 0
    assert ctl.adapters[0].attn.mat_qkv.weight.grad.abs().sum() == 0
    assert ctl.cond_encoder.proj.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in var.parameters())  # frozen backbone untouched


def test_eval_forward_deterministic_and_dropout_only_in_training():
    var = tiny_var()
    ctl = tiny_ctl(var, gates=0.5, cond_drop_rate=0.5, control_drop_rate=0.5)
    lab, x, cond = torch.tensor([1, 2, 3]), torch.randn(3, var.L - 1, var.Cvae), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b = ctl(var, lab, x, cond), ctl(var, lab, x, cond)
        assert torch.equal(a, b)
        ctl.train()
        ctl.cond_drop_rate = 1.0
        ctl.control_drop_rate = 0.0
        dropped = ctl(var, lab, x, cond)
        ctl.eval()
        null = ctl(var, torch.full_like(lab, var.num_classes), x, cond)
        # control dropout in training: a dropped row sees zero control tokens r (the adapters still run)
        r = ctl.control_tokens(cond)
        full, no_r = ctl(var, lab, x, r=r), ctl(var, lab, x, r=torch.zeros_like(r))
        ctl.train()
        ctl.cond_drop_rate, ctl.control_drop_rate = 0.0, 1.0
        all_dropped = ctl(var, lab, x, cond)
        ctl.control_drop_rate = 0.5
        torch.manual_seed(3)
        lab8, x8, r8 = lab.repeat(4)[:8], x.repeat(4, 1, 1)[:8], r.repeat(4, 1, 1)[:8]
        mixed = ctl(var, lab8, x8, r=r8)
        full8, no_r8 = full.repeat(4, 1, 1)[:8], no_r.repeat(4, 1, 1)[:8]
        ctl.eval()
    assert torch.allclose(dropped, null, atol=1e-6)
    assert not torch.allclose(full, no_r, atol=1e-3)  # zeroing r is visible with gates 0.5
    assert torch.allclose(all_dropped, no_r, atol=1e-6)
    row_dropped = [bool(torch.allclose(m, n, atol=1e-6)) for m, n in zip(mixed, no_r8)]
    row_kept = [bool(torch.allclose(m, f, atol=1e-6)) for m, f in zip(mixed, full8)]
    assert all(d != k for d, k in zip(row_dropped, row_kept)), (row_dropped, row_kept)  # per-row: dropped xor kept
    assert any(row_dropped) and any(row_kept), row_dropped  # rate 0.5 with seed 3 drops some of the 8 rows


def test_bf16_autocast_forward_and_sampling(vae):
    var = tiny_var(depth=2)
    ctl = tiny_ctl(var, gates=0.5)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ctl(var, torch.tensor([1, 2]), torch.randn(2, var.L - 1, var.Cvae), cond, prog_si=4)
        img = ctl.sample(var, vae, 2, torch.tensor([1, 2]), cond, g_seed=0, top_k=50, top_p=0.9)
    assert logits.dtype == torch.float32 and logits.shape == (2, 66, var.V) and torch.isfinite(logits).all()
    assert img.dtype == torch.float32 and img.shape == (2, 3, 64, 64) and 0 <= img.min() <= img.max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ecm_d16_kv_cache_and_train_step():
    """bf16 KV-cache sampling with control ≈ teacher forcing, and bs-64 train steps leave the frozen VAR without
    grads. The step timings and peak memory are only printed (for the log), not asserted."""
    import time

    dev, B = "cuda", 64
    torch.manual_seed(0)
    with torch.device(dev):
        var = freeze_backbone(VAR(depth=16, cond_drop_rate=0.0))
        vae = build_vqvae().eval()
        ctl = ECMControlNet(var)
    with torch.no_grad():
        ctl.gates.fill_(0.5)
        ctl.gate_in.fill_(0.5)
    ctl.eval()
    cond = torch.rand(4, 3, 256, 256, device=dev) * 2 - 1
    lab = torch.arange(4, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, idx, raw = ctl.sample(var, vae, 4, lab, cond, g_seed=0, return_logits=True, decode=False)
        with torch.no_grad():
            r = ctl.control_tokens(cond)
            tf = var(torch.cat((lab, torch.full_like(lab, 1000))), vae.idx_to_var_input(idx).repeat(2, 1, 1),
                     hook=ctl.make_hook(torch.cat((r, r))))
    rel = ((torch.cat(raw, 1) - tf).norm() / tf.norm()).item()
    print(f"\n[cuda ecm d16] bf16 kv-cache vs teacher forcing rel. error {rel:.2e}")
    assert rel < 5e-2
    ctl.train()
    opt = torch.optim.AdamW(ctl.parameters(), lr=1e-4, fused=True)
    x, labB = torch.randn(B, 679, 32, device=dev), torch.randint(0, 1000, (B,), device=dev)
    condB, tgt = torch.rand(B, 3, 256, 256, device=dev), torch.randint(0, 4096, (B, 680), device=dev)

    def step(si):
        ed = var.begin_ends[si][1]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = ctl(var, labB, x, condB, prog_si=si)
            loss = F.cross_entropy(logits.view(-1, 4096), tgt[:, :ed].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for si in (9, 7):
        for _ in range(2):
            step(si)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            step(si)
        torch.cuda.synchronize()
        out[si] = (time.perf_counter() - t) / 5
    print(f"[cuda ecm d16 bs{B}] train 680 tok {out[9] * 1e3:.1f} ms, 255 tok {out[7] * 1e3:.1f} ms, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert all(p.grad is None for p in var.parameters())
