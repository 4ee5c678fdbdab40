"""``token_ce`` and ``recon_loss`` (ecm/losses.py) against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from ctrlgen.lightning_modules.ecm.losses import recon_loss, token_ce

# two scales kept of three: tokens [0:1] and [1:3]; the full sequence has 5 tokens ([3:5] is truncated away)
BEGIN_ENDS = [(0, 1), (1, 3), (3, 5)]
TOTAL_LEN = 5
# every token's logits are (ln 3, 0): p(class 0) = 3/4, p(class 1) = 1/4, argmax 0
A, B = math.log(4 / 3), math.log(4)  # CE of a class-0 target, of a class-1 target
TARGET = torch.tensor([[0, 1, 0],
                       [1, 0, 0]])


def _logits(requires_grad: bool = False) -> torch.Tensor:
    one = torch.tensor([math.log(3), 0.0])
    return one.expand(2, 3, 2).clone().requires_grad_(requires_grad)


def test_kept_mean_is_the_mean_over_the_kept_tokens():
    # per-token CE: row 0 (A, B, A), row 1 (B, A, A) -> 4 A + 2 B over 6 tokens
    loss, _, _ = token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN, "kept_mean")
    assert loss.item() == pytest.approx((4 * A + 2 * B) / 6, rel=1e-6)


def test_var_fixed_weighs_each_token_one_over_the_full_length():
    # per row: 2 A + B summed over its 3 kept tokens, divided by the full length 5, mean over the 2 rows
    loss, _, _ = token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN, "var_fixed")
    assert loss.item() == pytest.approx((2 * A + B) / TOTAL_LEN, rel=1e-6)
    kept, _, _ = token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN, "kept_mean")
    assert loss.item() == pytest.approx(kept.item() * 3 / TOTAL_LEN, rel=1e-6)  # a truncated sequence counts less
    full, _, _ = token_ce(_logits(), TARGET, BEGIN_ENDS, 3, "var_fixed")  # untruncated: both norms agree
    assert full.item() == pytest.approx(kept.item(), rel=1e-6)


def test_per_scale_ce_and_accuracy_cover_only_the_kept_scales():
    _, per_ce, per_acc = token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN)
    assert per_ce.shape == per_acc.shape == (2,)  # scale [3:5] lies beyond the 3 logits: not reported
    # scale 0: (A, B); scale 1: (B, A, A, A)
    assert per_ce.tolist() == pytest.approx([(A + B) / 2, (3 * A + B) / 4], rel=1e-6)
    # argmax is class 0: scale 0 hits row 0 only, scale 1 hits 3 of 4
    assert per_acc.tolist() == pytest.approx([0.5, 0.75])


def test_label_smoothing_mixes_in_the_mean_over_classes():
    eps = 0.2  # smoothed CE = (1 - eps) CE(target) + eps * mean over the 2 classes of -log p
    loss, per_ce, _ = token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN, "kept_mean", label_smoothing=eps)
    a, b = (1 - eps) * A + eps * (A + B) / 2, (1 - eps) * B + eps * (A + B) / 2
    assert loss.item() == pytest.approx((4 * a + 2 * b) / 6, rel=1e-6)
    assert per_ce[0].item() == pytest.approx((a + b) / 2, rel=1e-6)


def test_only_the_loss_carries_gradients():
    logits = _logits(requires_grad=True)
    loss, per_ce, per_acc = token_ce(logits, TARGET, BEGIN_ENDS, TOTAL_LEN, "var_fixed")
    assert loss.requires_grad and not per_ce.requires_grad and not per_acc.requires_grad
    loss.backward()
    # d CE / d logit_target = p_target - 1; each token weighs 1 / (rows x full length)
    p0 = 0.75
    want_row0_tok0 = torch.tensor([p0 - 1, 1 - p0]) / (2 * TOTAL_LEN)
    assert torch.allclose(logits.grad[0, 0], want_row0_tok0, atol=1e-7)


def test_bad_norm_and_mismatched_targets_fail_clearly():
    with pytest.raises(ValueError, match="kept_mean|var_fixed"):
        token_ce(_logits(), TARGET, BEGIN_ENDS, TOTAL_LEN, "sum")
    with pytest.raises(ValueError, match=r"targets \(2, 2\) do not match logits \(2, 3\)"):
        token_ce(_logits(), TARGET[:, :2], BEGIN_ENDS, TOTAL_LEN)


def test_recon_loss_weights_l1_and_l2():
    img = torch.zeros(1, 1, 1, 2)
    rec = torch.tensor([[[[1.0, -2.0]]]])  # L1 mean 1.5, L2 mean 2.5
    assert recon_loss(rec, img).item() == pytest.approx(4.0)
    assert recon_loss(rec, img, l1_weight=2.0, l2_weight=0.5).item() == pytest.approx(2 * 1.5 + 0.5 * 2.5)
