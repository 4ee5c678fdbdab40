"""Scale schedule maths (spec §3.3, §8 check 3)."""
import math

import pytest
import torch

from ctrlgen.lightning_modules.ecm.scales import (
    DEFAULT_PATCH_NUMS,
    PHI_TABLE_10,
    begin_ends,
    block_causal_bias,
    end_of_scale,
    ends_for,
    first_l,
    lvl_index,
    phi_table,
    phi_table_by_ticks,
    phi_ticks,
    scale_of_position,
    tokens_per_scale,
    total_tokens,
    trunc_stats,
)


def test_default_schedule_table():
    assert DEFAULT_PATCH_NUMS == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert tokens_per_scale() == [1, 4, 9, 16, 25, 36, 64, 100, 169, 256]
    assert ends_for() == [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]
    assert begin_ends()[0] == (0, 1) and begin_ends()[-1] == (424, 680)
    assert total_tokens() == 680 and first_l() == 1
    assert end_of_scale(DEFAULT_PATCH_NUMS, 7) == 255  # "first 8 scales"
    assert end_of_scale(DEFAULT_PATCH_NUMS, None) == 680
    assert scale_of_position(DEFAULT_PATCH_NUMS, 254) == 7 and scale_of_position(DEFAULT_PATCH_NUMS, 255) == 8


def _brute_mask(pns):
    lvl = [k for k, p in enumerate(pns) for _ in range(p * p)]
    L = len(lvl)
    m = torch.empty(L, L)
    for q in range(L):
        for k in range(L):
            m[q, k] = 0.0 if lvl[k] <= lvl[q] else -math.inf
    return m


@pytest.mark.parametrize("pns", [(1, 2, 3, 4), (1, 2, 3, 4, 6, 8), (2, 3)])
def test_mask_and_lvl_small_schedules(pns):
    L = sum(p * p for p in pns)
    lvl = lvl_index(pns)
    assert lvl.dtype == torch.int64 and lvl.shape == (L,)
    for k, (bg, ed) in enumerate(begin_ends(pns)):
        assert torch.all(lvl[bg:ed] == k)
    mask = block_causal_bias(pns)
    assert mask.shape == (1, 1, L, L) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], _brute_mask(pns))


def test_default_mask_properties():
    m = block_causal_bias()[0, 0]
    assert m.shape == (680, 680)
    # bidirectional inside scale 9, no access from scale 8 to scale 9, full access backwards
    assert torch.all(m[424:, 424:] == 0) and torch.all(torch.isinf(m[255:424, 424:]))
    assert torch.all(m[424:, :424] == 0)
    # number of visible keys per query row = end of its scale
    visible = (m == 0).sum(1)
    eds = torch.tensor(ends_for())
    assert torch.equal(visible, eds[lvl_index()])


def test_phi_table():
    assert phi_table() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] == list(PHI_TABLE_10)
    # the general tick rule (ties → higher index) reproduces the hard-coded table
    assert phi_table_by_ticks(10, 4) == list(PHI_TABLE_10)
    ticks = phi_ticks(4)
    assert ticks[0] == pytest.approx(1 / 12) and ticks[-1] == pytest.approx(11 / 12)
    # scales 2 and 7 are exact ties
    assert abs(abs(ticks[0] - 2 / 9) - abs(ticks[1] - 2 / 9)) < 1e-9
    assert phi_table((1, 2, 3, 4, 6, 8)) == [0, 0, 1, 2, 3, 3]
    assert phi_table((1, 2, 3, 4)) == [0, 1, 2, 3]
    assert phi_table((1,)) == [0]
    assert phi_ticks(2) == pytest.approx([0.25, 0.75])


def test_trunc_stats_default():
    st = trunc_stats({5: 0.2, 7: 0.6, 9: 0.2})
    assert st["mean_tokens"] == pytest.approx(307.2)
    assert st["fraction"] == pytest.approx(307.2 / 680)
    assert st["scale_freq"] == pytest.approx([1, 1, 1, 1, 1, 1, 0.8, 0.8, 0.2, 0.2])


def test_invalid_schedule():
    with pytest.raises(ValueError, match=r"patch_nums must be a non-empty sequence of positive ints, got \(\)"):
        ends_for(())
    with pytest.raises(ValueError, match=r"patch_nums must be a non-empty sequence of positive ints, got \(1, 0\)"):
        ends_for((1, 0))
