"""Depth estimators (spec defocus.md §6): tiny random transformers models saved and reloaded offline, frozen but
differentiable w.r.t. the pixels, gradient checkpointing that really recomputes, unit conversions, ground truth."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ctrlgen.lightning_modules.defocus.depth import (
    TransformersDepth,
    build_depth_estimator,
    decanonical_depth,
)
from torch import nn

transformers = pytest.importorskip("transformers")


def tiny_dpt():
    cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
                                 backbone_out_indices=[0, 1], reassemble_factors=[2, 1])
    return transformers.DPTForDepthEstimation(cfg)


def tiny_dinov2():
    return transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=14, out_features=["stage1", "stage2"],
                                     reshape_hidden_states=False)


def tiny_depth_anything():
    cfg = transformers.DepthAnythingConfig(backbone_config=tiny_dinov2(), reassemble_hidden_size=32,
                                           neck_hidden_sizes=[16, 32], fusion_hidden_size=16, reassemble_factors=[2, 1],
                                           head_hidden_size=8, depth_estimation_type="metric", max_depth=20)
    return transformers.DepthAnythingForDepthEstimation(cfg)


def tiny_zoedepth():
    cfg = transformers.ZoeDepthConfig(
        backbone_config=tiny_dinov2(), backbone_hidden_size=32, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16, reassemble_factors=[2, 1], bottleneck_features=16, num_relative_features=8,
        bin_embedding_dim=16, num_attractors=[4, 4, 4, 4], num_patch_transformer_layers=1,
        patch_transformer_hidden_size=16, patch_transformer_intermediate_size=16,
        patch_transformer_num_attention_heads=2,
        bin_configurations=[{"n_bins": 8, "min_depth": 0.1, "max_depth": 10.0, "name": "nyu"}])
    return transformers.ZoeDepthForDepthEstimation(cfg)


def softplus_dpt(tmp_path, **kw) -> TransformersDepth:
    """Tiny DPT reloaded from disk, its final ReLU swapped for a softplus and its convolutions and linear layers given
    PyTorch's default init (at transformers' random init the output is ≈ 0 everywhere)."""
    torch.manual_seed(0)
    model = tiny_dpt()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.reset_parameters()
    model.save_pretrained(tmp_path / "dpt")
    est = TransformersDepth.from_pretrained(tmp_path / "dpt", size=32, output="depth", **kw)
    est.model.head.head[-1] = nn.Softplus()
    return est


def image(b: int = 2, h: int = 24, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build,output", [(tiny_dpt, "inverse"), (tiny_depth_anything, "depth"),
                                          (tiny_zoedepth, "depth")])
def test_reload_offline_frozen_and_differentiable(tmp_path, build, output):
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "m")
    est = build_depth_estimator("transformers", tmp_path / "m", grad=True, checkpoint=True, size=28)
    assert est.output == output  # chosen from the model type (Depth Anything: its metric head)
    assert not any(p.requires_grad for p in est.parameters())
    before = {k: v.clone() for k, v in est.state_dict().items()}
    est.train()
    assert not est.model.training  # stays in eval mode
    x = image().requires_grad_(True)
    depth = est(x)
    assert depth.shape == (2, 1, 24, 40) and bool((depth >= 0.05).all()) and bool(torch.isfinite(depth).all())
    opt = torch.optim.SGD([x], lr=0.1)
    depth.mean().backward()
    opt.step()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(torch.equal(v, est.state_dict()[k]) for k, v in before.items())
    plain = build_depth_estimator("transformers", tmp_path / "m", checkpoint=False, size=28)
    assert torch.allclose(plain(x), depth, atol=1e-6)  # checkpointing flags do not change the result


def test_softplus_head_gives_pixel_gradients_and_nondegenerate_depth(tmp_path):
    est = softplus_dpt(tmp_path)
    x = image().requires_grad_(True)
    depth = est(x)
    assert float(depth.detach().std()) > 1e-3  # varies across pixels
    depth[:, :, :12].sum().backward()
    assert float(x.grad.abs().sum()) > 0
    assert not torch.allclose(est(image(seed=1)), depth.detach())  # depends on the image


def test_checkpointing_recomputes_blocks_with_identical_results(tmp_path):
    calls = {"n": 0}
    results = {}
    for ckpt in (False, True):
        est = softplus_dpt(tmp_path / str(ckpt), checkpoint=ckpt)
        layer = est.model.dpt.encoder.layer[0]
        handle = layer.attention.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        calls["n"] = 0
        x = image().requires_grad_(True)
        d = est(x)
        d.sum().backward()
        results[ckpt] = (d.detach(), x.grad.clone(), calls["n"])
        handle.remove()
    assert results[False][2] == 1 and results[True][2] == 2  # the block ran again in the backward pass
    assert torch.allclose(results[False][0], results[True][0], atol=1e-6)
    assert torch.allclose(results[False][1], results[True][1], atol=1e-6)


def test_grad_off_gives_no_graph(tmp_path):
    est = softplus_dpt(tmp_path, grad=False, checkpoint=False)
    assert est(image().requires_grad_(True)).grad_fn is None


def test_missing_weights_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_depth_estimator("transformers", tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformersDepth.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="depth.weights"):
        build_depth_estimator("transformers")
    with pytest.raises(NotImplementedError, match="metric3d"):
        build_depth_estimator("metric3d_vit_small")


class _ConstModel(nn.Module):
    """A stand-in model whose raw prediction is a constant (to check the unit conversions)."""

    supports_gradient_checkpointing = False

    def __init__(self, model_type: str, value: float, fov: float | None = None):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.w = nn.Parameter(torch.ones(()))
        self.value, self.fov = value, fov

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        pred = self.w * self.value + 0 * pixel_values.mean(1)
        fov = None if self.fov is None else torch.full((b,), self.fov)
        return SimpleNamespace(predicted_depth=pred, field_of_view=fov)


def test_unit_conversions():
    x = image(1, 16, 32)
    inv = TransformersDepth(_ConstModel("dpt", 0.25), size=16, checkpoint=False)
    assert inv.output == "inverse" and torch.allclose(inv(x), torch.full((1, 1, 16, 32), 4.0))
    pro = TransformersDepth(_ConstModel("depth_pro", 0.01), size=16, checkpoint=False)
    assert pro.output == "canonical_inverse"
    assert torch.allclose(pro(x, f_px=64.0), torch.full((1, 1, 16, 32), 64.0 / (32 * 0.01)))  # f_px / (W · x)
    fov = TransformersDepth(_ConstModel("depth_pro", 0.01, fov=90.0), size=16, checkpoint=False)
    assert torch.allclose(fov(x), torch.full((1, 1, 16, 32), 16.0 / (32 * 0.01)), rtol=1e-5)  # f_px = W/2 at 90°
    with pytest.raises(ValueError, match="f_px"):
        pro(x)
    assert torch.allclose(decanonical_depth(torch.ones(2, 1, 4, 4), torch.tensor([500.0, 2000.0]))[:, 0, 0, 0],
                          torch.tensor([0.5, 2.0]))


def test_input_size_rounding():
    est = TransformersDepth(_ConstModel("depth_anything", 1.0), size=(518, 518), checkpoint=False)
    assert est.multiple == 14
    h, w = est.input_size(480, 640)
    assert h % 14 == 0 and w % 14 == 0 and abs(h / w - 0.75) < 0.02  # aspect kept
    est = TransformersDepth(_ConstModel("dpt", 1.0), size=(384, 384), keep_aspect_ratio=False, checkpoint=False)
    assert est.input_size(480, 640) == (384, 384)


def test_ground_truth_estimator():
    est = build_depth_estimator("ground_truth")
    depth = torch.rand(2, 1, 24, 40) * 5
    assert torch.equal(est(image(), depth_m=depth), depth.clamp(min=0.05))
    with pytest.raises(ValueError, match="depth_m"):
        est(image())
    with pytest.raises(ValueError, match=r"\(2, 1, 24, 40\)"):
        est(image(), depth_m=depth[:, :, :10])
