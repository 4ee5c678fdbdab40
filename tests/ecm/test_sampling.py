"""Sampling maths (spec §2.3, §2.4, §3.7, §8 check 11)."""
import itertools
import re
from collections import Counter

import pytest
import torch

from ctrlgen.lightning_modules.ecm import sampling as S
from ctrlgen.lightning_modules.ecm.sampling import (
    cfg_mix,
    cfg_ratio,
    draw_trunc_scale,
    normalize_trunc_probs,
    sample_top_k_top_p,
    temperature_schedule,
    top_k_top_p_filter_,
)


def test_cfg_ramp_and_mix():
    assert cfg_ratio(0, 10, 1.5) == 0.0 and cfg_ratio(9, 10, 1.5) == pytest.approx(1.5)
    assert cfg_ratio(3, 10, 4.0) == pytest.approx(4.0 * 3 / 9)
    assert cfg_ratio(0, 1, 2.0) == 0.0
    cond, unc = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    out = cfg_mix(torch.cat((cond, unc)), 0.7)
    assert torch.allclose(out, 1.7 * cond - 0.7 * unc)


def test_temperature_schedules():
    assert temperature_schedule(10, "step") == [1.0] * 8 + [0.8] * 2  # switch at scale 8
    assert temperature_schedule(10, "step", switch_scale=5)[4:6] == [1.0, 0.8]
    lin = temperature_schedule(10, "linear")
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.8) and all(a > b for a, b in itertools.pairwise(lin))
    assert temperature_schedule(4, "const", temp_high=0.9) == [0.9] * 4
    with pytest.raises(ValueError, match=re.escape("unknown temperature schedule kind 'cosine'")):
        temperature_schedule(4, "cosine")
    with pytest.raises(ValueError, match="temperature schedule has 2 entries, expected 3"):
        S.resolve_temperatures([1.0, 1.0], 3)


def test_top_k_rule():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, -1.0]]])
    out = top_k_top_p_filter_(logits.clone(), top_k=2)
    # keeps every logit ≥ the 2nd largest (ties included)
    assert torch.isfinite(out).tolist() == [[[True, False, True, True, False]]]


def test_top_p_rule_matches_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g)
    p = 0.8
    out = top_k_top_p_filter_(logits.clone(), top_p=p)
    probs = logits.softmax(-1)
    for b in range(3):
        for i in range(4):
            pr = probs[b, i]
            order = pr.argsort()  # ascending
            cum = pr[order].cumsum(0)
            drop = set(order[cum <= 1 - p].tolist()) - {int(pr.argmax())}
            kept = set(torch.isfinite(out[b, i]).nonzero().flatten().tolist())
            assert kept == set(range(50)) - drop
    # the max always survives even with a tiny top_p
    out = top_k_top_p_filter_(logits.clone(), top_p=1e-6)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(3, 4, dtype=torch.long))


def test_temperature_applied_before_top_p():
    # logits [2, 1, 0], top_p 0.5: at T=1 only token 0 survives; at T=10 tokens {0, 1} survive.
    logits = torch.tensor([[[2.0, 1.0, 0.0]]]).expand(1, 4000, 3).contiguous()
    g = torch.Generator().manual_seed(0)
    cold = sample_top_k_top_p(logits, top_p=0.5, generator=g, temperature=1.0)
    hot = sample_top_k_top_p(logits, top_p=0.5, generator=g, temperature=10.0)
    assert set(cold.unique().tolist()) == {0}
    assert set(hot.unique().tolist()) == {0, 1}
    assert torch.equal(logits, torch.tensor([[[2.0, 1.0, 0.0]]]).expand(1, 4000, 3))  # input untouched


