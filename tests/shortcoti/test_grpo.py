"""GRPO maths without TRL: advantages, log-prob gathering, the μ = 1 identity, accumulation (spec §8.1–8.4)."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.common.rollouts import group_advantages
from ctrlgen.lightning_modules.shortcoti.grpo import (
    LossConfig,
    completion_logprobs,
    concat_segments,
    grpo_loss,
    k3_kl,
    reduce_loss,
    t2i_r1_loss,
    token_entropy,
    token_logprobs,
)

G = 4


def _rewards(seed: int = 0, groups: int = 3) -> torch.Tensor:
    return torch.randn(groups * G, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "none"])
def test_per_group_constant_shift_leaves_advantages_unchanged(scale):
    r = _rewards()
    shift = torch.tensor([3.0, -7.5, 0.25], dtype=torch.float64).repeat_interleave(G)
    a, b = group_advantages(r, G, scale), group_advantages(r + shift, G, scale)
    assert torch.allclose(a, b, atol=1e-12) and a.abs().max() > 0.1


def test_batch_scale_is_shift_invariant_for_a_batch_wide_constant_only():
    """``scale="batch"`` divides by the std of the raw batch (TRL): one constant for all groups cancels, different
    per-group constants change that std."""
    r = _rewards()
    a = group_advantages(r, G, "batch")
    assert torch.allclose(a, group_advantages(r + 4.0, G, "batch"), atol=1e-12)
    shift = torch.tensor([3.0, -7.5, 0.25], dtype=torch.float64).repeat_interleave(G)
    assert not torch.allclose(a, group_advantages(r + shift, G, "batch"), atol=1e-3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_gets_zero_advantage(scale):
    r = _rewards()
    r[G:2 * G] = 0.3  # group 1: identical rewards
    a = group_advantages(r, G, scale)
    assert torch.isfinite(a).all()
    assert a[G:2 * G].abs().max() < 1e-9
    assert a[:G].abs().max() > 0.1


def test_group_scale_formula():
    r = _rewards()
    g = r.view(-1, G)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=True, keepdim=True) + 1e-4)).flatten()
    assert torch.allclose(group_advantages(r, G, "group"), expected, atol=1e-12)


def test_token_logprobs_with_temperature_and_half_precision():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 5), generator=gen)
    expected = (logits / 0.7).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, ids, 0.7), expected, atol=1e-12)
    half = token_logprobs(logits.to(torch.bfloat16), ids)
    assert half.dtype == torch.float32
    assert torch.allclose(half.double(), logits.to(torch.bfloat16).double().log_softmax(-1).gather(
        -1, ids[..., None])[..., 0], atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, ids, 0.0)


def test_completion_logprobs_reads_the_positions_before_each_token():
    """Completion token j of a causal forward over [prompt (P); completion (C)] is scored by position P − 1 + j."""
    P, C, V = 3, 4, 6
    logits = torch.full((1, P + C, V), -20.0, dtype=torch.float64)
    completion = torch.tensor([[5, 1, 4, 2]])
    for j in range(C):
        logits[0, P - 1 + j, completion[0, j]] = 20.0  # near-certain at the right positions only
    lp = completion_logprobs(logits, completion)
    assert lp.shape == (1, C) and lp.max() <= 0 and lp.min() > -1e-10


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    x = torch.randn(50, dtype=torch.float64)
    y = x + torch.randn(50, dtype=torch.float64)
    assert (k3_kl(x, y) >= 0).all() and k3_kl(x, x).abs().max() == 0
    assert torch.allclose(k3_kl(x, y), torch.exp(y - x) - (y - x) - 1)


def test_token_entropy_of_uniform_logits():
    assert torch.allclose(token_entropy(torch.zeros(2, 3, 8)), torch.full((2, 3), torch.log(torch.tensor(8.0))))


def test_mu_one_bnpo_value_and_gradient_identity():
    """μ = 1 (old = logp.detach()): loss = −Σ_i A_i n_i / Σ_i n_i + β·token-mean KL, gradient = that of
    −A·logp token-mean plus β·KL token-mean (spec §8.3)."""
    gen = torch.Generator().manual_seed(2)
    logp = (-3 * torch.rand(4, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = logp.detach() + 0.2 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 4, 1])[:, None]).double()
    adv = torch.tensor([1.5, -0.5, 0.25, -1.0], dtype=torch.float64)
    beta = 0.01
    loss, metrics = grpo_loss(logp, mask, adv, LossConfig(type="bnpo", beta=beta), ref_logp=ref)
    n = mask.sum(1)
    kl_mean = (k3_kl(logp, ref) * mask).sum() / mask.sum()
    assert torch.allclose(loss, -(adv * n).sum() / n.sum() + beta * kl_mean, atol=1e-12)
    assert torch.allclose(metrics["kl"], kl_mean.detach())
    surrogate = (-(adv[:, None] * logp) * mask).sum() / mask.sum() + beta * kl_mean
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(surrogate, logp)[0], atol=1e-12)


def test_dapo_over_an_accumulation_window_is_the_window_token_mean():
    """With the generation batch spanning the window (steps_per_generation = GA), the summed dapo losses of the
    micro-batches equal Σ ℓm / Σ m over the whole window (one process), unlike bnpo's mean of micro-batch means."""
    gen = torch.Generator().manual_seed(5)
    losses = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    masks = [(torch.arange(5)[None] < torch.tensor(lens)[:, None]).double() for lens in ([5, 1, 2], [4, 4, 3])]
    n = sum(m.sum() for m in masks)
    dapo = sum(reduce_loss(x, m, "dapo", 2, num_items=n, steps_per_generation=2) for x, m in zip(losses, masks))
    window_mean = sum((x * m).sum() for x, m in zip(losses, masks)) / n
    bnpo = sum(reduce_loss(x, m, "bnpo", 2) for x, m in zip(losses, masks))
    assert torch.allclose(dapo, window_mean, atol=1e-12)
    assert abs(bnpo - window_mean) > 1e-3


def test_dapo_equals_bnpo_for_one_micro_batch():
    x = torch.randn(3, 5, dtype=torch.float64)
    m = (torch.arange(5)[None] < torch.tensor([5, 1, 2])[:, None]).double()
    assert torch.allclose(reduce_loss(x, m, "dapo"), reduce_loss(x, m, "bnpo"), atol=1e-12)


def test_t2i_r1_mode_is_one_token_mean_over_both_segments_with_one_advantage_per_row():
    gen = torch.Generator().manual_seed(4)
    cot = (-torch.rand(2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    img = (-torch.rand(2, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    cot_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, _ = t2i_r1_loss(cot, cot_mask, img, torch.ones(2, 5), adv, cot.detach(), img.detach())
    assert torch.allclose(loss, -(2.0 * 7 - 1.0 * 6) / 13 * torch.ones((), dtype=torch.float64))
    g_img = torch.autograd.grad(loss, img)[0]
    assert torch.allclose(g_img, -adv[:, None].expand(2, 5) / 13)  # every image token, the row's advantage


def test_config_and_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="max_completion_length"):
        LossConfig(type="dr_grpo")
    with pytest.raises(ValueError, match="loss.type"):
        LossConfig(type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2), LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="every segment or none"):
        concat_segments(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="same shape"):
        grpo_loss(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2), LossConfig(beta=0.0))
