"""CPU cost of the layered defocus renderer vs the brute-force gather reference (spec defocus.md §3, issue 15 bench).

One scene at ``--size``² (smooth texture, depth ramp 0.7 m → 40 m plus a near square, 85 mm f/1.4 focused at 2 m, so
radii span −R…+R with R = 32 · size / 1024 px) is rendered by ``LayeredThinLens`` and ``GatherReference`` alternately
within one run: ``--repeats`` timed passes each after one warm-up, forward alone (no grad) and forward + backward
(gradients w.r.t. image, depth and the four lens parameters). Reports the median and min ms, the ratio gather /
layered and the PSNR between the two renders (they differ at the square's edge, where only the layered renderer
occludes).

    python bench/bench_defocus_render.py --size 256 --repeats 5 [--max-radius-px 64]

The gather's cost grows with R² (its window), the layered renderer's with the number of levels (≈ log R) when the
convolutions run by FFT, so the ratio grows with the radius clamp.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import emit


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    p.add_argument("--max-radius-px", type=float, default=32.0,
                   help="lens.max_radius_px (stated at 1024 px; R = this · size / 1024)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


def scene(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Texture (1, 3, S, S) in [0.1, 0.9] and depth (1, 1, S, S) in m: a left-to-right ramp in inverse depth and a
    near square (0.7 m) in the upper-left quarter."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.zeros(1, 3, size, size)
    for _ in range(6):
        f = (torch.rand(2, 1, 3, 1, 1, generator=g) - 0.5) * (40.0 / size)
        img = img + torch.sin(f[0] * yy + f[1] * xx + 6.28 * torch.rand(1, 3, 1, 1, generator=g))
    img = (0.5 + 0.4 * img / 6 + 0.05 * (torch.rand(1, 3, size, size, generator=g) - 0.5)).clamp(0, 1)
    t = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(1, 1, size, size)
    depth = (1.0 / (1 / 0.7 + t * (1 / 40.0 - 1 / 0.7))).contiguous()
    q = size // 4
    depth[..., q:2 * q, q:2 * q] = 0.7
    return img, depth


def main(argv=None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    from ctrlgen.lightning_modules.defocus import GatherReference, LayeredThinLens

    img, depth = scene(a.size)
    lens = (1.4, 85.0, 2.0, 1.0)  # the renderer's argument order: N, f35 (mm), d_f (m), s
    renderers = {"layered": LayeredThinLens(max_radius_px=a.max_radius_px),
                 "gather": GatherReference(max_radius_px=a.max_radius_px)}

    def forward(r):
        with torch.no_grad():
            return r.render(img, depth, *lens)

    def forward_backward(r):
        leaves = [img.clone().requires_grad_(), depth.clone().requires_grad_()]
        params = [torch.tensor([v], requires_grad=True) for v in lens]
        out = r.render(leaves[0], leaves[1], *params)
        out.square().mean().backward()
        grads = [t.grad for t in leaves + params]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads), "missing or non-finite gradient"
        return out

    times: dict[str, list[float]] = {f"{n}_{k}": [] for n in renderers for k in ("fwd", "fwd_bwd")}
    outs = {}
    for rep in range(a.repeats + 1):  # the first pass of each is a warm-up and is dropped
        for name, r in renderers.items():
            for kind, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
                t0 = time.perf_counter()
                out = fn(r)
                dt = time.perf_counter() - t0
                if rep:
                    times[f"{name}_{kind}"].append(dt * 1e3)
                outs[name] = out.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    full = renderers["layered"].render_full(img, depth, *lens)
    mse = float((outs["layered"] - outs["gather"]).pow(2).mean())
    res = {
        "size": a.size, "repeats": a.repeats, "threads": a.threads,
        "max_radius_px": renderers["layered"].max_radius(a.size),
        "levels": len(renderers["layered"].grid(renderers["layered"].max_radius(a.size))),
        "clamped_fraction": float(full.clamped_fraction), "median_ms": med, "min_ms": best,
        "gather_over_layered_fwd": med["gather_fwd"] / med["layered_fwd"],
        "gather_over_layered_fwd_bwd": med["gather_fwd_bwd"] / med["layered_fwd_bwd"],
        "gather_over_layered_fwd_min": best["gather_fwd"] / best["layered_fwd"],
        "gather_over_layered_fwd_bwd_min": best["gather_fwd_bwd"] / best["layered_fwd_bwd"],
        "psnr_layered_vs_gather_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
    }
    print(f"size {a.size}², {res['levels']} levels, R = {res['max_radius_px']:.1f} px, clamped "
          f"{res['clamped_fraction']:.3f}, {a.threads} threads, median of {a.repeats}")
    print("| renderer | forward ms (median / min) | forward + backward ms (median / min) |\n|---|---|---|")
    for n in renderers:
        print(f"| {n} | {med[n + '_fwd']:.1f} / {best[n + '_fwd']:.1f} | {med[n + '_fwd_bwd']:.1f} / "
              f"{best[n + '_fwd_bwd']:.1f} |")
    print(f"gather / layered (median; min): forward {res['gather_over_layered_fwd']:.2f}× "
          f"({res['gather_over_layered_fwd_min']:.2f}×), forward + backward {res['gather_over_layered_fwd_bwd']:.2f}× "
          f"({res['gather_over_layered_fwd_bwd_min']:.2f}×); PSNR layered vs gather "
          f"{res['psnr_layered_vs_gather_db']:.1f} dB")
    return emit(res, a.json)


if __name__ == "__main__":
    main()
