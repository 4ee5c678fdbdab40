"""GRPO loss maths for ShortCoTI, as pure functions (shared/specs/shortcoti.md §2.4, §3.1, §5).

The per-token objective and its reductions follow trl 1.16.0 ``GRPOTrainer._compute_loss`` (the tests call TRL's own
method as an oracle). With per-token log-probs ``logp`` of the policy, ``old`` of the policy that sampled the rollout
(``logp.detach()`` when μ = 1) and ``ref`` of the reference policy:

- ratio ρ_t = exp(logp_t − old_t); surrogate ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A), with ρ_t capped at
  ``delta`` in the first branch when it is set (two-sided clipping);
- k3 KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1, optionally multiplied by ρ_t (``kl_bias_correction``, TRL's
  ``use_bias_correction_kl``: same value at ρ = 1, different gradient); ℓ_t += β·KL_t;
- reductions over the completion mask m, for one micro-batch of B rows within an accumulation window of GA
  micro-batches: ``grpo`` mean over rows of Σ_t ℓm / Σ_t m, / GA; ``bnpo`` Σ ℓm / Σ m, / GA; ``dr_grpo``
  Σ ℓm / (B · max_completion_length), / GA; ``dapo`` Σ ℓm / (N / P · GA / S), N = active tokens of the whole
  generation batch (all its micro-batches, all P processes), S = micro-batches per generation batch. With S = GA the
  window's summed dapo loss is the token mean over the window (P = 1).

T2I-R1 mode: CoT and image segments of a row concatenated along time, ``bnpo``, β 0.01, no KL correction, μ = 1
(old = logp.detach(), so ρ ≡ 1 in value and only its gradient acts). Group advantages are shared GRPO code:
``ctrlgen.lightning_modules.common.rollouts.group_advantages`` (``scale_rewards`` group | batch | none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class LossConfig:
    """GRPO loss knobs (``model.init_args.loss.*``); the defaults are T2I-R1's (spec §2.4, §3.1).

    ``type``: one of LOSS_TYPES; ``beta``: KL weight; ``epsilon``/``epsilon_high``: lower/upper clip range
    (``epsilon_high=None`` → ``epsilon``; inert at μ = 1); ``delta``: upper cap of the unclipped ratio (None: off);
    ``kl_bias_correction``: multiply the k3 KL by the ratio; ``num_iterations``: μ, updates per rollout buffer;
    ``max_completion_length``: the ``dr_grpo`` normaliser (tokens per row, the generation budget).
    """

    type: str = "bnpo"
    beta: float = 0.01
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    kl_bias_correction: bool = False
    num_iterations: int = 1
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type must be one of {LOSS_TYPES}, got {self.type!r}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"loss.beta/epsilon/epsilon_high must be >= 0, got {self.beta}/{self.epsilon}/"
                             f"{self.epsilon_high}")
        if self.num_iterations < 1:
            raise ValueError(f"loss.num_iterations (μ) must be >= 1, got {self.num_iterations}")
        if self.type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("loss.type 'dr_grpo' needs loss.max_completion_length (tokens per row, e.g. CoT max new "
                             "tokens + image tokens)")

    @classmethod
    def t2i_r1(cls) -> LossConfig:
        """T2I-R1's loss: bnpo, β 0.01, no KL correction, μ = 1."""
        return cls(type="bnpo", beta=0.01, kl_bias_correction=False, num_iterations=1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``ids``: logits (..., V), ids (...) → (...).

    Half-precision logits are promoted to float32 (a log-softmax in bfloat16 loses the small differences GRPO needs).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} must agree up to the vocab axis")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def completion_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of a completion from a causal forward over [prompt; completion].

    logits (B, P + C, V) predict the next token, so completion token j is scored by position P − 1 + j;
    completion_ids (B, C) → (B, C).
    """
    C = completion_ids.shape[1]
    if logits.ndim != 3 or logits.shape[1] <= C:
        raise ValueError(f"logits must be (B, P + C, V) with a prompt of >= 1 token; got {tuple(logits.shape)} for "
                         f"C = {C}")
    return token_logprobs(logits[:, -C - 1:-1], completion_ids, temperature)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (..., V) → (...), for logging."""
    logp = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits) / temperature
    logp = logp.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(ref − logp) − (ref − logp) − 1 (≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus β·KL per token: logp (B, T), advantages (B,) or (B, T) → ℓ (B, T) and the per-token
    ``ratio``, ``kl`` (zeros when β = 0), ``low_clipped`` and ``high_clipped`` (TRL's clip indicators), detached."""
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} and logp {tuple(logp.shape)} need the same rows")
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    kl = torch.zeros_like(logp)
    if cfg.beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference policy's per-token log-probs)")
        kl = k3_kl(logp, ref_logp)
        if cfg.kl_bias_correction:
            kl = kl * ratio
        loss = loss + cfg.beta * kl
    stats = {
        "ratio": ratio.detach(),
        "kl": kl.detach(),
        "low_clipped": ((ratio < 1 - eps_low) & (advantages < 0)).detach(),
        "high_clipped": ((ratio > 1 + eps_high) & (advantages > 0)).detach(),
    }
    return loss, stats


def reduce_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    accumulation_steps: int = 1,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
) -> torch.Tensor:
    """One micro-batch's loss from per-token ℓ (B, T) and mask (B, T), per the module docstring's reductions.

    ``num_items`` (dapo only): active tokens of the whole generation batch over all processes; None → this
    micro-batch's own count (it is then its own generation batch: leave ``steps_per_generation`` at 1).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if accumulation_steps < 1 or steps_per_generation < 1 or num_processes < 1:
        raise ValueError("accumulation_steps, steps_per_generation and num_processes must be >= 1, got "
                         f"{accumulation_steps}, {steps_per_generation}, {num_processes}")
    mask = mask.to(loss.dtype)
    masked = loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss type 'dr_grpo' needs max_completion_length (tokens per row)")
        return masked.sum() / (loss.shape[0] * max_completion_length) / accumulation_steps
    n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=loss.dtype, device=loss.device)
    normaliser = n.clamp(min=1.0) / num_processes * accumulation_steps / steps_per_generation
    return masked.sum() / normaliser


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / Σ m (0 when the mask is empty), detached."""
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return ((x.to(m.dtype) * m).sum() / m.sum().clamp(min=1.0)).detach()