def test_seeded_multinomial_is_deterministic():
    logits = torch.randn(2, 30, 100)
    a = sample_top_k_top_p(logits, 20, 0.9, generator=torch.Generator().manual_seed(7))
    b = sample_top_k_top_p(logits, 20, 0.9, generator=torch.Generator().manual_seed(7))
    c = sample_top_k_top_p(logits, 20, 0.9, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 30) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_early_centric_frequencies_and_sync():
    probs = {5: 0.2, 7: 0.6, 9: 0.2}
    n = 20000
    draws = [draw_trunc_scale(probs, seed=123, step=s) for s in range(n)]
    freq = Counter(draws)
    assert set(freq) == {5, 7, 9}
    for k, p in probs.items():
        assert abs(freq[k] / n - p) < 0.015
    # "all ranks draw the same s": the draw depends only on (seed, step)
    assert [draw_trunc_scale(probs, 123, s) for s in range(200)] == draws[:200]
    assert [draw_trunc_scale(probs, 124, s) for s in range(200)] != draws[:200]
    # per-scale training frequency P(s >= k)
    p_ge8 = sum(1 for d in draws if d >= 8) / n
    assert abs(p_ge8 - 0.2) < 0.015


def test_normalize_trunc_probs():
    assert normalize_trunc_probs({"5": 1, "7": 3}) == {5: 0.25, 7: 0.75}
    with pytest.raises(ValueError, match="trunc_probs must be non-negative"):
        normalize_trunc_probs({5: -1.0, 7: 2.0})
    with pytest.raises(ValueError, match=re.escape("trunc_probs keys [12] must lie in [0, 10)")):
        normalize_trunc_probs({12: 1.0}, num_scales=10)
    assert draw_trunc_scale({3: 1.0}, seed=0, step=5) == 3


def test_uniform_labels_draw():
    g = torch.Generator().manual_seed(5)
    lab = S.uniform_labels(64, 10, g)
    assert lab.shape == (64,) and lab.dtype == torch.int64 and 0 <= int(lab.min()) and int(lab.max()) < 10
    assert len(lab.unique()) > 5
    ref = torch.multinomial(torch.full((1, 10), 0.1), 64, replacement=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(lab, ref.view(64))


def test_smooth_tau_schedule():
    assert S.smooth_tau(0, 6) == pytest.approx(0.27)
    assert S.smooth_tau(5, 6) == pytest.approx(0.27 * 0.05)
    assert S.smooth_tau(2, 6) == pytest.approx(0.27 * (1 - 0.4 * 0.95))
    assert S.smooth_tau(0, 1) == pytest.approx(0.27)
    taus = [S.smooth_tau(si, 10) for si in range(10)]
    assert taus == sorted(taus, reverse=True) and min(taus) > 0.005


def test_gumbel_softmax_embed_is_a_seeded_codebook_mixture():
    torch.manual_seed(0)
    logits, book = torch.randn(2, 3, 7), torch.randn(7, 4)
    logits[0, 0, 1:] = float("-inf")  # a filtered row keeps only its survivor
    a = S.gumbel_softmax_embed(logits, book, 1, 4, torch.Generator().manual_seed(3))
    b = S.gumbel_softmax_embed(logits, book, 1, 4, torch.Generator().manual_seed(3))
    c = S.gumbel_softmax_embed(logits, book, 1, 4, torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 4) and torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a[0, 0], book[0])
    g = torch.Generator().manual_seed(3)
    q = torch.empty_like(logits).exponential_(generator=g)
    y = ((logits * (1 + 1 / 3) - q.log()) / S.smooth_tau(1, 4)).softmax(-1)
    torch.testing.assert_close(a, y @ book)


def test_sample_smooth_tokens_equal_plain_sampling():
    torch.manual_seed(1)
    logits, book = torch.randn(2, 5, 16), torch.randn(16, 3)
    idx, h = S.sample_smooth(logits, book, 2, 6, top_k=4, top_p=0.9, generator=torch.Generator().manual_seed(9))
    ref = sample_top_k_top_p(logits, 4, 0.9, generator=torch.Generator().manual_seed(9))
    assert torch.equal(idx, ref) and h.shape == (2, 5, 3)
    idx1, h1 = S.sample_smooth(logits, book, 2, 6, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(idx1, logits.argmax(-1))  # one survivor: the mixture is its codebook vector
    torch.testing.assert_close(h1, book[idx1])
