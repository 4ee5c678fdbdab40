"""EdgeExtractor registry and the fixed cv2 Canny convention (ecm.md §6, §8 item 14)."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from ctrlgen.lightning_modules.metrics.edges import (
    DEFAULT_EDGE_EXTRACTOR,
    CannyEdgeExtractor,
    EdgeExtractor,
    available_edge_extractors,
    get_edge_extractor,
    register_edge_extractor,
)


def _shapes_image(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), rng.integers(0, 80, 3), np.uint8)
    for _ in range(3):
        color = tuple(int(c) for c in rng.integers(60, 256, 3))
        c = tuple(int(v) for v in rng.integers(12, size - 12, 2))
        if rng.random() < 0.5:
            cv2.circle(img, c, int(rng.integers(5, 14)), color, -1)
        else:
            cv2.rectangle(img, (c[0] - 8, c[1] - 6), (c[0] + 9, c[1] + 7), color, -1)
    return img


def test_registry_returns_one_object_per_name():
    a = get_edge_extractor("cv2_canny_100_200")
    assert a is get_edge_extractor(DEFAULT_EDGE_EXTRACTOR)
    assert a is get_edge_extractor()
    assert get_edge_extractor(a) is a  # an instance passes through
    assert DEFAULT_EDGE_EXTRACTOR in available_edge_extractors()
    # parametric family: registered on first use, then a singleton too
    b = get_edge_extractor("cv2_canny_50_150")
    assert b is get_edge_extractor("cv2_canny_50_150") and b is not a
    assert (b.low, b.high) == (50.0, 150.0)
    with pytest.raises(KeyError, match="unknown edge extractor"):
        get_edge_extractor("kornia_canny")
    with pytest.raises(KeyError, match="already registered"):
        register_edge_extractor(DEFAULT_EDGE_EXTRACTOR, lambda: CannyEdgeExtractor())


def test_data_and_metric_configs_resolve_to_the_same_extractor():
    from ctrlgen.lightning_modules.metrics.control import CannyF1

    data_side = get_edge_extractor("cv2_canny_100_200")
    metric = CannyF1(extractor="cv2_canny_100_200")
    assert metric.extractor is data_side
    # pickling (DataLoader workers, checkpoints) resolves back to the registry object
    assert pickle.loads(pickle.dumps(data_side)) is data_side


def test_custom_registration_is_lazy_singleton():
    calls = []

    class Dummy(EdgeExtractor):
        def extract_uint8(self, image_hwc):
            return np.zeros(image_hwc.shape[:2], np.uint8)

    register_edge_extractor("test_dummy_edges", lambda: calls.append(1) or Dummy(), overwrite=True)
    assert calls == []
    d1 = get_edge_extractor("test_dummy_edges")
    d2 = get_edge_extractor("test_dummy_edges")
    assert d1 is d2 and calls == [1] and d1.name == "test_dummy_edges"


def test_fixed_grayscale_convention_matches_cv2():
    img = _shapes_image(0)
    out = get_edge_extractor()(img)
    ref = cv2.Canny(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 100, 200)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255} and out.max() == 255
    np.testing.assert_array_equal(out, ref)


def test_isoluminant_colour_edge_is_not_an_edge_in_grayscale():
    # red (255,0,0) and green (0,130,0) have the same grey level (76): colour Canny sees the square, grayscale doesn't
    img = np.zeros((48, 48, 3), np.uint8)
    img[..., 1] = 130
    img[12:36, 12:36] = (255, 0, 0)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert gray.min() == gray.max()
    assert cv2.Canny(img, 100, 200).max() == 255  # cv2 on RGB: per-channel max gradient
    assert get_edge_extractor()(img).max() == 0


def test_torch_batch_layouts_and_dtypes():
    ext = get_edge_extractor()
    imgs = np.stack([_shapes_image(s) for s in range(3)])  # (B,H,W,3)
    ref = ext(imgs)
    assert ref.shape == (3, 64, 64)
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # (B,3,H,W) uint8
    out = ext(t)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1, 64, 64) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out[:, 0].numpy(), ref)
    # float in [0,1] and in [-1,1] map to the same uint8 images
    np.testing.assert_array_equal(ext(t.float() / 255)[:, 0].numpy(), ref)
    np.testing.assert_array_equal(ext(t.float() / 127.5 - 1, value_range=(-1, 1))[:, 0].numpy(), ref)
    b = ext(t, as_bool=True)
    assert b.dtype == torch.bool and torch.equal(b, out > 0)
    single = ext(t[1])
    assert single.shape == (1, 64, 64) and torch.equal(single, out[1])
    with pytest.raises(ValueError, match="3 channels"):
        ext(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