def grpo_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    accumulation_steps: int = 1,
    num_items: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch and its logging metrics (token means over the mask: ``kl``,
    ``clip_ratio/low``, ``clip_ratio/high``, ``clip_ratio/region``, ``ratio``)."""
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must have the same shape")
    per_token, stats = per_token_loss(logp, advantages, cfg, old_logp, ref_logp)
    loss = reduce_loss(per_token, mask, cfg.type, accumulation_steps, cfg.max_completion_length, num_items,
                       num_processes, steps_per_generation)
    low, high = stats["low_clipped"], stats["high_clipped"]
    metrics = {
        "kl": masked_mean(stats["kl"], mask),
        "clip_ratio/low": masked_mean(low.to(logp.dtype), mask),
        "clip_ratio/high": masked_mean(high.to(logp.dtype), mask),
        "clip_ratio/region": masked_mean((low | high).to(logp.dtype), mask),
        "ratio": masked_mean(stats["ratio"], mask),
    }
    return loss, metrics


def concat_segments(*segments: torch.Tensor | None) -> torch.Tensor | None:
    """Segments of the same rows joined along time (T2I-R1: [CoT | image]); None when every segment is None."""
    present = [s for s in segments if s is not None]
    if not present:
        return None
    if len(present) != len(segments):
        raise ValueError("concat_segments: give every segment or none (a missing segment would shift the others)")
    if len({s.shape[0] for s in present}) != 1:
        raise ValueError(f"segments must share their rows, got {[tuple(s.shape) for s in present]}")
    return torch.cat(present, dim=1)


def t2i_r1_loss(
    cot_logp: torch.Tensor,
    cot_mask: torch.Tensor,
    image_logp: torch.Tensor,
    image_mask: torch.Tensor,
    advantages: torch.Tensor,
    cot_ref_logp: torch.Tensor | None = None,
    image_ref_logp: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
    accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T2I-R1's loss: one token mean over CoT and image tokens together, both segments of a row carrying the row's
    advantage; ``cfg`` defaults to ``LossConfig.t2i_r1()`` (bnpo, β 0.01, μ = 1: no old log-probs)."""
    cfg = LossConfig.t2i_r1() if cfg is None else cfg
    logp = concat_segments(cot_logp, image_logp)
    mask = concat_segments(cot_mask.to(logp.dtype), image_mask.to(logp.dtype))
    ref = concat_segments(cot_ref_logp, image_ref_logp)
    return grpo_loss(logp, mask, advantages, cfg, None, ref, accumulation_steps)
