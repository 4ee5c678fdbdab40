"""Thin-lens optics (spec defocus.md §2, §4.1, §4.6): the CoC table, its properties, guards and unit conversions."""

from __future__ import annotations

import math

import pytest
import torch
from ctrlgen.lightning_modules.defocus import optics
from ctrlgen.lightning_modules.defocus.optics import coc_mm, coc_px, signed_radius_px


# Spec §2 reference table (36 mm sensor, 1024 px, s = 1): f (mm), N, d_f (m), d (m), c (mm), c (px diameter).
SPEC_TABLE = [
    (50, 1.8, 2.0, math.inf, 0.712, 20.26),
    (50, 1.8, 2.0, 10.0, 0.570, 16.21),
    (50, 1.8, 2.0, 1.0, 0.712, 20.26),
    (50, 22.0, 2.0, math.inf, 0.058, 1.66),
    (85, 1.4, 3.0, math.inf, 1.770, 50.4),
    (35, 2.8, 1.5, 5.0, 0.209, 5.95),
]


@pytest.mark.parametrize("f, n, d_f, d, c_mm, c_px", SPEC_TABLE)
def test_coc_matches_spec_table(f, n, d_f, d, c_mm, c_px):
    """Each row within 0.01 px (two-decimal entries) and half a unit of the mm column's last digit. The 85 mm row is
    printed to one decimal (50.4); its exact value 85² / (1.4 · 2915) · 1024 / 36 = 50.358 px is checked to 0.01 px and
    the printed value to its rounding (0.05)."""
    assert float(coc_mm(d, n, f, d_f)) == pytest.approx(c_mm, abs=5e-4)
    got = float(coc_px(d, n, f, d_f, 1024))
    if f == 85:
        assert got == pytest.approx(85**2 / (1.4 * 2915) * 1024 / 36, abs=0.01)
        assert got == pytest.approx(c_px, abs=0.05)
    else:
        assert got == pytest.approx(c_px, abs=0.01)


@pytest.mark.parametrize("f, n, d_f", [(50, 1.8, 2.0), (85, 1.4, 3.0), (24, 4.0, 0.8), (135, 2.0, 10.0)])
def test_coc_properties(f, n, d_f):
    """c(d_f) = 0, c(N/2) = 2 c(N), c(d_f/2) = c(∞), c ≥ 0, bounded by the far limit, monotone in |1/d − 1/d_f|."""
    assert float(coc_px(d_f, n, f, d_f, 1024)) == pytest.approx(0.0, abs=1e-12)
    d = torch.tensor([0.5, 1.0, 3.0, 7.0, 50.0], dtype=torch.float64)
    assert torch.allclose(coc_px(d, n / 2, f, d_f, 1024), 2 * coc_px(d, n, f, d_f, 1024), rtol=1e-12)
    assert float(coc_px(d_f / 2, n, f, d_f, 1024)) == pytest.approx(float(coc_px(math.inf, n, f, d_f, 1024)), rel=1e-12)
    far = float(coc_px(math.inf, n, f, d_f, 1024))
    assert far == pytest.approx(f * f / (n * (d_f * 1e3 - f)) * 1024 / 36, rel=1e-12)
    d_far = torch.tensor([d_f * 1.01, d_f * 2, d_f * 10, 1e6], dtype=torch.float64)
    c_far = coc_px(d_far, n, f, d_f, 1024)
    assert (c_far >= 0).all() and (c_far.diff() > 0).all() and (c_far < far).all()
    d_near = torch.tensor([d_f * 0.99, d_f * 0.8, d_f * 0.5, d_f * 0.3], dtype=torch.float64)
    assert (coc_px(d_near, n, f, d_f, 1024).diff() > 0).all()


def test_signed_radius_sign_monotone_and_half_coc():
    d = torch.logspace(-0.5, 3, 50, dtype=torch.float64)
    r = signed_radius_px(d, 1.8, 50, 2.0, 1024)
    assert (r.diff() > 0).all(), "r must increase with depth so that sorting by r sorts by depth"
    assert (r[d < 2.0] < 0).all() and (r[d > 2.0] > 0).all()
    assert torch.allclose(2 * r.abs(), coc_px(d, 1.8, 50, 2.0, 1024), rtol=1e-12)


