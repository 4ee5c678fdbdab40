"""CoT length modes for ShortCoTI: CapLength, TargetLength and the difficulty-adaptive penalty (spec §3.2, §2.7).

Every function here reads the **CoT segment only**: image rollouts always have exactly the image-token count, so
no length rule, cap or truncation test ever sees image tokens (a generic "max tokens hit" rule applied to an image
rollout would flag every sample). The GRPO row [CoT | image] is assembled after these functions have run.

Length L of a CoT: ``unit="words"`` = whitespace split of the decoded CoT; ``"tokens"`` = CoT mask sum excluding EOS.
The total reward is R = Σ_k λ_k r_k + R_len with

- ``mode="none"``: R_len = 0 (T2I-R1);
- ``mode="cap"`` (CapLength): the CoT is cut to its first ``cap`` units before it enters the image prompt, tokens
  past the cut get mask 0, R_len = −cap_penalty·1[cut];
- ``mode="target"`` (TargetLength): R_len = −α·φ(L);
- ``mode="adaptive"`` (ShortCoTI): R_len = −α·w(e)·φ(L), w(e) = w_min + (w_max − w_min)·e^γ, with the prompt's
  easiness e ∈ [0, 1] estimated from its group's quality rewards (no gradient): easier prompts are pushed harder.

φ: ``hinge`` max(0, L − L_T)/L_T, ``linear`` L/L_T, ``sigmoid`` sigmoid((L − L_T)/τ). The paper's formula is not
public; every constant is a [design] knob (``model.init_args.length.*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MODES = ("none", "cap", "target", "adaptive")
UNITS = ("words", "tokens")
SHAPES = ("hinge", "linear", "sigmoid")
SOURCES = ("group", "offline", "ema")


def _default_ranges() -> dict[str, tuple[float, float]]:
    return {"hps": (0.20, 0.35), "git": (0.0, 1.0), "gdino": (0.0, 1.0), "orm": (0.0, 1.0)}


@dataclass
class LengthConfig:
    """Length-mode knobs; every default is [design] (spec §3.2): ``unit`` words|tokens; CapLength ``cap`` units,
    ``cap_penalty``, ``tokens_per_word_max`` (sizes the CoT token budget under a word cap); TargetLength/adaptive
    ``alpha``, ``target`` (L_T), ``shape`` of φ, ``tau`` (sigmoid width); adaptive ``w_min``, ``w_max``, ``gamma``
    and per-reward normalisation ``ranges`` {name: (lo, hi)} of the easiness estimate, ``difficulty_source``
    (``group``: the prompt's own G rollouts; ``offline``/``ema``: a per-prompt easiness kept by the caller) and
    ``momentum`` of the ``ema`` source."""

    mode: str = "none"  # none = T2I-R1
    unit: str = "words"  # [design] the paper reports words
    cap: int = 40  # [design]
    cap_penalty: float = 0.0  # [design]
    tokens_per_word_max: float = 2.0  # [design]
    alpha: float = 0.5  # [design] α of Eq. (4)
    target: float = 40.0  # [design] L_T of Eq. (4)
    shape: str = "hinge"  # [design]
    tau: float = 10.0  # [design]
    w_min: float = 0.25  # [design]
    w_max: float = 1.0  # [design]
    gamma: float = 1.0  # [design]
    ranges: dict[str, tuple[float, float]] = field(default_factory=_default_ranges)  # [design]
    difficulty_source: str = "group"  # [design] group | offline | ema (the latter two pass easiness_override)
    momentum: float = 0.9  # [design] of the ema source

    def __post_init__(self) -> None:
        choices = (("mode", self.mode, MODES), ("unit", self.unit, UNITS), ("shape", self.shape, SHAPES),
                   ("difficulty_source", self.difficulty_source, SOURCES))
        for key, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"length.{key} must be one of {allowed}, got {value!r}")
        if self.cap < 1 or self.target <= 0 or self.tau <= 0 or self.tokens_per_word_max <= 0:
            raise ValueError(f"length.cap >= 1, target > 0, tau > 0 and tokens_per_word_max > 0 are required, got "
                             f"{self.cap}, {self.target}, {self.tau}, {self.tokens_per_word_max}")
        if not 0 <= self.w_min <= self.w_max or self.gamma <= 0:
            raise ValueError(f"length needs 0 <= w_min <= w_max and gamma > 0, got w_min={self.w_min}, "
                             f"w_max={self.w_max}, gamma={self.gamma}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"length.momentum must be in [0, 1), got {self.momentum}")
        for name, (lo, hi) in self.ranges.items():
            if not hi > lo:
                raise ValueError(f"length.ranges.{name} must be (lo, hi) with hi > lo, got ({lo}, {hi})")


# ----------------------------------------------------------------------------------------------------- counting
def word_count(text: str) -> int:
    """Words of a decoded CoT: its whitespace-separated pieces."""
    return len(text.split())


def word_lengths(texts: Sequence[str]) -> torch.Tensor:
    """Word counts of decoded CoTs → float (N,)."""
    return torch.tensor([float(word_count(t)) for t in texts], dtype=torch.float64)


def token_lengths(cot_ids: torch.Tensor, cot_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """CoT tokens under the mask, EOS excluded: ids/mask (N, T) → float (N,)."""
    return ((cot_ids != eos_token_id) & cot_mask.bool()).sum(dim=1).to(torch.float64)


def cot_lengths(texts: Sequence[str], cot_ids: torch.Tensor, cot_mask: torch.Tensor, eos_token_id: int,
                unit: str) -> dict[str, torch.Tensor]:
    """Both counts (``words``, ``tokens``; both are logged) and ``length`` in the configured unit."""
    if unit not in UNITS:
        raise ValueError(f"length unit must be one of {UNITS}, got {unit!r}")
    if len(texts) != cot_ids.shape[0]:
        raise ValueError(f"{len(texts)} CoT texts for {cot_ids.shape[0]} CoT rows")
    out = {"words": word_lengths(texts), "tokens": token_lengths(cot_ids, cot_mask, eos_token_id)}
    out["length"] = out[unit]
    return out


def hit_token_limit(cot_ids: torch.Tensor, cot_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Rows whose CoT ran out of tokens without an EOS (N,) bool. Only for the CoT: an image rollout has no EOS by
    construction and must never be judged by this rule."""
    return ~((cot_ids == eos_token_id) & cot_mask.bool()).any(dim=1)


# ------------------------------------------------------------------------------------------------------ CapLength
def cap_max_new_tokens(cfg: LengthConfig) -> int:
    """CoT token budget under CapLength: ceil(cap · tokens_per_word_max) for a word cap; cap + 1 for a token cap
    (room for the EOS of a CoT of exactly ``cap`` tokens)."""
    if cfg.unit == "tokens":
        return cfg.cap + 1
    return math.ceil(cfg.cap * cfg.tokens_per_word_max)


def _kept_tokens_words(ids: list[int], cap: int, decode: Callable[[list[int]], str]) -> int:
    """Largest prefix length k whose decoded text has <= cap words (binary search: word counts of prefixes do not
    decrease)."""
    if word_count(decode(ids)) <= cap:
        return len(ids)
    lo, hi = 0, len(ids)  # words(prefix lo) <= cap < words(prefix hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if word_count(decode(ids[:mid])) <= cap:
            lo = mid
        else:
            hi = mid
    return lo


def cap_cot(
    cot_ids: torch.Tensor,
    cot_mask: torch.Tensor,
    cfg: LengthConfig,
    eos_token_id: int,
    decode: Callable[[list[int]], str],
) -> dict[str, object]:
    """CapLength at rollout: cut every CoT to its first ``cfg.cap`` units.

    cot_ids/cot_mask (N, T), the mask covering tokens up to and including the first EOS. Returns ``mask`` (N, T):
    the input mask with tokens past the cut set to 0 (a cut CoT loses its EOS too); ``capped`` (N,) bool: a cut
    happened; ``kept`` (N,) long: tokens kept; ``texts``: the decoded kept CoTs (what enters the image prompt; EOS
    not decoded). ``decode`` maps token ids to text; a word cap is located by decoding token prefixes. A CoT that hit
    the token budget without EOS counts as cut only if it is over the cap.
    """
    if cot_ids.shape != cot_mask.shape or cot_ids.ndim != 2:
        raise ValueError(f"cot_ids {tuple(cot_ids.shape)} and cot_mask {tuple(cot_mask.shape)} must be equal (N, T)")
    mask = cot_mask.clone()
    kept = torch.zeros(cot_ids.shape[0], dtype=torch.long)
    capped = torch.zeros(cot_ids.shape[0], dtype=torch.bool)
    texts: list[str] = []
    for i in range(cot_ids.shape[0]):
        active = cot_mask[i].bool()
        body = [int(t) for t, a in zip(cot_ids[i].tolist(), active.tolist()) if a and t != eos_token_id]
        if cfg.unit == "tokens":
            k = min(len(body), cfg.cap)
        else:
            k = _kept_tokens_words(body, cfg.cap, decode)
        if k < len(body):
            capped[i] = True
            positions = active.nonzero().flatten()
            mask[i, positions[k:]] = 0  # body tokens come first under the mask; the EOS (if any) follows them
        kept[i] = k
        texts.append(decode(body[:k]))
    return {"mask": mask, "capped": capped, "kept": kept, "texts": texts}


# ----------------------------------------------------------------------------------------- Target and adaptive
def shape_fn(length: torch.Tensor, cfg: LengthConfig) -> torch.Tensor:
    """φ(L) of the configured shape (module docstring)."""
    L = length.to(torch.float64)
    if cfg.shape == "hinge":
        return (L - cfg.target).clamp(min=0) / cfg.target
    if cfg.shape == "linear":
        return L / cfg.target
    return torch.sigmoid((L - cfg.target) / cfg.tau)


def easiness(
    quality: dict[str, torch.Tensor],
    G: int,
    ranges: dict[str, tuple[float, float]],
    active: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row easiness e ∈ [0, 1] of each prompt from its group's quality rewards, without gradient.

    quality {name: (B·G,)} in contiguous groups of G; each reward is mapped to [0, 1] by clip((r − lo)/(hi − lo)),
    averaged over the rewards ``active`` for the row (``active`` {name: (B·G,) bool}, None → all active), then over
    the G rollouts of the prompt. Returns (B·G,), the group's value on each of its rows.
    """
    if not quality:
        raise ValueError("easiness needs at least one quality reward")
    missing = sorted(set(quality) - set(ranges))
    if missing:
        raise ValueError(f"length.ranges has no (lo, hi) for rewards {missing}; add e.g. {missing[0]}: [0.0, 1.0]")
    with torch.no_grad():
        total = count = None
        for name, r in quality.items():
            lo, hi = ranges[name]
            r = r.detach().to(torch.float64)
            if r.ndim != 1 or r.numel() % G:
                raise ValueError(f"quality reward {name!r} must be flat with B*G values (G={G}), got {tuple(r.shape)}")
            on = torch.ones_like(r) if active is None or name not in active else active[name].to(torch.float64)
            score = ((r - lo) / (hi - lo)).clamp(0.0, 1.0) * on
            total = score if total is None else total + score
            count = on if count is None else count + on
        if (count == 0).any():
            rows = (count == 0).nonzero().flatten().tolist()
            raise ValueError(f"easiness: rows {rows[:8]} have no active quality reward; mark at least one active")
        per_row = total / count
        return per_row.view(-1, G).mean(dim=1).repeat_interleave(G)


def difficulty_weight(e: torch.Tensor, cfg: LengthConfig) -> torch.Tensor:
    """w(e) = w_min + (w_max − w_min)·e^γ: monotone in the easiness e, detached."""
    e = e.detach().to(torch.float64).clamp(0.0, 1.0)
    return cfg.w_min + (cfg.w_max - cfg.w_min) * e.pow(cfg.gamma)


def ema_easiness(previous: torch.Tensor | None, current: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """Running easiness of a prompt (``difficulty.source: ema``): m·previous + (1 − m)·current; the first visit
    takes ``current``."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"difficulty.momentum must be in [0, 1), got {momentum}")
    current = current.detach().to(torch.float64)
    return current if previous is None else momentum * previous.to(torch.float64) + (1 - momentum) * current


def length_reward(
    cfg: LengthConfig,
    length: torch.Tensor,
    G: int | None = None,
    quality: dict[str, torch.Tensor] | None = None,
    active: dict[str, torch.Tensor] | None = None,
    capped: torch.Tensor | None = None,
    easiness_override: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """R_len per row (float64 (N,), no gradient) for the configured mode, plus ``weight`` w(e) and ``easiness`` in
    adaptive mode (for logging). ``length`` (N,) is the CoT length in ``cfg.unit``. Adaptive mode estimates e from
    ``quality``/``active`` in groups of ``G``, or takes ``easiness_override`` (N,) (offline or EMA sources)."""
    length = length.detach().to(torch.float64)
    zeros = torch.zeros_like(length)
    if cfg.mode == "none":
        return {"reward": zeros}
    if cfg.mode == "cap":
        if capped is None:
            raise ValueError("length.mode 'cap' needs capped (the per-row cut flags from cap_cot)")
        return {"reward": -cfg.cap_penalty * capped.to(torch.float64)}
    phi = shape_fn(length, cfg)
    if cfg.mode == "target":
        return {"reward": -cfg.alpha * phi}
    if easiness_override is not None:
        e = easiness_override.detach().to(torch.float64)
    elif cfg.difficulty_source != "group":
        raise ValueError(f"length.difficulty_source {cfg.difficulty_source!r} needs easiness_override (the prompt's "
                         "stored easiness); use 'group' to estimate it from the rollouts' quality rewards")
    elif quality is None or G is None:
        raise ValueError("length.mode 'adaptive' needs quality rewards and G (or an easiness_override)")
    else:
        e = easiness(quality, G, cfg.ranges, active)
    if e.shape != length.shape:
        raise ValueError(f"easiness {tuple(e.shape)} and length {tuple(length.shape)} must match")
    w = difficulty_weight(e, cfg)
    return {"reward": -cfg.alpha * w * phi, "weight": w, "easiness": e}


def apply_length_mode(
    cfg: LengthConfig,
    cot_ids: torch.Tensor,
    cot_mask: torch.Tensor,
    texts: Sequence[str],
    eos_token_id: int,
    decode: Callable[[list[int]], str] | None = None,
    G: int | None = None,
    quality: dict[str, torch.Tensor] | None = None,
    active: dict[str, torch.Tensor] | None = None,
    easiness_override: torch.Tensor | None = None,
) -> dict[str, object]:
    """The length stage of a rollout, on the CoT segment only (image tokens are no argument).

    CapLength cuts first (it needs ``decode``), then lengths are counted on what remains and R_len is computed.
    Returns ``mask`` (CoT mask after the cut), ``texts`` (the CoTs that enter the image prompts), ``capped`` (N,)
    bool, ``words``, ``tokens``, ``length`` (N,) and the entries of ``length_reward`` (``reward``, …).
    """
    capped = torch.zeros(cot_ids.shape[0], dtype=torch.bool)
    mask, texts = cot_mask, list(texts)
    if cfg.mode == "cap":
        if decode is None:
            raise ValueError("length.mode 'cap' needs decode (token ids -> text): the cut CoT enters the image prompt")
        cut = cap_cot(cot_ids, cot_mask, cfg, eos_token_id, decode)
        mask, texts, capped = cut["mask"], cut["texts"], cut["capped"]
    counts = cot_lengths(texts, cot_ids, mask, eos_token_id, cfg.unit)
    reward = length_reward(cfg, counts["length"], G, quality, active, capped, easiness_override)
    return {"mask": mask, "texts": texts, "capped": capped, **counts, **reward}
