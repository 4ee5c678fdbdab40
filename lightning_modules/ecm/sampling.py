"""Pure sampling maths for VAR / ECM (spec §2.3, §2.4, §3.7). No parameters, no Lightning.

* :func:`cfg_ratio`, :func:`cfg_mix` — VAR's linear CFG ramp t = cfg·si/(K−1), (1+t)·cond − t·uncond.
* :func:`temperature_schedule` — per-scale T_k (``const`` | ``step`` | ``linear``), ECM's T_high → T_low.
* :func:`top_k_top_p_filter_` / :func:`sample_top_k_top_p` — VAR's filtering rules and seeded multinomial.
* :func:`uniform_labels` — the class labels VAR's sampler draws when none are given.
* :func:`smooth_tau`, :func:`gumbel_softmax_embed`, :func:`sample_smooth` — VAR's ``more_smooth`` step: a
  Gumbel-softmax mixture of codebook vectors replaces the embedding of the drawn tokens.
* :func:`filtered_probs`, :func:`exponential_noise`, :func:`sample_with_noise` — the same draw split into a
  random part (Exp(1) noise, drawn outside) and a deterministic, sync-free part (CUDA-graph capturable).
* :func:`normalize_trunc_probs`, :func:`trunc_generator`, :func:`draw_trunc_scale` — early-centric
  truncation draw s ~ Categorical(trunc_probs) from a generator seeded by (seed, step), identical on all ranks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ctrlgen.datamodules.seeding import derive_seed

DEFAULT_TRUNC_PROBS: dict[int, float] = {5: 0.2, 7: 0.6, 9: 0.2}


# ----------------------------------------------------------------------------- CFG
def cfg_ratio(si: int, num_scales: int, cfg: float) -> float:
    """t = cfg · si / (K − 1): 0 at scale 0, ``cfg`` at the last scale (spec §3.7); 0 if K == 1."""
    return cfg * si / (num_scales - 1) if num_scales > 1 else 0.0


def cfg_mix(logits_2BlV: Tensor, t: float) -> Tensor:
    """(1 + t)·cond − t·uncond with the batch laid out as [cond rows; null-class rows]."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


# ----------------------------------------------------------------------------- temperature
def temperature_schedule(num_scales: int, kind: str = "const", temp_high: float = 1.0, temp_low: float = 0.8,
                         switch_scale: int = 8) -> list[float]:
    """Per-scale temperatures (spec §2.4).

    * ``const``: T_k = temp_high for all k.
    * ``step``: T_k = temp_high for k < switch_scale, temp_low from ``switch_scale`` on (default 8 of 10).
    * ``linear``: linear from temp_high at scale 0 to temp_low at scale K−1.
    """
    if kind == "const":
        temps = [float(temp_high)] * num_scales
    elif kind == "step":
        temps = [float(temp_high) if k < switch_scale else float(temp_low) for k in range(num_scales)]
    elif kind == "linear":
        d = max(num_scales - 1, 1)
        temps = [temp_high + (temp_low - temp_high) * k / d for k in range(num_scales)]
    else:
        raise ValueError(f"unknown temperature schedule kind {kind!r} (const|step|linear)")
    if any(t <= 0 for t in temps):
        raise ValueError(f"temperatures must be > 0, got {temps}")
    return temps


def resolve_temperatures(schedule: float | Sequence[float] | None, num_scales: int) -> list[float]:
    """``None`` → all 1.0; a float → constant; a sequence must have one entry per scale."""
    if schedule is None:
        return [1.0] * num_scales
    if isinstance(schedule, (int, float)):
        return [float(schedule)] * num_scales
    temps = [float(t) for t in schedule]
    if len(temps) != num_scales:
        raise ValueError(f"temperature schedule has {len(temps)} entries, expected {num_scales}")
    return temps


