"""Our GRPO loss against trl 1.16.0's own ``GRPOTrainer._compute_loss`` (issue 17 acceptance 1; spec §5, §8.2).

float64 random tensors with ragged masks (one row empty); values and gradients w.r.t. the logits must agree to 1e-6.
"""

from __future__ import annotations

import zlib

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL oracle needs trl==1.16.0 (dev extra: pip install -e '.[dev]')")

from ctrlgen.lightning_modules.shortcoti.grpo import (
    LossConfig,
    completion_logprobs,
    grpo_loss,
    t2i_r1_loss,
)

from tests.shortcoti.trl_oracle import FusedHeadStub, make_trainer, trl_loss

TOL = 1e-6
B, P, C, V = 6, 3, 7, 11
KL_MODES = {"none": (0.0, False), "k3": (0.04, False), "k3_corrected": (0.04, True)}
ACCUMULATION = [(1, 1), (2, 2), (2, 1)]  # (gradient accumulation steps, micro-batches per generation batch)


def test_trl_version_is_the_pinned_one():
    assert trl.__version__ == "1.16.0", f"the oracle is written against trl 1.16.0, found {trl.__version__}"


def _micro_batch(gen: torch.Generator, C: int = C, off_policy: bool = False, beta: float = 0.0):
    logits = (2 * torch.randn(B, P + C, V, generator=gen, dtype=torch.float64)).requires_grad_()
    prompt_ids = torch.randint(0, V, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    completion_ids = torch.randint(0, V, (B, C), generator=gen)
    lengths = torch.randint(1, C + 1, (B,), generator=gen)
    lengths[1] = 0  # an empty completion
    lengths[2] = C
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    advantages = torch.randn(B, generator=gen, dtype=torch.float64)
    advantages[0], advantages[3] = abs(advantages[0]) + 0.5, -abs(advantages[3]) - 0.5  # both signs
    logp = completion_logprobs(logits, completion_ids).detach()
    old = None
    if off_policy:  # ratios beyond both clip bounds: row 0 (A > 0) above 1 + ε_high, row 3 (A < 0) below 1 − ε
        old = logp + 0.5 * torch.randn(B, C, generator=gen, dtype=torch.float64)
        old[0, 0], old[3, 0] = logp[0, 0] - 1.0, logp[3, 0] + 1.0
    ref = logp + 0.3 * torch.randn(B, C, generator=gen, dtype=torch.float64) if beta else None
    return {"logits": logits, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages, "old": old, "ref": ref}


@pytest.mark.parametrize("accumulation", ACCUMULATION, ids=lambda a: f"ga{a[0]}spg{a[1]}")
@pytest.mark.parametrize("kl", list(KL_MODES))
@pytest.mark.parametrize("policy", ["on", "off"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_equal_trl(loss_type, policy, kl, accumulation):
    ga, spg = accumulation
    beta, corrected = KL_MODES[kl]
    cfg = LossConfig(type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, kl_bias_correction=corrected,
                     max_completion_length=C + 3)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}-{policy}-{kl}-{ga}-{spg}".encode()))
    batches = [_micro_batch(gen, C=C + i, off_policy=policy == "off", beta=beta) for i in range(ga)]
    window_items = sum(b["completion_mask"].sum() for b in batches)
    for b in batches:
        num_items = window_items if spg == ga else b["completion_mask"].sum()
        ours, metrics = grpo_loss(completion_logprobs(b["logits"], b["completion_ids"]), b["completion_mask"],
                                  b["advantages"], cfg, b["old"], b["ref"], accumulation_steps=ga,
                                  num_items=num_items, steps_per_generation=spg)
        trainer = make_trainer(cfg, FusedHeadStub(logits=b["logits"]), ga, spg)
        theirs = trl_loss(trainer, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
                          b["advantages"], b["old"], b["ref"], num_items)
        (g_ours,) = torch.autograd.grad(ours, b["logits"])
        (g_theirs,) = torch.autograd.grad(theirs, b["logits"])
        assert ours.dtype == torch.float64 and torch.isfinite(ours)
        assert abs(ours.item() - theirs.item()) <= TOL, (ours.item(), theirs.item())
        assert (g_ours - g_theirs).abs().max() <= TOL
        assert g_theirs.abs().max() > 1e-3  # the comparison is not between two zero gradients
        logged = trainer._metrics["train"]
        assert abs(metrics["clip_ratio/region"].item() - logged["clip_ratio/region_mean"][-1]) <= TOL
        assert abs(metrics["clip_ratio/low"].item() - logged["clip_ratio/low_mean"][-1]) <= TOL
        assert abs(metrics["clip_ratio/high"].item() - logged["clip_ratio/high_mean"][-1]) <= TOL
        if beta:
            assert abs(metrics["kl"].item() - logged["kl"][-1]) <= TOL
        if policy == "off":  # clipping is active on both sides
            assert metrics["clip_ratio/low"] > 0 and metrics["clip_ratio/high"] > 0
        else:
            assert metrics["clip_ratio/region"] == 0


def test_delta_two_sided_clipping_equals_trl():
    cfg = LossConfig(type="bnpo", beta=0.04, epsilon=0.2, delta=1.3)
    b = _micro_batch(torch.Generator().manual_seed(7), off_policy=True, beta=0.04)
    ours, _ = grpo_loss(completion_logprobs(b["logits"], b["completion_ids"]), b["completion_mask"],
                        b["advantages"], cfg, b["old"], b["ref"])
    theirs = trl_loss(make_trainer(cfg, FusedHeadStub(logits=b["logits"])), b["prompt_ids"], b["prompt_mask"],
                      b["completion_ids"], b["completion_mask"], b["advantages"], b["old"], b["ref"])
    undelta, _ = grpo_loss(completion_logprobs(b["logits"], b["completion_ids"]), b["completion_mask"],
                           b["advantages"], LossConfig(type="bnpo", beta=0.04, epsilon=0.2), b["old"], b["ref"])
    assert abs(ours.item() - theirs.item()) <= TOL
    assert abs(ours.item() - undelta.item()) > 1e-3  # delta is active on these tensors
    g_ours, g_theirs = (torch.autograd.grad(x, b["logits"])[0] for x in (ours, theirs))
    assert (g_ours - g_theirs).abs().max() <= TOL


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_t2i_r1_mode_equals_trl_bnpo_beta_001(accumulation_steps):
    """CoT and image segments concatenated along time = one TRL completion; bnpo, β 0.01, μ = 1."""
    gen = torch.Generator().manual_seed(3)
    Tc, Ti = 5, 9
    cot_logp = (-torch.rand(B, Tc, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    img_logp = (-torch.rand(B, Ti, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    cot_ref = cot_logp.detach() + 0.3 * torch.randn(B, Tc, generator=gen, dtype=torch.float64)
    img_ref = img_logp.detach() + 0.3 * torch.randn(B, Ti, generator=gen, dtype=torch.float64)
    cot_mask = (torch.arange(Tc)[None] < torch.tensor([5, 1, 3, 0, 2, 4])[:, None]).long()
    img_mask = torch.ones(B, Ti, dtype=torch.long)
    advantages = torch.randn(B, generator=gen, dtype=torch.float64)

    ours, metrics = t2i_r1_loss(cot_logp, cot_mask, img_logp, img_mask, advantages, cot_ref, img_ref,
                                accumulation_steps=accumulation_steps)
    cfg = LossConfig(type="bnpo", beta=0.01, kl_bias_correction=False)
    stub = FusedHeadStub(completion_logps=torch.cat([cot_logp, img_logp], dim=1))
    theirs = trl_loss(make_trainer(cfg, stub, accumulation_steps), torch.zeros(B, 2, dtype=torch.long),
                      torch.ones(B, 2, dtype=torch.long), torch.zeros(B, Tc + Ti, dtype=torch.long),
                      torch.cat([cot_mask, img_mask], dim=1), advantages, None, torch.cat([cot_ref, img_ref], 1))
    assert abs(ours.item() - theirs.item()) <= TOL
    for x in (cot_logp, img_logp):
        g_ours, g_theirs = torch.autograd.grad(ours, x, retain_graph=True)[0], \
            torch.autograd.grad(theirs, x, retain_graph=True)[0]
        assert (g_ours - g_theirs).abs().max() <= TOL and g_theirs.abs().max() > 1e-4
    assert metrics["ratio"].item() == 1.0 and metrics["clip_ratio/region"].item() == 0.0


def test_real_fused_lm_head_matches_our_log_prob_gathering():
    """TRL's real log-prob path (``add_fused_lm_head`` on a tiny LLaMA) against our logits → completion_logprobs:
    the prompt/completion alignment and padding conventions agree. The fused head computes in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).double()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    b = _micro_batch(torch.Generator().manual_seed(11), off_policy=True, beta=0.04)
    cfg = LossConfig(type="bnpo", beta=0.04, epsilon=0.2, epsilon_high=0.28)
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attention = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits
    ours, _ = grpo_loss(completion_logprobs(logits, b["completion_ids"]), b["completion_mask"], b["advantages"],
                        cfg, b["old"], b["ref"])
    trainer = make_trainer(cfg, model)
    theirs = trl_loss(trainer, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
                      b["advantages"], b["old"], b["ref"])
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    assert abs(ours.item() - theirs.item()) <= TOL
    for a, t in zip(g_ours, g_theirs):
        if a is None or t is None:
            assert a is None and t is None
            continue
        assert (a - t).abs().max() <= 1e-5 * max(1.0, t.abs().max().item())
