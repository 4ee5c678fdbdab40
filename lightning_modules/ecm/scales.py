"""Scale-schedule maths shared by the VQVAE, VAR and the ECM control net (spec §3.2–§3.4).

A *schedule* is the tuple of token-map sides ``patch_nums`` (VAR default ``(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)``).
Scale ``k`` owns ``pn_k²`` consecutive positions ``[begin_k, end_k)`` of the flattened token sequence of
length ``L = Σ pn_k²``. Everything here is pure (no parameters) and works for any small schedule, e.g. the
``(1, 2, 3, 4)`` or ``(1, 2, 3, 4, 6, 8)`` schedules of the tiny CPU demo models.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)

#: φ index per scale for VAR's 10-scale schedule with 4 partially shared φ convs (spec §3.2/§3.3).
#: Scales 2 and 7 are exact ties of the tick rule; the official code resolves them by float rounding,
#: so ctrlgen hard-codes the table instead of relying on rounding.
PHI_TABLE_10: tuple[int, ...] = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def _check(patch_nums: Sequence[int]) -> tuple[int, ...]:
    pns = tuple(int(p) for p in patch_nums)
    if not pns or any(p <= 0 for p in pns):
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {patch_nums!r}")
    return pns


def tokens_per_scale(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> list[int]:
    """pn_k² for every scale (spec §3.3, row 'tokens')."""
    return [p * p for p in _check(patch_nums)]


def ends_for(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> list[int]:
    """Cumulative ends ed_k = Σ_{i≤k} pn_i²; default → [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]."""
    out, cur = [], 0
    for n in tokens_per_scale(patch_nums):
        cur += n
        out.append(cur)
    return out


def begin_ends(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> list[tuple[int, int]]:
    """``[(begin_k, end_k)]`` per scale; ``begin_0 = 0``."""
    eds = ends_for(patch_nums)
    return [(0 if k == 0 else eds[k - 1], e) for k, e in enumerate(eds)]


def total_tokens(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> int:
    """Sequence length L (680 for the default schedule)."""
    return ends_for(patch_nums)[-1]


def first_l(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> int:
    """Number of start (sos) positions = tokens of scale 0 (1 for VAR)."""
    return _check(patch_nums)[0] ** 2


def end_of_scale(patch_nums: Sequence[int], si: int | None) -> int:
    """ed of scale ``si`` (``None`` or negative → full length L, Python-style negative indices excepted)."""
    eds = ends_for(patch_nums)
    if si is None or si == -1:
        return eds[-1]
    if not -len(eds) <= si < len(eds):
        raise IndexError(f"scale index {si} out of range for {len(eds)} scales")
    return eds[si]


def lvl_index(patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS, device: torch.device | str | None = None) -> torch.Tensor:
    """Scale index per position, int64 of shape (L,) (VAR buffer ``lvl_1L`` is this with a leading 1)."""
    pns = _check(patch_nums)
    return torch.cat([torch.full((p * p,), k, dtype=torch.int64, device=device) for k, p in enumerate(pns)])


def block_causal_bias(
    patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Additive attention mask (1, 1, L, L): 0 where scale(key) ≤ scale(query), −inf elsewhere (spec §3.4).

    Block-causal by scale and bidirectional inside a scale; equals VAR's ``attn_bias_for_masking``.
    """
    lvl = lvl_index(patch_nums, device=device)
    allowed = lvl.view(-1, 1) >= lvl.view(1, -1)  # query rows, key columns
    zero = torch.zeros((), dtype=dtype, device=device)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=device)
    L = lvl.numel()
    return torch.where(allowed, zero, ninf).reshape(1, 1, L, L).contiguous()


def phi_ticks(num_phi: int) -> list[float]:
    """Tick positions of VAR's partially shared φ (``PhiPartiallyShared``): linspace(1/(3K), 1−1/(3K), K)
    for K = 4 (→ 1/12 … 11/12, spec §3.2), otherwise linspace(1/(2K), 1−1/(2K), K)."""
    if num_phi < 1:
        raise ValueError("num_phi must be ≥ 1")
    if num_phi == 1:
        return [0.5]
    lo = 1.0 / (3 * num_phi) if num_phi == 4 else 1.0 / (2 * num_phi)
    hi = 1.0 - lo
    return [lo + (hi - lo) * i / (num_phi - 1) for i in range(num_phi)]


def phi_table_by_ticks(num_scales: int, num_phi: int = 4) -> list[int]:
    """General rule: the tick (:func:`phi_ticks`) nearest to si/(SN−1); exact ties (|Δ| ≤ 1e-9) go to the
    *higher* index, which is what float rounding yields in the official code for the 10-scale case
    (si = 2 → 1, si = 7 → 3). A single-scale schedule uses at = 0."""
    ticks = phi_ticks(num_phi)
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        dists = [abs(t - at) for t in ticks]
        best = 0
        for i, d in enumerate(dists):
            if d <= dists[best] + 1e-9:
                best = i
        out.append(best)
    return out


def phi_table(patch_nums_or_num_scales: Sequence[int] | int = DEFAULT_PATCH_NUMS, num_phi: int = 4) -> list[int]:
    """φ index per scale (spec §3.2/§3.3): the hard-coded ``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]`` for 10 scales
    with 4 φ convs, otherwise :func:`phi_table_by_ticks` (e.g. (1,2,3,4,6,8) → [0, 0, 1, 2, 3, 3])."""
    sn = patch_nums_or_num_scales if isinstance(patch_nums_or_num_scales, int) else len(_check(patch_nums_or_num_scales))
    if sn == 10 and num_phi == 4:
        return list(PHI_TABLE_10)
    return phi_table_by_ticks(sn, num_phi)


def scale_of_position(patch_nums: Sequence[int], pos: int) -> int:
    """Scale index owning sequence position ``pos``."""
    for k, e in enumerate(ends_for(patch_nums)):
        if pos < e:
            return k
    raise IndexError(f"position {pos} ≥ L = {total_tokens(patch_nums)}")


def trunc_stats(trunc_probs: dict[int, float], patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS) -> dict[str, object]:
    """Expected kept tokens and per-scale training frequency P(s ≥ k) for an early-centric sampler
    (spec §2.3; default {5: .2, 7: .6, 9: .2} → mean 307.2 of 680 tokens)."""
    eds = ends_for(patch_nums)
    probs = {int(k): float(v) for k, v in trunc_probs.items()}
    tot = sum(probs.values())
    mean_tokens = sum(p * eds[k] for k, p in probs.items()) / tot
    freq = [sum(p for s, p in probs.items() if s >= k) / tot for k in range(len(eds))]
    return {"mean_tokens": mean_tokens, "fraction": mean_tokens / eds[-1], "scale_freq": freq}
