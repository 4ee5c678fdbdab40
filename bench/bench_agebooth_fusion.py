"""CPU cost of AgeBooth LoRA fusion at inference: materialised fused adapters vs rebuilding ΔW on every UNet call.

A small random ``UNet2DConditionModel`` (SD-style attention blocks) with two random rank-``--rank`` age LoRAs on
``to_q/to_k/to_v/to_out.0`` runs UNet forwards in these variants, measured alternately in one run:

* ``bare``        — the UNet without LoRA (the reference); ``bare_again``, a second copy, shows the timing noise;
* ``merged``      — SVDMix(α) materialised once and added into the base weights (``AgeFusion.apply(merge=True)``);
* ``adapter``     — SVDMix(α) materialised once as one rank-r peft adapter ``age_mix`` (factored LoRA path);
* ``set_adapters`` — linear fusion through diffusers ``set_adapters(["young", "old"], [α, 1 − α])`` (two adapters);
* ``per_call``    — the released code's behaviour: every LoRA'd linear rebuilds the SVDMix factors and the dense
  ΔW(α) from cached SVDs on every call, then adds a second full-width matmul (agebooth.md §9).

Reports the median and the minimum ms per forward over the rounds and each variant's ratio to ``bare``; the target
is merged ≤ 1.05× bare. On a shared CPU the minimum is the steadier figure.

    python bench/bench_agebooth_fusion.py --repeats 21 --calls 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[128, 256])
    p.add_argument("--latent", type=int, default=16, help="latent side (px / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=21, help="alternating rounds; the median round counts")
    p.add_argument("--calls", type=int, default=2, help="UNet forwards per variant and round")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def small_unet(channels, cross_dim: int = 64, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cross = ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                                layers_per_block=1, down_block_types=(*cross, "DownBlock2D"),
                                up_block_types=("UpBlock2D", *(("CrossAttnUpBlock2D",) * len(cross))),
                                cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=16,
                                transformer_layers_per_block=2).eval()


def random_lora(unet, rank: int, seed: int):
    import torch

    from ctrlgen.lightning_modules.common.lora import LoraFactors

    g = torch.Generator().manual_seed(seed)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    return {n: LoraFactors(torch.randn(rank, m.in_features, generator=g) / rank,
                           torch.randn(m.out_features, rank, generator=g) * 0.01)
            for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(targets)}


def per_call_unet(unet, young, svds, alpha: float):
    """Wrap every LoRA'd linear so that each call rebuilds SVDMix's factors and the dense ΔW from the cached factor
    SVDs ``svds`` = (young, old) (the released behaviour)."""
    import torch.nn.functional as F

    from ctrlgen.lightning_modules.agebooth import fusion

    for path in young:
        lin = unet.get_submodule(path)

        def forward(x, lin=lin, sy=svds[0][path], so=svds[1][path]):
            dw = fusion.svdmix_layer(sy, so, alpha).delta()
            return F.linear(x, lin.weight, lin.bias) + F.linear(x, dw)

        lin.forward = forward
    return unet


def main(argv=None) -> dict:
    a = parse(argv)
    import torch

    from ctrlgen.lightning_modules.agebooth.adapters import AgeFusion
    from ctrlgen.lightning_modules.common.lora import add_lora_factors

    torch.set_num_threads(a.threads)
    young, old = random_lora(small_unet(a.channels), a.rank, 1), random_lora(small_unet(a.channels), a.rank, 2)
    age = AgeFusion(young, old, "svdmix")
    unets = {"bare": small_unet(a.channels), "bare_again": small_unet(a.channels)}  # the second: noise floor
    unets["merged"] = small_unet(a.channels)
    age.apply(unets["merged"], a.alpha, merge=True)
    unets["adapter"] = small_unet(a.channels)
    age.apply(unets["adapter"], a.alpha)
    both = small_unet(a.channels)
    add_lora_factors(both, young, "young")
    add_lora_factors(both, old, "old")
    both.set_adapters(["young", "old"], weights=[a.alpha, 1 - a.alpha])
    unets["set_adapters"] = both
    unets["per_call"] = per_call_unet(small_unet(a.channels), young, age._svds, a.alpha)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 4, a.latent, a.latent, generator=g)
    t = torch.full((a.batch,), 500)
    ctx = torch.randn(a.batch, 77, 64, generator=g)
    times = {k: [] for k in unets}
    with torch.no_grad():
        ref = unets["per_call"](x, t, encoder_hidden_states=ctx).sample
        check = {k: ((unets[k](x, t, encoder_hidden_states=ctx).sample - ref).norm() / ref.norm()).item()
                 for k in ("merged", "adapter")}
        for unet in unets.values():  # warm-up
            unet(x, t, encoder_hidden_states=ctx)
        names = list(unets)
        for i in range(a.repeats):
            for k in names[i % len(names):] + names[: i % len(names)]:  # rotate the order: no variant always first
                unet = unets[k]
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    unet(x, t, encoder_hidden_states=ctx)
                times[k].append((time.perf_counter() - t0) / a.calls * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_layers, dense = len(young), sum(f.up.shape[0] * f.down.shape[1] for f in young.values())
    print(f"small UNet channels {a.channels}, latent {a.latent}², batch {a.batch}, rank {a.rank}, α {a.alpha}, "
          f"{n_layers} LoRA'd linears ({dense:,} dense ΔW elements per rebuild), {a.threads} thread(s), "
          f"{a.repeats} rounds × {a.calls} calls")
    print(f"materialised vs per-call output, relative L2: merged {check['merged']:.1e}, adapter {check['adapter']:.1e}")
    best = {k: min(v) for k, v in times.items()}
    print("| variant | median ms / forward | × bare (median) | min ms | × bare (min) |")
    print("|---|---|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.1f} | {med[k] / med['bare']:.3f} | {best[k]:.1f} | {best[k] / best['bare']:.3f} |")
    out = {"median_ms": med, "ratio_to_bare": {k: med[k] / med["bare"] for k in med},
           "min_ratio_to_bare": {k: best[k] / best["bare"] for k in best}, "check_rel_l2": check}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
