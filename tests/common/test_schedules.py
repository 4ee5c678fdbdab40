import pytest
import torch

from ctrlgen.lightning_modules.common.schedules import WarmupLinear, warmup_linear_factor


def test_warmup_then_linear_decay():
    f = [warmup_linear_factor(s, 4, 15, 0.0) for s in range(17)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    # post-warm-up steps 4..14: the factor reaches end_factor at the last step (total_steps − 1)
    assert f[4] == 1.0 and f[9] == pytest.approx(0.5) and f[14] == 0.0 and f[16] == 0.0


def test_var_lin0_hand_computed():
    """VAR's 'lin0' with train.py's wp0 0.005 / wpe 0.01: warm-up from 0.005, peak held for 5 % of the rest, then
    linear to 0.01 × peak at the last step. Values by hand from utils/lr_control.py's formula (wp_it 10, max_it 111):
    pasd = (it − 10) / 100, lr = wpe + (1 − wpe)(1 − pasd)/0.95 after the plateau."""
    f = lambda s: warmup_linear_factor(s, 10, 111, end_factor=0.01, start_factor=0.005, hold_frac=0.05)  # noqa: E731
    assert f(0) == pytest.approx(0.005) and f(5) == pytest.approx(0.5025)
    assert f(10) == f(14) == 1.0 and f(15) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5 / 0.95) and f(110) == pytest.approx(0.01) and f(500) == 0.01
    assert all(f(s) >= f(s + 1) for s in range(10, 120))  # never rises after the warm-up


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = WarmupLinear(opt, warmup_steps=2, total_steps=4, end_factor=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"hold_frac must lie in \[0, 1\), got 1.0"):
        WarmupLinear(opt, warmup_steps=2, total_steps=4, hold_frac=1.0)
