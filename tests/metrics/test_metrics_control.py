"""Canny F1 and depth RMSE (ecm.md §8 item 14), depth estimators (tiny random DPT, platform.md §5)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ctrlgen.lightning_modules.metrics.control import (
    CannyF1,
    DepthRMSE,
    GeometryDepth,
    MeanSEM,
    TransformersDepthEstimator,
    binarize_edges,
    binary_f1_per_image,
    canny_f1,
    depth_rmse,
)
from ctrlgen.lightning_modules.metrics.edges import get_edge_extractor


def _shapes_batch(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((size, size, 3), rng.integers(0, 60, 3), np.uint8)
        for _ in range(3):
            color = tuple(int(c) for c in rng.integers(90, 256, 3))
            c = tuple(int(v) for v in rng.integers(14, size - 14, 2))
            kind = rng.integers(0, 3)
            if kind == 0:
                cv2.circle(img, c, int(rng.integers(6, 14)), color, -1)
            elif kind == 1:
                cv2.rectangle(img, (c[0] - 9, c[1] - 7), (c[0] + 10, c[1] + 8), color, -1)
            else:
                pts = np.array([[c[0], c[1] - 11], [c[0] - 10, c[1] + 8], [c[0] + 11, c[1] + 9]], np.int32)
                cv2.fillPoly(img, [pts], color)
        out.append(img)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _blur(imgs: torch.Tensor, sigma: float) -> torch.Tensor:
    arr = imgs.permute(0, 2, 3, 1).numpy()
    out = np.stack([cv2.GaussianBlur(a, (0, 0), sigma) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def test_f1_of_identical_edges_is_one_including_blank_images():
    imgs = _shapes_batch(6)
    imgs[5] = 37  # a blank image: no edges in either map
    ext = get_edge_extractor("cv2_canny_100_200")
    cond = ext(imgs)
    assert cond[:5].amax() == 255 and cond[5].amax() == 0
    mean, per = canny_f1(imgs, cond, ext)
    assert per.shape == (6,)
    assert torch.all(per == 1.0) and mean.item() == 1.0


def test_f1_drops_under_blur_and_more_with_more_blur():
    imgs = _shapes_batch(8, seed=1)
    ext = get_edge_extractor()
    cond = ext(imgs)
    f_small, _ = canny_f1(_blur(imgs, 1.0), cond, ext)
    f_big, per_big = canny_f1(_blur(imgs, 3.0), cond, ext)
    assert f_small.item() < 0.95
    assert f_big.item() < f_small.item()
    assert torch.all(per_big < 1.0)


def test_binary_f1_hand_computed_and_thresholds():
    # pred 1 1 0 0 / target 1 0 1 0 -> TP 1, FP 1, FN 1 -> F1 = 2/(2+1+1) = 0.5
    pred = torch.tensor([[[255, 255, 0, 0]]], dtype=torch.uint8)
    tgt = torch.tensor([[[255, 0, 255, 0]]], dtype=torch.uint8)
    assert binary_f1_per_image(pred, tgt).tolist() == [0.5]
    # second image: TP 2, FP 0, FN 2 -> 4/6
    pred2 = torch.tensor([[[1, 1, 0, 0, 0]], [[1, 1, 0, 0, 0]]], dtype=torch.bool)
    tgt2 = torch.tensor([[[1, 0, 1, 0, 0]], [[1, 1, 1, 1, 0]]], dtype=torch.bool)
    f = binary_f1_per_image(pred2, tgt2)
    assert f[0].item() == pytest.approx(0.5) and f[1].item() == pytest.approx(4 / 6)
    # > 128 binarisation of 8-bit maps; one empty map against a non-empty one gives 0
    assert binarize_edges(torch.tensor([128, 129], dtype=torch.uint8)).tolist() == [False, True]
    assert binary_f1_per_image(torch.zeros(1, 4, dtype=torch.uint8), tgt[0]).tolist() == [0.0]
    with pytest.raises(ValueError, match="same shape"):
        binary_f1_per_image(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_cannyf1_metric_accumulates_and_merges_like_ddp():
    imgs = _shapes_batch(8, seed=2)
    blurred = _blur(imgs, 1.5)
    cond = get_edge_extractor()(imgs)
    _, per = canny_f1(blurred, cond)
    m = CannyF1()
    m.update(blurred[:3], cond[:3])
    m.update(blurred[3:], cond[3:])
    assert m.compute().item() == pytest.approx(per.mean().item(), abs=1e-6)
    # two "ranks", states merged (sum reduction)
    r0, r1 = CannyF1(), CannyF1()
    r0.update(blurred[:5], cond[:5])
    r1.update(blurred[5:], cond[5:])
    r0.merge_state(r1)
    assert r0.compute().item() == pytest.approx(per.mean().item(), abs=1e-6)


def test_mean_sem_matches_numpy_and_merges_like_ddp():
    vals = np.random.default_rng(3).normal(0.1, 0.2, 37)
    m = MeanSEM()
    m.update(torch.from_numpy(vals[:20]))
    r1 = MeanSEM()
    r1.update(torch.from_numpy(vals[20:]).float())
    m.merge_state(r1)  # what the sum reduction does across ranks
    mean, sem = m.compute()
    assert mean.item() == pytest.approx(vals.mean(), abs=1e-6)
    assert sem.item() == pytest.approx(vals.std(ddof=1) / np.sqrt(len(vals)), rel=1e-5)
    const = MeanSEM()
    const.update(torch.full((5,), 0.25))
    assert const.compute()[1].item() == pytest.approx(0.0, abs=1e-7)  # no spread, no error (never negative var)
    with pytest.raises(RuntimeError, match="before any update"):
        MeanSEM().compute()
    # paired use: per-image F1 of two metric objects on the same conditions
    imgs = _shapes_batch(6, seed=4)
    cond = get_edge_extractor()(imgs)
    a, b, d = CannyF1(), CannyF1(), MeanSEM()
    a.update(imgs, cond)
    b.update(_blur(imgs, 2.0), cond)
    d.update(a.last_per_image - b.last_per_image)
    assert d.compute()[0].item() == pytest.approx(a.compute().item() - b.compute().item(), abs=1e-6)


def test_depth_rmse_identity_and_hand_computed():
    d = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 16))).float()
    d[:, 0, 0] = 0
    d[:, 0, 1] = 255  # a 0..255 depth map: both normalisations are the identity
    mean, per = depth_rmse(d, d)
    assert mean.item() == 0.0 and torch.all(per == 0)
    # pred [0,1,2,4] -> /max*255 -> [0, 63.75, 127.5, 255] -> 8 bit [0, 64, 128, 255]
    # cond [0,0,0,4]  -> minmax    -> [0, 0, 0, 255];  RMSE = sqrt((64² + 128²)/4) = sqrt(5120)
    pred = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    cond = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
    mean, per = depth_rmse(pred, cond)
    assert per.shape == (1,) and per.item() == pytest.approx(5120 ** 0.5, rel=1e-6)
    # without 8-bit rounding: sqrt((63.75² + 127.5²)/4)
    assert depth_rmse(pred, cond, quantize=False).mean.item() == pytest.approx(((63.75**2 + 127.5**2) / 4) ** 0.5)
    # mean over samples of per-sample RMSE (not RMSE of the pooled errors)
    # second sample: pred vs itself: 8-bit [0,64,128,255] vs min-max [0,63.75,127.5,255] -> rounding error only
    both = depth_rmse(torch.cat([pred, pred]), torch.cat([cond, pred]))
    assert both.per_sample[1].item() == pytest.approx(((0.25**2 + 0.5**2) / 4) ** 0.5, rel=1e-6)
    assert both.mean.item() == pytest.approx((5120**0.5 + ((0.25**2 + 0.5**2) / 4) ** 0.5) / 2, rel=1e-6)


def test_depth_rmse_resizes_prediction_to_condition():
    d = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 8, 8))).float()
    d[:, 0, 0], d[:, 0, 1] = 0, 255
    big = d.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 16x16, 2x2 blocks
    assert depth_rmse(big, d).mean.item() == pytest.approx(0.0, abs=1e-9)
    assert depth_rmse(big[:, None], d[:, None]).mean.item() == pytest.approx(0.0, abs=1e-9)


def _np_depth_rmse(pred, cond) -> float:
    """The ControlNet++ protocol written out in numpy (independent of ``depth_rmse``): pred / per-image max × 255
    rounded to 8 bit, cond min-max normalised to 0–255, per-image RMSE, mean over images."""
    pred, cond = np.asarray(pred, np.float32), np.asarray(cond, np.float64)
    per = []
    for p, c in zip(pred, cond):
        p8 = np.clip(np.round(p / p.max() * np.float32(255.0)), 0, 255).astype(np.float64)
        cn = (c - c.min()) / (c.max() - c.min()) * 255.0
        per.append(np.sqrt(np.mean((p8 - cn) ** 2)))
    return float(np.mean(per))


def test_depth_rmse_metric_with_geometry_passthrough():
    # the hand-computed pair of test_depth_rmse_identity_and_hand_computed: RMSE sqrt(5120), then the rounding-only
    # sample sqrt((0.25² + 0.5²)/4); compute() is the mean over both updates' samples
    pred = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    cond = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
    m = DepthRMSE(estimator=GeometryDepth())
    m.update(pred[:, None], cond)  # (B,1,H,W) depth "images" through the passthrough
    assert m.compute().item() == pytest.approx(5120**0.5, rel=1e-6)
    m.update(pred[:, None], pred)
    assert m.compute().item() == pytest.approx((5120**0.5 + ((0.25**2 + 0.5**2) / 4) ** 0.5) / 2, rel=1e-6)
    d = torch.rand(4, 12, 12) * 3 + 0.5
    m = DepthRMSE(estimator=GeometryDepth())
    m.update(d[:, None], d)
    expected = _np_depth_rmse(d, d)
    assert expected > 1  # max-normalisation vs min-max normalisation differ when min > 0
    assert m.compute().item() == pytest.approx(expected, rel=1e-5)
    g = GeometryDepth(fn=lambda x: x * 2)
    assert torch.allclose(g(d), d * 2)
    assert GeometryDepth()(d[:, None].expand(-1, 3, -1, -1)).shape == (4, 12, 12)


def test_tiny_random_dpt_through_transformers_depth_estimator(tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                    patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, head_in_index=-1)
    model = DPTForDepthEstimation(cfg)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 200_000  # ~136k
    model.save_pretrained(tmp_path)
    est = TransformersDepthEstimator(tmp_path)
    assert est.size == (64, 64)
    imgs = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)
    depth = est(imgs)
    assert depth.shape == (2, 48, 40) and depth.dtype == torch.float32 and torch.isfinite(depth).all()
    # same result for the float [0,1] input and as DepthRMSE's estimator
    assert torch.allclose(est(imgs.float() / 255), depth, atol=1e-5)
    m = DepthRMSE(estimator=est)
    m.update(imgs, depth)
    expected = _np_depth_rmse(depth, depth)
    assert expected > 0 and m.compute().item() == pytest.approx(expected, rel=1e-4)


def test_transformers_depth_estimator_missing_dir_names_it(tmp_path):
    missing = tmp_path / "no_such_dpt"
    with pytest.raises(FileNotFoundError, match="no_such_dpt") as ei:
        TransformersDepthEstimator(missing)
    assert "DEPTH_MODEL_DIR" in str(ei.value)
