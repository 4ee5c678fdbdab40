"""DMD2 pure functions (lightning_modules/defocus/dmd2.py) on hand-checkable numbers (spec §8, §15 items 1-5)."""

from __future__ import annotations

import math

import pytest
import torch
from ctrlgen.lightning_modules.defocus import dmd2


def test_scaled_linear_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ours = dmd2.scaled_linear_alphas()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.allclose(ours.float(), ref, rtol=1e-6, atol=1e-7)
    assert ours[0].item() == pytest.approx(1 - 0.00085)


def test_add_noise_and_eps_to_x0_invert_each_other():
    alphas = torch.tensor([0.25, 0.64], dtype=torch.float64)  # √ᾱ = 0.5, 0.8; √(1−ᾱ) = √0.75, 0.6
    x0, eps = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)
    t = torch.tensor([0, 1])
    xt = dmd2.add_noise(x0, eps, t, alphas)
    assert xt.flatten().tolist() == pytest.approx([0.5 + 2 * math.sqrt(0.75), 0.8 + 1.2])
    back = dmd2.eps_to_x0(xt, eps, t, alphas)
    assert back.dtype == torch.float32 and torch.allclose(back, x0, atol=1e-6)


def test_cfg():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert dmd2.cfg(u, c, 8.0).item() == 17.0 and dmd2.cfg(u, c, 1.0).item() == 3.0


def test_dm_gradient_hand_numbers_and_nan_guard():
    x0 = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])       # (2, 1, 1, 2)
    real = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])     # p_real = (1, 2) → mean|·| = 1.5; sample 2: 0 → NaN
    fake = torch.tensor([[[[1.5, 1.0]]], [[[1.0, 1.0]]]])
    g = dmd2.dm_gradient(x0, fake, real)
    assert g[0].flatten().tolist() == pytest.approx([1.5 / 1.5, 0.0])  # (fake − real) / 1.5
    assert torch.isfinite(g).all()


def test_dm_loss_gradient_is_grad_over_numel():
    x0 = torch.randn(2, 4, 3, 3, requires_grad=True)
    grad = torch.randn(2, 4, 3, 3)
    loss = dmd2.dm_loss(x0, grad)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.allclose(x0.grad, grad / x0.numel(), atol=1e-7)


def test_timestep_ranges_are_inclusive():
    gen = torch.Generator().manual_seed(0)
    dm = dmd2.sample_timesteps(20000, dmd2.DM_RANGE, gen)
    full = dmd2.sample_timesteps(20000, dmd2.FULL_RANGE, gen)
    assert dm.min().item() == 20 and dm.max().item() == 980
    assert full.min().item() == 0 and full.max().item() == 999
    assert dmd2.sample_timesteps(3, (5, 5), gen).tolist() == [5, 5, 5]


def test_gan_losses():
    zero = torch.zeros(3)
    assert dmd2.gan_d_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert dmd2.gan_g_loss(zero).item() == pytest.approx(math.log(2))
    # a confident, correct discriminator: real → +10, fake → −10: loss ≈ 2·softplus(−10)
    assert dmd2.gan_d_loss(torch.full((2,), 10.0), torch.full((2,), -10.0)).item() == pytest.approx(
        2 * math.log1p(math.exp(-10)), rel=1e-4)
    assert dmd2.gan_g_loss(torch.full((2,), -10.0)).item() == pytest.approx(math.log1p(math.exp(10)), rel=1e-5)


def test_generator_timesteps():
    assert dmd2.generator_timesteps(4) == [999, 749, 499, 249]
    assert dmd2.generator_timesteps(2) == [999, 499]
    assert dmd2.generator_timesteps(1) == [399]
    with pytest.raises(ValueError):
        dmd2.generator_timesteps(0)


def _recording_denoiser(seen):
    def denoise(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)  # ε = 0 → x0 = x_t / √ᾱ_t
    return denoise


def test_backward_simulation_runs_k_steps_and_returns_t_k():
    alphas = dmd2.scaled_linear_alphas()
    ts = dmd2.generator_timesteps(4)
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        seen: list[int] = []
        x, t = dmd2.backward_simulate(_recording_denoiser(seen), noise, ts, k, alphas, torch.Generator().manual_seed(1))
        assert seen == ts[:k] and t.tolist() == [ts[k]] * 3
        if k == 0:
            assert x is noise  # pure noise at 999
    # ε = 0 and one step: x0 = noise/√ᾱ_999, then x_749 = √ᾱ_749·x0 + √(1−ᾱ_749)·ε' with the generator's fresh ε'
    gen = torch.Generator().manual_seed(1)
    x, _ = dmd2.backward_simulate(_recording_denoiser([]), noise, ts, 1, alphas, gen)
    eps2 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    x0 = noise.double() / alphas[999].sqrt()
    want = alphas[749].sqrt() * x0 + (1 - alphas[749]).sqrt() * eps2.double()
    assert torch.allclose(x.double(), want, atol=1e-5)
    with pytest.raises(ValueError):
        dmd2.backward_simulate(_recording_denoiser([]), noise, ts, 4, alphas)


def test_few_step_sample_calls_every_timestep_once():
    seen: list[int] = []
    out = dmd2.few_step_sample(_recording_denoiser(seen), torch.zeros(1, 4, 2, 2), [999, 749, 499, 249],
                               dmd2.scaled_linear_alphas(), torch.Generator().manual_seed(0))
    assert seen == [999, 749, 499, 249] and out.shape == (1, 4, 2, 2)


def test_backsim_index_is_a_function_of_the_generator_seed():
    draws = [dmd2.backsim_index(4, torch.Generator().manual_seed(s)) for s in range(64)]
    assert draws == [dmd2.backsim_index(4, torch.Generator().manual_seed(s)) for s in range(64)]
    assert set(draws) == {0, 1, 2, 3}
