"""Length modes on the CoT segment (spec §3.2, §8.5–8.8; issue 17 acceptance 2)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.common.rollouts import group_advantages
from ctrlgen.lightning_modules.shortcoti.grpo import t2i_r1_loss
from ctrlgen.lightning_modules.shortcoti.length import (
    LengthConfig,
    apply_length_mode,
    cap_cot,
    cap_max_new_tokens,
    cot_lengths,
    difficulty_weight,
    easiness,
    ema_easiness,
    hit_token_limit,
    length_reward,
    shape_fn,
)

PAD, EOS = 0, 2
PIECES = {3: " a", 4: " big", 5: " cube", 6: "s", 7: " on", 8: " the", 9: " left", 10: " w"}


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids if i in PIECES)


def _rows(token_rows: list[list[int]], with_eos: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded CoT ids and masks, the mask covering the first EOS."""
    T = max(len(r) for r in token_rows) + 1
    ids = torch.full((len(token_rows), T), PAD)
    mask = torch.zeros(len(token_rows), T, dtype=torch.long)
    for i, (r, e) in enumerate(zip(token_rows, with_eos)):
        row = r + ([EOS] if e else [])
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def _words(n: int) -> list[int]:
    return [10] * n  # " w" n times: n words, n tokens


def test_word_and_token_counts_follow_their_definitions():
    ids, mask = _rows([[3, 4, 5, 6], [7], []], [True, False, True])
    texts = [decode(r) for r in ([3, 4, 5, 6], [7], [])]
    counts = cot_lengths(texts, ids, mask, EOS, "words")
    assert counts["words"].tolist() == [3.0, 1.0, 0.0]  # " a big cubes": "s" continues a word
    assert counts["tokens"].tolist() == [4.0, 1.0, 0.0]  # EOS excluded
    assert torch.equal(counts["length"], counts["words"])
    assert torch.equal(cot_lengths(texts, ids, mask, EOS, "tokens")["length"], counts["tokens"])


def test_token_limit_rule_reads_the_cot_only():
    ids, mask = _rows([[3, 4], [3, 4, 5]], [True, False])
    assert hit_token_limit(ids, mask, EOS).tolist() == [False, True]


def test_cap_tokens_masks_everything_past_the_cut():
    rows = [[3, 4, 5, 6, 7], [3, 4], [3, 4, 5]]
    ids, mask = _rows(rows, [True, True, False])
    cut = cap_cot(ids, mask, LengthConfig(mode="cap", unit="tokens", cap=3), EOS, decode)
    assert cut["capped"].tolist() == [True, False, False]
    assert cut["kept"].tolist() == [3, 2, 3]
    assert cut["mask"][0].tolist() == [1, 1, 1, 0, 0, 0]  # dropped tokens and the EOS get mask 0
    assert torch.equal(cut["mask"][1:], mask[1:])  # CoTs within the cap are untouched
    assert cut["texts"] == [" a big cube", " a big", " a big cube"]


def test_cap_words_cuts_at_a_word_boundary_and_no_longer_cot_reaches_the_image_prompt():
    rows = [[3, 4, 5, 6, 7, 8, 9], [3, 5, 6], _words(9)]
    ids, mask = _rows(rows, [True, True, False])
    cfg = LengthConfig(mode="cap", unit="words", cap=3)
    cut = cap_cot(ids, mask, cfg, EOS, decode)
    assert cut["texts"][0] == " a big cubes"  # the continuation "s" stays with its word
    assert cut["kept"].tolist() == [4, 3, 3]
    assert cut["capped"].tolist() == [True, False, True]
    assert all(len(t.split()) <= cfg.cap for t in cut["texts"])
    assert cut["mask"].sum(1).tolist() == [4, 4, 3]  # row 1 keeps its EOS


def test_cap_token_budget():
    assert cap_max_new_tokens(LengthConfig(unit="words", cap=40, tokens_per_word_max=2.0)) == 80
    assert cap_max_new_tokens(LengthConfig(unit="tokens", cap=40)) == 41


def test_target_hinge_is_zero_up_to_the_target_with_slope_alpha_over_target_above():
    cfg = LengthConfig(mode="target", alpha=0.5, target=40)
    L = torch.tensor([0.0, 20.0, 40.0, 50.0, 80.0])
    r = length_reward(cfg, L)["reward"]
    assert r[:3].abs().max() == 0
    assert torch.allclose(r[3:], torch.tensor([-0.5 * 10 / 40, -0.5 * 40 / 40], dtype=torch.float64))
    assert torch.allclose(shape_fn(L, LengthConfig(shape="linear", target=40)), L.double() / 40)
    sig = shape_fn(torch.tensor([40.0, 50.0]), LengthConfig(shape="sigmoid", target=40, tau=10))
    assert torch.allclose(sig, torch.sigmoid(torch.tensor([0.0, 1.0], dtype=torch.float64)))


def test_difficulty_weight_is_monotone_and_bounded():
    cfg = LengthConfig(w_min=0.25, w_max=1.0, gamma=2.0)
    w = difficulty_weight(torch.linspace(0, 1, 11), cfg)
    assert (w[1:] > w[:-1]).all() and w[0] == 0.25 and w[-1] == 1.0


