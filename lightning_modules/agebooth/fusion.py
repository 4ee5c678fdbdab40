"""Fusion of two LoRAs (young, old) with one scalar α ∈ [0, 1] per layer (agebooth.md §5): pure functions on
``{module path: LoraFactors}`` dicts, no UNet needed. α weights the young LoRA: α = 1 → young, α = 0 → old.

Notation per layer: ΔW_i = s_i·B_i·A_i with A_i = ``down`` (r × in), B_i = ``up`` (out × r), i ∈ {y, o}.

- :func:`linear_fusion`: ΔW(α) = α·ΔW_y + (1 − α)·ΔW_o **exactly**, as one adapter of rank ≤ r_y + r_o: the scaled
  downs are stacked (rows α·s_y·A_y, (1 − α)·s_o·A_o) and the ups concatenated (columns B_y, B_o), so
  B_new·A_new = α·s_y·B_y·A_y + (1 − α)·s_o·B_o·A_o with no cross terms. A side with weight 0 is dropped and the
  endpoints return the other LoRA itself, so α = 1 and α = 0 give ΔW_y and ΔW_o bit for bit.
- :func:`svdmix`: the released AgeBooth "SVDMix" (HH-LG/AgeBooth ``svdlora_pytorch``): thin SVDs of every factor,
  A_i = U_i·diag(S_i)·V_i and B_i = P_i·diag(T_i)·Q_i, element-wise interpolation of U, S, V, P, T, Q with weight α,
  rebuild A = Ū·diag(S̄)·V̄ and B = P̄·diag(T̄)·Q̄; rank ≤ r, no truncation, no alignment of singular vectors. It is
  non-linear in α and depends on how ΔW was split into factors (gauge): (B, A) mixed with (−B, −A) at α = 0.5 gives
  exactly 0. It therefore works on the factors exactly as trained. A scale s_i ≠ 1 is folded into B_i before its SVD.
- :func:`peft_fusion`: peft ``add_weighted_adapter`` run through peft's own code on a tiny model holding one linear per
  layer; ``combination_type="svd"`` (peft's default) is the best rank-k approximation of the linear fusion, exact
  only when k ≥ rank(α·ΔW_y + (1 − α)·ΔW_o) (r_y + r_o for independent LoRAs).

Which library blends are exact for α·ΔW_y + (1 − α)·ΔW_o (measured with diffusers 0.42 / peft 0.21):
- diffusers ``set_adapters(["young", "old"], [α, 1 − α])``: **exact**. Each adapter keeps its own (A, B) and the layer
  computes W·x + Σ w_i·s_i·B_i·(A_i·x), a sum of the two products (matches the hand-added ΔW to ≤ 1e-6 in fp32).
- peft ``combination_type="cat"``: **exact**. It builds the same stacked factors as :func:`linear_fusion`.
- peft ``combination_type="linear"``: **not exact**. It sums the factors, A = Σ √(w_i·s_i)·A_i, B = Σ √(w_i·s_i)·B_i,
  so B·A contains the cross terms √(w_y·w_o·s_y·s_o)·(B_y·A_o + B_o·A_y); for independent LoRAs at α = 0.5 the
  relative error against the true blend is ≈ 1 (huggingface/peft#1155).

SVDs run on ``svd_device`` in ``svd_dtype`` (CPU float64 by default: singular-vector signs then do not depend on the
accelerator's solver) and the results are cast back to the LoRA's dtype and device. ``sign_fix="max_abs_positive"``
flips each singular pair so the largest-magnitude entry of its left vector is positive: every factor is unchanged,
the mix no longer depends on the SVD backend's sign choice, and it is no longer the released algorithm (``"none"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from ctrlgen.lightning_modules.common.lora import LoraFactors
from torch import nn

Factors = Mapping[str, LoraFactors]
MODES = ("linear", "svdmix", "peft_svd")
SIGN_FIXES = ("none", "max_abs_positive")


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fusion weight alpha={alpha} is outside [0, 1] (1 = young LoRA, 0 = old LoRA)")
    return alpha


def _check_pair(young: Factors, old: Factors) -> None:
    if set(young) != set(old):
        only_y, only_o = sorted(set(young) - set(old)), sorted(set(old) - set(young))
        raise KeyError(f"young and old LoRAs adapt different layers: only young {only_y[:3]} ({len(only_y)}), only "
                       f"old {only_o[:3]} ({len(only_o)}); train both bands with the same targets")
    for path in young:
        y, o = young[path], old[path]
        if y.up.shape[0] != o.up.shape[0] or y.down.shape[1] != o.down.shape[1]:
            raise ValueError(f"layer {path!r}: young ΔW {(y.up.shape[0], y.down.shape[1])} != old ΔW "
                             f"{(o.up.shape[0], o.down.shape[1])}; the LoRAs belong to different models")


def delta(factors: Factors) -> dict[str, torch.Tensor]:
    """The dense ΔW of every layer (for tests and references; fusion itself never needs it)."""
    return {path: f.delta() for path, f in factors.items()}


# ------------------------------------------------------------------------------------------------ linear fusion
def linear_layer(young: LoraFactors, old: LoraFactors, alpha: float) -> LoraFactors:
    """α·ΔW_y + (1 − α)·ΔW_o as stacked factors (rank r_y + r_o), scale 1; at α ∈ {0, 1} the kept LoRA itself."""
    parts = [(w, f) for w, f in ((alpha, young), (1.0 - alpha, old)) if w != 0.0]
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    down = torch.cat([(w * f.scale) * f.down if w * f.scale != 1.0 else f.down for w, f in parts], 0)
    return LoraFactors(down, torch.cat([f.up for _, f in parts], 1), 1.0)


def linear_fusion(young: Factors, old: Factors, alpha: float) -> dict[str, LoraFactors]:
    """:func:`linear_layer` on every layer."""
    alpha = _check_alpha(alpha)
    _check_pair(young, old)
    return {path: linear_layer(young[path], old[path], alpha) for path in young}


# ------------------------------------------------------------------------------------------------------ SVDMix
class FactorSVD(NamedTuple):
    """Thin SVDs of one layer's factors: down = U·diag(S)·V, scale·up = P·diag(T)·Q (computation dtype/device)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    P: torch.Tensor
    T: torch.Tensor
    Q: torch.Tensor


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _sign_fixed(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = u.abs().argmax(0)
    sign = torch.sign(u.gather(0, idx[None]).squeeze(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, vh * sign[:, None]


def factor_svd(f: LoraFactors, svd_dtype: torch.dtype = torch.float64, svd_device: str | torch.device = "cpu",
               sign_fix: str = "none") -> FactorSVD:
    """The thin SVDs SVDMix interpolates (two per layer; cache them once per LoRA, they do not depend on α)."""
    if sign_fix not in SIGN_FIXES:
        raise ValueError(f"sign_fix {sign_fix!r} unknown; expected one of {SIGN_FIXES}")
    out = []
    for m in (f.down, f.scale * f.up if f.scale != 1.0 else f.up):
        usv = _svd(m.detach().to(device=svd_device, dtype=svd_dtype))
        out.extend(_sign_fixed(*usv) if sign_fix == "max_abs_positive" else usv)
    return FactorSVD(*out)


def factor_svds(factors: Factors, **kwargs) -> dict[str, FactorSVD]:
    """:func:`factor_svd` of every layer (``kwargs``: ``svd_dtype``, ``svd_device``, ``sign_fix``)."""
    return {path: factor_svd(f, **kwargs) for path, f in factors.items()}


def svdmix_layer(young: FactorSVD, old: FactorSVD, alpha: float, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> LoraFactors:
    """One layer of SVDMix from cached SVDs: interpolate the six SVD parts element-wise, rebuild down and up."""
    if young.S.shape != old.S.shape or young.T.shape != old.T.shape:
        raise ValueError(f"SVDMix needs equal ranks, got young {young.S.numel()} and old {old.S.numel()}; "
                         f"use linear fusion for LoRAs of different rank")
    u, s, v, p, t, q = (alpha * y + (1.0 - alpha) * o for y, o in zip(young, old))
    down, up = (u * s) @ v, (p * t) @ q
    return LoraFactors(down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype), 1.0)


def svdmix(young: Factors, old: Factors, alpha: float, svds: tuple[Mapping[str, FactorSVD],
           Mapping[str, FactorSVD]] | None = None, **svd_kwargs) -> dict[str, LoraFactors]:
    """SVDMix of every layer, rank ≤ r, scale 1, in each young LoRA's dtype and device. ``svds``: the
    ``(factor_svds(young), factor_svds(old))`` pair computed once for a sweep (else computed here)."""
    alpha = _check_alpha(alpha)
    _check_pair(young, old)
    sy, so = svds if svds is not None else (factor_svds(young, **svd_kwargs), factor_svds(old, **svd_kwargs))
    return {path: svdmix_layer(sy[path], so[path], alpha, f.down.dtype, f.down.device) for path, f in young.items()}


# -------------------------------------------------------------------------------------------- peft's own merges
class _Layers(nn.Module):
    """One bias-free linear per LoRA layer, named ``l0, l1, …`` (peft needs a model to merge adapters)."""

    def __init__(self, factors: Factors):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(f.down.shape[1], f.up.shape[0], bias=False) for f in factors.values())


def peft_fusion(young: Factors, old: Factors, alpha: float, combination_type: str = "svd",
                svd_rank: int | None = None, svd_clamp: float | None = None) -> dict[str, LoraFactors]:
    """peft ``add_weighted_adapter(["young", "old"], [α, 1 − α], combination_type=...)`` on a tiny model with one
    linear per layer; returns the merged adapter's factors (scale folded in). ``svd_rank`` None: peft's default
    (max r_i). Exact for ``"cat"``; ``"svd"`` exact iff ``svd_rank`` ≥ rank of the sum; ``"linear"`` has cross terms."""
    from peft import LoraConfig, get_peft_model

    alpha = _check_alpha(alpha)
    _check_pair(young, old)
    paths = list(young)
    model = _Layers(young)
    targets = [f"layers.{i}" for i in range(len(paths))]
    for k, (name, lora) in enumerate((("young", young), ("old", old))):
        ranks = {t: lora[p].rank for t, p in zip(targets, paths)}
        r = max(ranks.values())
        cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False,
                         rank_pattern={t: v for t, v in ranks.items() if v != r})
        model = get_peft_model(model, cfg, adapter_name=name) if k == 0 else model
        if k:
            model.add_adapter(name, cfg)
    layers = model.base_model.model.layers
    with torch.no_grad():
        for i, p in enumerate(paths):
            for name, lora in (("young", young), ("old", old)):
                f = lora[p].folded()
                layers[i].lora_A[name].weight.copy_(f.down)
                layers[i].lora_B[name].weight.copy_(f.up)
    model.add_weighted_adapter(["young", "old"], [alpha, 1.0 - alpha], "mix", combination_type=combination_type,
                               svd_rank=svd_rank, svd_clamp=svd_clamp)
    out = {}
    for i, p in enumerate(paths):
        layer, like = layers[i], young[p].down
        f = LoraFactors(layer.lora_A["mix"].weight.detach(), layer.lora_B["mix"].weight.detach(),
                        float(layer.scaling["mix"])).folded()
        out[p] = LoraFactors(f.down.to(like), f.up.to(like), 1.0)
    return out


def fuse(young: Factors, old: Factors, alpha: float, mode: str = "linear", **kwargs) -> dict[str, LoraFactors]:
    """Dispatch on ``mode``: ``linear`` (:func:`linear_fusion`), ``svdmix`` (:func:`svdmix`; kwargs ``svds``,
    ``svd_dtype``, ``svd_device``, ``sign_fix``) or ``peft_svd`` (:func:`peft_fusion` with ``"svd"``; kwargs
    ``svd_rank``, ``svd_clamp``)."""
    if mode == "linear":
        return linear_fusion(young, old, alpha)
    if mode == "svdmix":
        return svdmix(young, old, alpha, **kwargs)
    if mode == "peft_svd":
        return peft_fusion(young, old, alpha, "svd", **kwargs)
    raise ValueError(f"fusion mode {mode!r} unknown; expected one of {MODES}")
