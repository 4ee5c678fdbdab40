"""Sampling the age-LoRA'd UNet and the α sweep (agebooth.md §7–§9), as plain functions on components.

- :func:`denoise`: a deterministic DDIM loop (η = 0) from given initial noise with classifier-free guidance on
  prompt embeddings (SD: ``prompt_embeds``; SDXL: plus ``pooled_prompt_embeds`` and time ids), decoding with the VAE
  when there is one (else the UNet works in pixel space, the demo's tiny model).
- :func:`alpha_sweep`: for each α, materialise the fused adapter once (``AgeFusion.apply``), blend the young/old
  prompt embeddings with the same α (``prompts.fuse_prompt_embeds``) and denoise the *same* noise; returns the images
  and ``target_age(α) = 75 − 60α``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ctrlgen.lightning_modules.agebooth.prompts import fuse_prompt_embeds
from ctrlgen.lightning_modules.agebooth.text import sdxl_time_ids
from torch import nn

AGE_YOUNG, AGE_OLD = 15.0, 75.0  # agebooth.md §7 anchors: α = 1 → 15 y, α = 0 → 75 y
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def target_age(alpha: float, young: float = AGE_YOUNG, old: float = AGE_OLD) -> float:
    """The age α asks for: ``old − (old − young)·α`` (75 − 60α with the paper's anchors)."""
    return old - (old - young) * float(alpha)


def alpha_for_age(age: float, young: float = AGE_YOUNG, old: float = AGE_OLD) -> float:
    """Inverse of :func:`target_age`, clamped to [0, 1]."""
    return min(1.0, max(0.0, (old - float(age)) / (old - young)))


def ddim(scheduler_config: Mapping, steps: int):
    """A DDIM scheduler (η = 0 when stepped with the default) from a training scheduler's config."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(steps)
    return sched


def _cond(embeds: Mapping[str, torch.Tensor], resolution: int) -> tuple[torch.Tensor, dict | None]:
    e = embeds["prompt_embeds"]
    if embeds.get("pooled_prompt_embeds") is None:
        return e, None
    return e, {"text_embeds": embeds["pooled_prompt_embeds"],
               "time_ids": sdxl_time_ids(resolution, e.shape[0], e.device, e.dtype)}


@torch.no_grad()
def denoise(unet: nn.Module, scheduler_config: Mapping, noise: torch.Tensor, embeds: Mapping[str, torch.Tensor],
            uncond: Mapping[str, torch.Tensor] | None = None, guidance: float = 1.0, steps: int = 25,
            vae: nn.Module | None = None, resolution: int | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from ``noise`` (B, C, h, w). ``embeds``/``uncond``: conditional and
    unconditional encodings (batch 1 or B); CFG runs both in one batch when ``guidance != 1``."""
    sched = ddim(scheduler_config, steps)
    b = noise.shape[0]
    res = resolution or noise.shape[-1] * (8 if vae is not None else 1)
    pairs = [embeds] + ([uncond] if guidance != 1.0 and uncond is not None else [])
    enc = [_cond({k: v.expand(b, *v.shape[1:]) for k, v in e.items() if v is not None}, res) for e in pairs]
    ehs = torch.cat([h for h, _ in enc])
    added = None if enc[0][1] is None else {k: torch.cat([a[k] for _, a in enc]) for k in enc[0][1]}
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x] * len(enc)), t)
        out = unet(inp, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        if len(enc) == 2:
            c, u = out.chunk(2)
            out = u + guidance * (c - u)
        x = sched.step(out, t, x).prev_sample
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return x.clamp(-1, 1)


@torch.no_grad()
def alpha_sweep(unet: nn.Module, fusion, encode: Callable[[list[str]], dict], young_prompt: str, old_prompt: str,
                noise: torch.Tensor, scheduler_config: Mapping, alphas: Sequence[float] = DEFAULT_ALPHAS,
                mode: str | None = None, guidance: float = 1.0, steps: int = 25, vae: nn.Module | None = None,
                negative_prompt: str = "") -> list[dict]:
    """One row per α: ``{"alpha", "target_age", "images"}`` (images (B, 3, H, W) in [-1, 1], the same noise for
    every α). ``fusion``: an ``AgeFusion`` (its mode unless ``mode``); ``encode``: prompts → embeddings. The
    negative encoding is not blended (agebooth.md §6)."""
    young, old = encode([young_prompt]), encode([old_prompt])
    uncond = encode([negative_prompt]) if guidance != 1.0 else None
    rows = []
    for a in alphas:
        fusion.apply(unet, float(a), mode)
        emb = fuse_prompt_embeds(young, old, float(a))
        imgs = denoise(unet, scheduler_config, noise, emb, uncond, guidance, steps, vae)
        rows.append({"alpha": float(a), "target_age": target_age(a), "images": imgs})
    return rows