def test_easiness_uses_active_rewards_only_without_gradient():
    G = 2
    hps = torch.tensor([0.35, 0.35, 0.20, 0.20], requires_grad=True)  # group 0 easy, group 1 hard on HPS
    git = torch.tensor([0.0, 0.0, 1.0, 1.0])  # GIT is inactive on group 0 (e.g. a spatial prompt)
    active = {"git": torch.tensor([False, False, True, True])}
    e = easiness({"hps": hps, "git": git}, G, LengthConfig().ranges, active)
    assert not e.requires_grad
    assert torch.allclose(e, torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64))
    r = length_reward(LengthConfig(mode="adaptive"), torch.full((4,), 60.0), G, {"hps": hps, "git": git}, active)
    assert not r["reward"].requires_grad
    assert r["reward"][0] < r["reward"][2] < 0  # the easier prompt gets the stronger penalty
    with pytest.raises(ValueError, match="no active quality reward"):
        easiness({"git": git}, G, LengthConfig().ranges, active)
    with pytest.raises(ValueError, match="length.ranges has no"):
        easiness({"clip": git}, G, LengthConfig().ranges)


def test_constant_length_in_a_group_makes_the_weight_irrelevant_to_advantages():
    G = 4
    quality = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.2, 0.2, 0.8, 0.4], dtype=torch.float64)
    L = torch.tensor([60.0] * 4 + [90.0] * 4)
    cfg = LengthConfig(mode="adaptive")
    advantages = []
    for e in (0.0, 1.0):
        r = length_reward(cfg, L, G, easiness_override=torch.full((8,), e, dtype=torch.float64))["reward"]
        assert r.abs().min() > 0
        advantages.append(group_advantages(quality + r, G))
    assert torch.allclose(*advantages, atol=1e-12)


MODES = {
    "cap": LengthConfig(mode="cap", unit="words", cap=40, cap_penalty=0.5),
    "target_hinge": LengthConfig(mode="target", shape="hinge"),
    "target_linear": LengthConfig(mode="target", shape="linear"),
    "target_sigmoid": LengthConfig(mode="target", shape="sigmoid"),
    "adaptive": LengthConfig(mode="adaptive"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_with_equal_quality_the_shortest_cot_gets_the_largest_advantage(mode):
    cfg = MODES[mode]
    lengths = [30, 55, 70, 95] if mode == "cap" else [45, 55, 70, 95]
    rows = [_words(n) for n in lengths]
    ids, mask = _rows(rows, [True] * 4)
    quality = {"hps": torch.full((4,), 0.3, dtype=torch.float64), "orm": torch.full((4,), 0.6, dtype=torch.float64)}
    out = apply_length_mode(cfg, ids, mask, [decode(r) for r in rows], EOS, decode, G=4, quality=quality)
    a = group_advantages(quality["hps"] + quality["orm"] + out["reward"], 4)
    assert a.argmax() == 0 and a[0] > a[-1] + 0.1


@pytest.mark.parametrize("mode", list(MODES))
def test_no_length_rule_touches_image_tokens(mode):
    """Cap and penalties act through the CoT segment only: in the joint [CoT | image] row every image token keeps
    mask 1 and its gradient, dropped CoT tokens get neither gradient nor KL."""
    cfg = MODES[mode]
    rows = [_words(20), _words(60), _words(45)]
    ids, mask = _rows(rows, [True, True, False])
    out = apply_length_mode(cfg, ids, mask, [decode(r) for r in rows], EOS, decode, G=3,
                            quality={"orm": torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)})
    n_image = 16
    image_mask = torch.ones(3, n_image)
    adv = group_advantages(torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64) + out["reward"], 3)
    cot_logp = (-torch.rand(*ids.shape, dtype=torch.float64)).requires_grad_()
    img_logp = (-torch.rand(3, n_image, dtype=torch.float64)).requires_grad_()
    ref = cot_logp.detach() + 0.5, img_logp.detach() + 0.5
    loss, _ = t2i_r1_loss(cot_logp, out["mask"], img_logp, image_mask, adv, *ref)
    g_cot, g_img = torch.autograd.grad(loss, (cot_logp, img_logp))
    assert (g_img != 0).all()
    assert (g_cot[out["mask"] == 0] == 0).all()
    if mode == "cap":
        assert out["capped"].tolist() == [False, True, True]
        assert out["mask"][1].sum() == 40 and out["words"].max() == 40
    else:
        assert not out["capped"].any() and torch.equal(out["mask"], mask)


def test_ema_easiness():
    first = ema_easiness(None, torch.tensor([0.4]))
    assert torch.allclose(ema_easiness(first, torch.tensor([1.0]), 0.75), torch.tensor([0.55], dtype=torch.float64))
    with pytest.raises(ValueError, match="momentum"):
        ema_easiness(first, first, 1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="length.mode"):
        LengthConfig(mode="soft")
    with pytest.raises(ValueError, match="w_min"):
        LengthConfig(w_min=0.9, w_max=0.5)
    with pytest.raises(ValueError, match="length.ranges.hps"):
        LengthConfig(ranges={"hps": (0.3, 0.2)})
    with pytest.raises(ValueError, match="length.difficulty_source"):
        LengthConfig(difficulty_source="oracle")
    with pytest.raises(ValueError, match="needs easiness_override"):
        length_reward(LengthConfig(mode="adaptive", difficulty_source="ema"), torch.ones(2), 2,
                      {"orm": torch.ones(2)})
    with pytest.raises(ValueError, match="needs decode"):
        apply_length_mode(LengthConfig(mode="cap"), *_rows([[3]], [True]), [" a"], EOS)
