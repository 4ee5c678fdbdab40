import pytest
import torch

from lightning_modules.common.schedules import WarmupLinear, warmup_linear_factor


def test_warmup_then_linear_decay():
    f = [warmup_linear_factor(s, 4, 14, 0.0) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[9] == pytest.approx(0.5) and f[14] == 0.0 and f[15] == 0.0


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = WarmupLinear(opt, warmup_steps=2, total_steps=4, end_factor=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0])
