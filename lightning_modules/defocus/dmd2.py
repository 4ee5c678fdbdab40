"""DMD2 math as small pure functions (spec shared/specs/defocus.md §8, §15; [ref-code] tianweiy/DMD2 8d8fa55).

Noise schedule (DDPM, ε-prediction): ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` (:func:`add_noise`, diffusers' ``add_noise``) and
its inverse ``x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t`` computed in float64, cast to float32 (:func:`eps_to_x0`, main/utils.py
``get_x0_from_noise``). :func:`scaled_linear_alphas` is the SD/SDXL schedule (β 0.00085 → 0.012, 1000 steps).

Distribution matching (main/sd_guidance.py ``compute_distribution_matching_loss``): with p_real = x0 − x̂0_real and
p_fake = x0 − x̂0_fake, ``grad = (p_real − p_fake) / mean_{C,H,W}|p_real|`` per sample, NaN → 0
(:func:`dm_gradient`), and the surrogate ``0.5·MSE_mean(x0, stopgrad(x0 − grad))`` whose gradient w.r.t. x0 is
``grad / x0.numel()`` (:func:`dm_loss`). Real score with classifier-free guidance ``ε_u + w(ε_c − ε_u)`` (:func:`cfg`);
the fake score is used without guidance.

Timesteps: DM loss ``t ~ U{20…980}`` (0.02/0.98 × 1000), fake-score loss and GAN noise ``t ~ U{0…999}``
(:func:`sample_timesteps` with :data:`DM_RANGE` / :data:`FULL_RANGE`, both ends inclusive).

GAN on the fake-score bottleneck, non-saturating softplus losses: discriminator ``softplus(l_fake) +
softplus(−l_real)`` (:func:`gan_d_loss`), generator ``softplus(−l_fake)`` (:func:`gan_g_loss`).

Few-step generator: timesteps ``range(T−1, 0, −T//n)`` = 999/749/499/249 for 4 steps, 399 for 1 step
(:func:`generator_timesteps`); sampling predicts x0 and re-noises to the next timestep with fresh noise
(:func:`few_step_sample`); backward simulation runs the first ``k`` of those steps without grad and returns the noisy
input at ``t_k`` (pure noise at 999 for k = 0) that the trainable generator forward then sees
(:func:`backward_simulate`). ``k`` is a rank-identical draw (:func:`backsim_index`, from a generator every rank seeds
alike).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DM_RANGE = (20, 980)   # [ref-code] min_step = 0.02·T, max_step = 0.98·T, both inclusive
FULL_RANGE = (0, 999)  # [ref-code] fake-score loss and GAN noise
ONE_STEP_T = 399       # [ref-code] conditioning timestep of the 1-step generator

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> ε prediction


def scaled_linear_alphas(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> torch.Tensor:
    """ᾱ_t (float64, (steps,)) of the scaled-linear schedule: β = linspace(√β0, √β1)², ᾱ = cumprod(1 − β)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _at(alphas: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas.to(device=like.device, dtype=torch.float64)[t.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``√ᾱ_t·x0 + √(1−ᾱ_t)·noise`` per sample (t: (B,) ints), in the dtype of ``x0``; differentiable in x0."""
    a = _at(alphas, t, x0).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise.to(x0.dtype)


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``(x_t − √(1−ᾱ_t)·ε)/√ᾱ_t`` in float64, returned as float32 (the reference's precision)."""
    a = _at(alphas, t, x_t)
    return ((x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).float()


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``ε_u + w(ε_c − ε_u)``; w = 1 gives ``ε_c``."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def dm_gradient(x0: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching gradient ``(x̂0_fake − x̂0_real) / mean_{C,H,W}|x0 − x̂0_real|`` per
    sample, NaN → 0 (no grad: call on detached tensors)."""
    p_real = x0 - x0_real
    p_fake = x0 - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / norm)


def dm_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Surrogate ``0.5·mean((x0 − stopgrad(x0 − grad))²)`` in float32: ∂/∂x0 = grad / x0.numel()."""
    target = (x0 - grad).detach().float()
    return 0.5 * F.mse_loss(x0.float(), target, reduction="mean")


def sample_timesteps(n: int, bounds: Sequence[int], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` integer timesteps uniform on ``{lo … hi}`` (both inclusive), drawn on ``generator``'s device."""
    lo, hi = int(bounds[0]), int(bounds[1])
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(lo, hi + 1, (n,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def gan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator side: ``mean softplus(l_fake) + mean softplus(−l_real)``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side (non-saturating): ``mean softplus(−l_fake)``."""
    return F.softplus(-logits_fake.float()).mean()


def generator_timesteps(num_steps: int = 4, num_train_timesteps: int = 1000) -> list[int]:
    """The few-step generator's timesteps: ``range(T−1, 0, −T//n)`` (4 → 999/749/499/249, 2 → 999/499), and
    ``[399]`` for one step ([ref-code])."""
    if num_steps < 1:
        raise ValueError(f"generator num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [ONE_STEP_T]
    ts = list(range(num_train_timesteps - 1, 0, -(num_train_timesteps // num_steps)))
    return ts[:num_steps]


def backsim_index(num_steps: int, generator: torch.Generator) -> int:
    """The backward-simulation depth k ∈ {0 … num_steps−1}: one draw from ``generator`` (seeded alike on every
    rank)."""
    return int(torch.randint(num_steps, (1,), generator=generator))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def backward_simulate(denoise: Denoiser, noise: torch.Tensor, timesteps: Sequence[int], k: int, alphas: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first ``k`` generator steps from ``noise`` without grad (x0 = G(x, t_i), re-noise to t_{i+1} with fresh
    noise) and return ``(x at t_k, t_k as (B,))``; k = 0 returns ``noise`` at ``t_0``."""
    if not 0 <= k < len(timesteps):
        raise ValueError(f"backward simulation depth {k} outside 0..{len(timesteps) - 1}")
    b = noise.shape[0]
    x = noise
    for i in range(k):
        t = torch.full((b,), timesteps[i], device=noise.device, dtype=torch.long)
        x0 = eps_to_x0(x, denoise(x, t), t, alphas).to(noise.dtype)
        t_next = torch.full((b,), timesteps[i + 1], device=noise.device, dtype=torch.long)
        x = add_noise(x0, _randn_like(x0, generator), t_next, alphas)
    return x, torch.full((b,), timesteps[k], device=noise.device, dtype=torch.long)


@torch.no_grad()
def few_step_sample(denoise: Denoiser, noise: torch.Tensor, timesteps: Sequence[int], alphas: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step sampling without CFG: backward simulation through all but the last step, then the last x0."""
    x, t = backward_simulate(denoise, noise, timesteps, len(timesteps) - 1, alphas, generator)
    return eps_to_x0(x, denoise(x, t), t, alphas).to(noise.dtype)