def test_radius_scaling_exact():
    """Radius ∝ 1/N, ∝ s, ∝ W_px, ∝ f² / (d_f − f) (d_f − f in mm)."""
    d = torch.tensor([0.7, 1.3, 4.0, 20.0], dtype=torch.float64)
    base = signed_radius_px(d, 2.0, 50, 2.0, 512)
    assert torch.allclose(signed_radius_px(d, 5.6, 50, 2.0, 512), base * 2.0 / 5.6, rtol=1e-12)
    assert torch.allclose(signed_radius_px(d, 2.0, 50, 2.0, 512, scale=1.7), base * 1.7, rtol=1e-12)
    assert torch.allclose(signed_radius_px(d, 2.0, 50, 2.0, 1024), base * 2, rtol=1e-12)
    f2 = signed_radius_px(d, 2.0, 100, 2.0, 512)
    assert torch.allclose(f2, base * (100**2 / 1900) / (50**2 / 1950), rtol=1e-12)


def test_guards_clamp_focus_and_depth():
    """d_f ≥ max(1.5 f, 0.3 m) and d ≥ 0.05 m; the guarded CoC stays finite where the raw formula blows up."""
    assert float(optics.guard_focus_m(0.1, 50)) == pytest.approx(0.3)
    assert float(optics.guard_focus_m(0.1, 400)) == pytest.approx(0.6)
    assert float(optics.guard_focus_m(2.0, 50)) == pytest.approx(2.0)
    assert float(optics.guard_depth_m(0.001)) == pytest.approx(0.05)
    assert float(optics.guard_depth_m(math.inf)) == math.inf
    assert math.isfinite(float(coc_px(0.0, 1.8, 50, 0.05, 1024)))
    assert float(coc_px(0.01, 1.8, 50, 2.0, 1024)) == pytest.approx(float(coc_px(0.05, 1.8, 50, 2.0, 1024)))
    assert not math.isfinite(float(coc_px(0.0, 1.8, 50, 2.0, 1024, guard=False)))


def test_radius_is_differentiable_in_every_parameter():
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (3.0, 2.0, 50.0, 2.0, 1.3)]
    d, n, f, d_f, s = params
    signed_radius_px(d, n, f, d_f, 256, s).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in params)
    assert n.grad < 0 and d.grad > 0 and f.grad > 0 and s.grad > 0


def test_depth_for_radius_inverts_signed_radius():
    r = torch.tensor([-12.0, -3.0, 0.0, 2.5, 8.0], dtype=torch.float64)
    d = optics.depth_for_radius_m(r, 1.8, 50, 2.0, 1024)
    assert torch.allclose(signed_radius_px(d, 1.8, 50, 2.0, 1024), r, atol=1e-9)
    assert float(optics.depth_for_radius_m(11.0, 1.8, 50, 2.0, 1024)) == math.inf  # beyond the far limit 10.13 px


def test_crop_factor_conversions():
    assert float(optics.crop_factor(36.0)) == pytest.approx(1.0)
    assert float(optics.crop_factor(23.6)) == pytest.approx(1.5254, abs=1e-4)  # APS-C
    assert float(optics.focal35_from_focal(35.0, 23.6)) == pytest.approx(53.39, abs=0.01)
    assert float(optics.focal_from_focal35(optics.focal35_from_focal(35.0, 17.3), 17.3)) == pytest.approx(35.0)
    assert float(optics.focal35_after_crop(50.0, 1024, 512)) == pytest.approx(100.0)
    assert float(optics.focal_px(50.0, 1024)) == pytest.approx(50 * 1024 / 36)
    # Nikon D800-like: 7360 px over 35.9 mm written in each unit (2 = inch, 3 = cm, 4 = mm)
    for unit, per_mm in ((2, 25.4), (3, 10.0), (4, 1.0)):
        res = 7360 / 35.9 * per_mm
        assert optics.sensor_width_from_focal_plane(7360, res, unit) == pytest.approx(35.9)
    with pytest.raises(ValueError, match="FocalPlaneResolutionUnit"):
        optics.sensor_width_from_focal_plane(7360, 205.0, 1)
    with pytest.raises(ValueError, match="must be > 0"):
        optics.sensor_width_from_focal_plane(7360, 0.0, 4)


def test_max_radius_scales_with_width():
    assert optics.max_radius_at_width(32, 1024) == 32
    assert optics.max_radius_at_width(32, 512) == 16
    assert optics.max_radius_at_width(32, 64, ref_width_px=64) == 32