# ----------------------------------------------------------------------------- top-k / top-p
def top_k_top_p_filter_(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """In-place VAR filtering (spec §3.7): top-k keeps logits ≥ the k-th largest; top-p sorts ascending and
    drops tokens whose ascending cumulative probability ≤ 1 − p (the max always survives)."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1].fill_(False)  # (a Scalar fill: no tensor from Python data inside a captured step)
        logits_BlV.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits_BlV


def filter_logits(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> Tensor:
    """Divide by ``temperature`` *before* filtering, then filter → fp32 logits (B, l, V), −inf where removed.
    Computed on a copy (the caller's logits are left untouched)."""
    logits = logits_BlV.float()
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    return top_k_top_p_filter_(logits, top_k, top_p)


def filtered_probs(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> Tensor:
    """Softmax of :func:`filter_logits` → probabilities (B·l, V) fp32."""
    V = logits_BlV.shape[-1]
    return filter_logits(logits_BlV, top_k, top_p, temperature).softmax(dim=-1).view(-1, V)


def sample_top_k_top_p(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
    """:func:`filtered_probs`, then one ``torch.multinomial`` draw per position with ``generator`` → (B, l) int64."""
    B, l, _ = logits_BlV.shape
    probs = filtered_probs(logits_BlV, top_k, top_p, temperature)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def uniform_labels(B: int, num_classes: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """B labels drawn as VAR's sampler draws them for ``label_B=None``: one ``torch.multinomial`` call of B samples
    with replacement from a (1, num_classes) fp32 row of 1/num_classes with ``generator`` → (B,) int64 (the same
    call consumes the generator the same way, so the tokens drawn after it match too)."""
    probs = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device)
    return torch.multinomial(probs, num_samples=B, replacement=True, generator=generator).reshape(B)


def smooth_tau(si: int, num_scales: int) -> float:
    """Gumbel-softmax temperature of ``more_smooth`` at scale ``si``: max(0.27·(1 − 0.95·r), 0.005),
    r = si/(K − 1) (0 if K == 1), from 0.27 at the first scale down to 0.0135 at the last."""
    r = si / (num_scales - 1) if num_scales > 1 else 0.0
    return max(0.27 * (1 - r * 0.95), 0.005)


def gumbel_softmax_embed(logits_BlV: Tensor, codebook_VC: Tensor, si: int, num_scales: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """VAR's ``more_smooth`` embedding (B, l, Cvae): y = softmax((logits·(1 + r) + g) / τ) over the vocabulary,
    g = −log(q), q ~ Exp(1) of the logits' shape drawn with ``generator``, τ = :func:`smooth_tau`, r = si/(K − 1);
    then y @ codebook (soft, not hard: the mixture of codebook vectors, no straight-through)."""
    r = si / (num_scales - 1) if num_scales > 1 else 0.0
    gumbels = -torch.empty_like(logits_BlV).exponential_(generator=generator).log()
    y = ((logits_BlV.mul(1 + r) + gumbels) / smooth_tau(si, num_scales)).softmax(dim=-1)
    return y @ codebook_VC.unsqueeze(0)


def sample_smooth(logits_BlV: Tensor, codebook_VC: Tensor, si: int, num_scales: int, top_k: int = 0,
                  top_p: float = 0.0, generator: torch.Generator | None = None,
                  temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """One ``more_smooth`` step → (tokens (B, l) int64, embedding (B, l, Cvae)): the tokens are drawn as by
    :func:`sample_top_k_top_p`; the embedding is :func:`gumbel_softmax_embed` of the same filtered (and
    temperature-divided) logits, its noise drawn after the tokens from the same generator."""
    B, l, V = logits_BlV.shape
    logits = filter_logits(logits_BlV, top_k, top_p, temperature)
    idx = torch.multinomial(logits.softmax(dim=-1).view(-1, V), num_samples=1, replacement=True,
                            generator=generator).view(B, l)
    return idx, gumbel_softmax_embed(logits, codebook_VC, si, num_scales, generator)


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, out: Tensor | None = None) -> Tensor:
    """q ~ Exp(1) of ``shape`` (fp32), drawn with ``generator`` on the generator's device (the default
    generator of ``device`` if None), written into ``out`` (any device) when given.

    ``torch.multinomial(probs, 1, generator=g)`` (probs (N, V) fp32) is, in ATen's single-sample path,
    ``argmax(probs / q)`` with ``q = torch.empty_like(probs).exponential_(generator=g)``. So noise drawn here
    with the same generator, shape (N, V) and order of calls reproduces its tokens exactly through
    :func:`sample_with_noise` (checked on CPU in tests/ecm/test_fast_paths.py; on CUDA by bench/gpu_ecm.py)."""
    gdev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    if out is not None and out.device == gdev and out.dtype == torch.float32 and out.is_contiguous():
        return out.exponential_(generator=generator)
    q = torch.empty(shape, dtype=torch.float32, device=gdev).exponential_(generator=generator)
    return q if out is None else out.copy_(q)


def sample_with_noise(logits_BlV: Tensor, noise: Tensor, top_k: int = 0, top_p: float = 0.0,
                      temperature: float = 1.0) -> Tensor:
    """Token per position = argmax(p / q) with p = :func:`filtered_probs` and ``noise`` q (B·l, V) ~ Exp(1):
    a categorical draw from p (exponential race), with no host sync → (B, l) int64."""
    B, l, _ = logits_BlV.shape
    return (filtered_probs(logits_BlV, top_k, top_p, temperature) / noise).argmax(dim=-1).view(B, l)


# ----------------------------------------------------------------------------- early-centric truncation
def normalize_trunc_probs(trunc_probs: Mapping[int | str, float], num_scales: int | None = None) -> dict[int, float]:
    """Int keys (YAML may give strings), non-negative weights normalised to sum 1, keys < num_scales."""
    probs = {int(k): float(v) for k, v in trunc_probs.items()}
    if not probs or any(v < 0 for v in probs.values()) or sum(probs.values()) <= 0:
        raise ValueError(f"trunc_probs must be non-negative with a positive sum, got {dict(trunc_probs)}")
    if num_scales is not None and any(not 0 <= k < num_scales for k in probs):
        raise ValueError(f"trunc_probs keys {sorted(probs)} must lie in [0, {num_scales})")
    tot = sum(probs.values())
    return {k: v / tot for k, v in sorted(probs.items())}


def trunc_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator seeded by ``derive_seed(seed, "trunc", step)`` — same on every DDP rank (``sync_across_ranks``)."""
    return torch.Generator().manual_seed(derive_seed(seed, "trunc", step))


def draw_trunc_scale(trunc_probs: Mapping[int | str, float], seed: int, step: int,
                     generator: torch.Generator | None = None) -> int:
    """Last kept scale s ~ Categorical(trunc_probs) (spec §2.3). Pass ``generator`` to draw from an own
    stream instead (e.g. per-rank, when ``sync_across_ranks`` is off)."""
    probs = normalize_trunc_probs(trunc_probs)
    keys = list(probs)
    g = generator if generator is not None else trunc_generator(seed, step)
    j = int(torch.multinomial(torch.tensor([probs[k] for k in keys], dtype=torch.float64), 1, generator=g))
    return keys[j]
