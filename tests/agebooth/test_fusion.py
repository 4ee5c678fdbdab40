"""Fusion math (agebooth/fusion.py, agebooth/prompts.py) on random LoRA factors: endpoints, same-LoRA invariance,
ranks, linearity, SVDMix's gauge dependence, peft's merges, prompt-embedding fusion (agebooth.md §5, §6, §14)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.agebooth import fusion
from ctrlgen.lightning_modules.agebooth.prompts import fuse_prompt_embeds
from ctrlgen.lightning_modules.common.lora import LoraFactors

SHAPES = {"attn1.to_q": (48, 40), "attn2.to_k": (48, 24)}  # (out, in), two layers
R = 4



def _lora(seed: int, scale: float = 1.0, r: int = R) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {p: LoraFactors(torch.randn(r, i, generator=g) / r, torch.randn(o, r, generator=g), scale)
            for p, (o, i) in SHAPES.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _hand(young, old, alpha):
    return {p: alpha * young[p].delta() + (1 - alpha) * old[p].delta() for p in young}


# ---------------------------------------------------------------------------------------------------- endpoints
def test_endpoints_are_exact_for_linear_and_within_1e5_for_svdmix():
    y, o = _lora(0, scale=2.0), _lora(1)
    for a, ref in ((1.0, y), (0.0, o)):
        lin = fusion.linear_fusion(y, o, a)
        assert all(torch.equal(lin[p].delta(), ref[p].delta()) for p in SHAPES)
        mix = fusion.svdmix(y, o, a)
        assert all(_rel(mix[p].delta(), ref[p].delta()) <= 1e-5 for p in SHAPES)
        assert all(mix[p].down.dtype == torch.float32 for p in SHAPES)


def test_weight_zero_lora_contributes_nothing():
    y, o = _lora(0), _lora(1)
    broken = {p: LoraFactors(torch.full_like(f.down, float("nan")), f.up, 1.0) for p, f in o.items()}
    lin = fusion.linear_fusion(y, broken, 1.0)
    assert all(torch.equal(lin[p].delta(), y[p].delta()) for p in SHAPES)


def test_same_lora_is_invariant_under_every_mode():
    lora = _lora(3, scale=0.5)
    for a in (0.2, 0.5, 0.9):
        for mode in fusion.MODES:
            out = fusion.fuse(lora, lora, a, mode)
            assert all(_rel(out[p].delta(), lora[p].delta()) < 1e-5 for p in SHAPES), (mode, a)


# ------------------------------------------------------------------------------------------ linearity and ranks
def test_linear_equals_hand_added_deltas_and_is_affine_in_alpha():
    y, o = _lora(0, scale=2.0), _lora(1, scale=0.5)
    ends = {a: fusion.linear_fusion(y, o, a) for a in (0.0, 1.0)}
    for a in (0.25, 0.5, 0.8):
        lin = fusion.linear_fusion(y, o, a)
        for p, ref in _hand(y, o, a).items():
            assert (lin[p].delta() - ref).abs().max() <= 1e-6
            affine = a * ends[1.0][p].delta() + (1 - a) * ends[0.0][p].delta()
            assert (lin[p].delta() - affine).abs().max() <= 1e-6


def test_svdmix_is_not_linear_in_alpha():
    y, o = _lora(0), _lora(1)
    mix, hand = fusion.svdmix(y, o, 0.5), _hand(y, o, 0.5)
    assert all(_rel(mix[p].delta(), hand[p]) > 0.3 for p in SHAPES)


def test_rank_bounds():
    y, o = _lora(0), _lora(1)
    lin, mix = fusion.linear_fusion(y, o, 0.4), fusion.svdmix(y, o, 0.4)
    for p in SHAPES:
        assert lin[p].rank == 2 * R and torch.linalg.matrix_rank(lin[p].delta()) == 2 * R
        assert mix[p].rank == R and torch.linalg.matrix_rank(mix[p].delta()) <= R
    for k in (R, 2 * R):
        svd = fusion.peft_fusion(y, o, 0.4, "svd", svd_rank=k)
        hand = _hand(y, o, 0.4)
        for p in SHAPES:
            assert svd[p].rank == k
            err = _rel(svd[p].delta(), hand[p])
            assert (err < 1e-5) if k == 2 * R else (err > 0.1), (k, err)


def test_peft_cat_is_exact_and_peft_linear_has_cross_terms():
    y, o = _lora(0, scale=2.0), _lora(1)
    hand = _hand(y, o, 0.5)
    cat, lin = fusion.peft_fusion(y, o, 0.5, "cat"), fusion.peft_fusion(y, o, 0.5, "linear")
    ours = fusion.linear_fusion(y, o, 0.5)
    for p in SHAPES:
        assert (cat[p].delta() - hand[p]).abs().max() <= 1e-6
        assert (cat[p].delta() - ours[p].delta()).abs().max() <= 1e-6
        assert _rel(lin[p].delta(), hand[p]) > 0.5


def test_peft_svd_default_rank_is_max_r():
    out = fusion.fuse(_lora(0), _lora(1, r=2), 0.5, "peft_svd")
    assert {f.rank for f in out.values()} == {R}


# ----------------------------------------------------------------------------------------------------- gauge
def test_svdmix_depends_on_the_factor_gauge_and_linear_does_not():
    lora = _lora(5)
    neg = {p: LoraFactors(-f.down, -f.up, 1.0) for p, f in lora.items()}
    for p in SHAPES:
        assert fusion.svdmix(lora, neg, 0.5)[p].delta().abs().max() <= 1e-6 * lora[p].delta().abs().max()
        assert _rel(fusion.linear_fusion(lora, neg, 0.5)[p].delta(), lora[p].delta()) < 1e-6
    q = torch.linalg.qr(torch.randn(R, R, generator=torch.Generator().manual_seed(9)))[0]
    rotated = {p: LoraFactors(q.T @ f.down, f.up @ q, 1.0) for p, f in lora.items()}
    for p in SHAPES:
        assert _rel(rotated[p].delta(), lora[p].delta()) < 1e-5  # same ΔW, other factors
        assert _rel(fusion.svdmix(lora, rotated, 0.5)[p].delta(), lora[p].delta()) > 0.05
        assert _rel(fusion.linear_fusion(lora, rotated, 0.5)[p].delta(), lora[p].delta()) < 1e-5


def test_sign_fix_removes_the_svd_backends_sign_choice(monkeypatch):
    y, o = _lora(0), _lora(1)
    plain = {s: fusion.svdmix(y, o, 0.3, sign_fix=s) for s in fusion.SIGN_FIXES}
    true_svd = fusion._svd

    calls = []

    def flipped(x):  # another solver: the old LoRA's SVDs (calls after the young one's) flip every second pair
        calls.append(1)
        u, s, vh = true_svd(x)
        sign = torch.ones(s.shape, dtype=u.dtype)
        if len(calls) > 2 * len(SHAPES):
            sign[::2] = -1
        return u * sign, s, vh * sign[:, None]

    monkeypatch.setattr(fusion, "_svd", flipped)
    other = {}
    for fix in fusion.SIGN_FIXES:
        calls.clear()
        other[fix] = fusion.svdmix(y, o, 0.3, sign_fix=fix)
    for p in SHAPES:
        assert _rel(other["none"][p].delta(), plain["none"][p].delta()) > 0.05
        assert _rel(other["max_abs_positive"][p].delta(), plain["max_abs_positive"][p].delta()) < 1e-6
    svd = fusion.factor_svd(y["attn1.to_q"], sign_fix="max_abs_positive")  # each factor is unchanged
    assert _rel(((svd.U * svd.S) @ svd.V).float(), y["attn1.to_q"].down) < 1e-6


def test_cached_svds_give_the_same_mix():
    y, o = _lora(0), _lora(1)
    svds = (fusion.factor_svds(y), fusion.factor_svds(o))
    a, b = fusion.svdmix(y, o, 0.6, svds=svds), fusion.svdmix(y, o, 0.6)
    assert all(torch.equal(a[p].down, b[p].down) and torch.equal(a[p].up, b[p].up) for p in SHAPES)


# ----------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    y = _lora(0)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        fusion.linear_fusion(y, _lora(1), 1.5)
    with pytest.raises(KeyError, match="different layers"):
        fusion.svdmix(y, {"attn1.to_q": y["attn1.to_q"]}, 0.5)
    with pytest.raises(ValueError, match="equal ranks"):
        fusion.svdmix(y, _lora(1, r=2), 0.5)
    with pytest.raises(ValueError, match="unknown"):
        fusion.fuse(y, y, 0.5, "svd")


# ---------------------------------------------------------------------------------------------- prompt fusion
def _encoding(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(2, 77, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 20, generator=g),
            "negative_prompt_embeds": torch.randn(2, 77, 32, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(2, 20, generator=g)}


def test_prompt_fusion_blends_embeds_and_pooled_but_not_negatives():
    y, o = _encoding(0), _encoding(1)
    for a in (0.0, 0.3, 1.0):
        out = fuse_prompt_embeds(y, o, a)
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            assert torch.allclose(out[key], a * y[key] + (1 - a) * o[key], atol=1e-7, rtol=0)
        for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            assert out[key] is y[key]
    assert all(torch.equal(fuse_prompt_embeds(y, o, 1.0)[k], y[k]) for k in y)
    zero = fuse_prompt_embeds(y, o, 0.0)
    assert torch.equal(zero["prompt_embeds"], o["prompt_embeds"])
    assert torch.equal(zero["pooled_prompt_embeds"], o["pooled_prompt_embeds"])


def test_prompt_fusion_blends_each_text_encoder_of_a_sequence():
    y = {"prompt_embeds": (torch.ones(1, 4, 8), torch.zeros(1, 4, 12))}
    o = {"prompt_embeds": (torch.zeros(1, 4, 8), torch.ones(1, 4, 12))}
    out = fuse_prompt_embeds(y, o, 0.25)["prompt_embeds"]
    assert isinstance(out, tuple) and torch.all(out[0] == 0.25) and torch.all(out[1] == 0.75)


def test_prompt_fusion_errors_name_the_key():
    y, o = _encoding(0), _encoding(1)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        fuse_prompt_embeds(y, {**o, "pooled_prompt_embeds": torch.zeros(2, 21)}, 0.5)
    with pytest.raises(KeyError, match="lacks 'pooled_prompt_embeds'"):
        fuse_prompt_embeds(y, {"prompt_embeds": o["prompt_embeds"]}, 0.5)
