"""Focus predictor (spec defocus.md §7): residual over saliency-weighted depth (exact at init), click-to-focus, no
f-number input, and learnability on the scenes world."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from ctrlgen.lightning_modules.defocus import world as scenes
from ctrlgen.lightning_modules.defocus.focus import (
    FocusPredictor,
    click_focus_m,
    focus_regulariser,
    normalised_inverse_depth,
    saliency_weighted_depth,
    weighted_median,
)



def tiny(**kw) -> FocusPredictor:
    torch.manual_seed(0)
    return FocusPredictor(**{"input_res": 32, "patch": 8, "dim": 32, "layers": 2, "heads": 2, **kw})


def batch(n: int, start: int = 0, size: int = 32, split: str = "train"):
    rs = [scenes.render(0, split, i, size) for i in range(start, start + n)]
    img = torch.tensor(np.stack([r["image"].transpose(2, 0, 1) for r in rs]), dtype=torch.float32)
    depth = torch.tensor(np.stack([r["depth"] for r in rs]), dtype=torch.float32)[:, None]
    mask = torch.tensor(np.stack([r["mask"] for r in rs]), dtype=torch.float32)[:, None]
    target = torch.tensor([r["meta"]["subject_depth_m"] for r in rs], dtype=torch.float32)
    return img, depth, mask, target


def test_weighted_median_and_mean():
    v = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    assert weighted_median(v, torch.tensor([[1.0, 1.0, 1.0, 1.0]])).item() == 2.0
    assert weighted_median(v, torch.tensor([[0.0, 0.0, 1.0, 5.0]])).item() == 10.0
    assert weighted_median(v, torch.tensor([[5.0, 0.1, 0.1, 0.1]])).item() == 1.0
    depth = torch.tensor([1.0, 2.0, float("inf"), -1.0]).reshape(1, 1, 2, 2)
    sal = torch.tensor([1.0, 3.0, 100.0, 100.0]).reshape(1, 1, 2, 2)  # weights on invalid depth are ignored
    assert saliency_weighted_depth(depth, sal, "mean").item() == pytest.approx(1.75)
    assert saliency_weighted_depth(depth, sal, "median").item() == 2.0
    with pytest.raises(ValueError, match="focus.baseline"):
        saliency_weighted_depth(depth, sal, "mode")


def test_normalised_inverse_depth_is_scale_free():
    d = torch.rand(2, 1, 8, 8) * 5 + 0.5
    a, b = normalised_inverse_depth(d), normalised_inverse_depth(d * 7.0)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a.flatten(1).median(1).values, torch.ones(2), atol=0.1)


def test_at_init_prediction_equals_saliency_weighted_depth_exactly():
    img, depth, _, _ = batch(4)
    net = tiny()
    out = net(img, depth)
    assert torch.equal(out.focus_m, out.baseline_m) and torch.equal(out.scale, torch.ones(4))
    assert torch.equal(out.baseline_m, saliency_weighted_depth(depth, out.saliency, "median"))
    assert out.saliency.shape == depth.shape and bool(((out.saliency > 0) & (out.saliency < 1)).all())
    assert focus_regulariser(out).item() == 0.0
    mean = tiny(baseline="mean")(img, depth)
    assert torch.equal(mean.focus_m, saliency_weighted_depth(depth, mean.saliency, "mean"))


def test_residual_range_bounds_the_focus_and_scale():
    img, depth, _, _ = batch(2)
    net = tiny()
    torch.nn.init.constant_(net.mlp[-1].bias, 50.0)  # tanh saturates: d_f = 4 d_sal, s = 4
    out = net(img, depth)
    assert torch.allclose(out.focus_m, 4 * out.baseline_m) and torch.allclose(out.scale, torch.full((2,), 4.0))
    assert focus_regulariser(out, 1.0, 0.0).item() == pytest.approx(2500.0)


def test_no_fnumber_input_and_gradients_reach_depth():
    assert "fnumber" not in inspect.signature(FocusPredictor.forward).parameters
    with pytest.raises(ValueError, match="f-number"):
        FocusPredictor(exif_inputs=["fnumber"])
    img, depth, _, _ = batch(2)
    depth.requires_grad_(True)
    net = tiny(exif_inputs=["focal"])
    with pytest.raises(ValueError, match="focal35_mm"):
        net(img, depth)
    out = net(img, depth, focal35_mm=torch.tensor([50.0, 85.0]))
    out.focus_m.sum().backward()
    assert depth.grad is not None and float(depth.grad.abs().sum()) > 0
    assert net.mlp[-1].weight.grad is not None and float(net.mlp[-1].weight.grad.abs().sum()) > 0


def test_click_to_focus():
    d = torch.full((1, 1, 20, 30), 10.0)
    d[0, 0, 5:10, 5:10] = 2.0
    d[0, 0, 7, 7] = 50.0  # an outlier inside the window does not move the median
    assert click_focus_m(d, 7, 7) == 2.0
    assert click_focus_m(d, 25, 15) == 10.0
    assert click_focus_m(d[0, 0], 14, 14, display_size=(60, 40)) == 2.0  # (14, 14) on a 2× display → (7, 7)
    corner = d.clone()
    corner[0, 0, :2, :2] = 1.0
    corner[0, 0, 0, 2] = float("nan")
    assert click_focus_m(corner, 0, 0) == 1.0  # clipped 3×3 window, NaN ignored
    with pytest.raises(ValueError, match="outside"):
        click_focus_m(d, 30, 0)
    with pytest.raises(ValueError, match="no valid depth"):
        click_focus_m(torch.zeros(8, 8), 4, 4)


def test_a_few_steps_on_scenes_reduce_the_focus_error():
    """Supervised on the world's subject depth and mask (a learnability check of the network, not the method's
    GAN-driven training): the mean |log d_f − log d_subject| drops by ≥ 30 % on the batch and on held-out scenes."""
    img, depth, mask, target = batch(16)
    v_img, v_depth, _, v_target = batch(8, split="val")
    net = tiny()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def err(i, d, t):
        with torch.no_grad():
            return float((net(i, d).focus_m.log() - t.log()).abs().mean())

    start, v_start = err(img, depth, target), err(v_img, v_depth, v_target)
    for _ in range(80):
        out = net(img, depth)
        loss = (out.focus_m.log() - target.log()).pow(2).mean()
        loss = loss + torch.nn.functional.binary_cross_entropy(out.saliency, mask) + focus_regulariser(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, v_end = err(img, depth, target), err(v_img, v_depth, v_target)
    assert start > 0.2  # the uniform-saliency baseline is far from the subject at init
    assert end < 0.7 * start and v_end < 0.7 * v_start, (start, end, v_start, v_end)
