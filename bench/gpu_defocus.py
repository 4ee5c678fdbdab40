"""GPU latency of the defocus renderers at 1024² (spec defocus.md §3 step 8, §4.12; issue 15 bench). CUDA only.

Cases (one line each, median of ``--repeats`` CUDA-event timings after ``--warmup`` runs; peak memory per case):

* ``{layered,gaussian}_fwd_b1_1024``      forward, no grad: interactive refocus (target < 100 ms per frame)
* ``{layered,gaussian}_fwd_bwd_b1_1024``  forward + backward (grads w.r.t. image, depth, N, f, d_f, s)
* ``layered_fwd_bwd_b4_512``              the training shape (``lens.render_res: 512``, batch 4)
* ``layered_fwd_b1_1024_bf16ac``          forward under bf16 autocast (the renderer keeps fp32 inside)
* checks: CPU vs GPU parity at 128² (max abs ≤ 1e-4), batch independence on the GPU (≤ 1e-5), fp32 output under
  autocast, finite gradients

    python bench/gpu_defocus.py [--repeats 20] [--json out.json]

Exits with a message (status 1) when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import emit


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--target-ms", type=float, default=100.0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def scene(size: int, batch: int = 1, device="cpu"):
    """Texture in [0.1, 0.9] and a depth ramp 0.7 → 40 m with a near square; 50 mm f/1.8 focused at 2 m."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.zeros(batch, 3, size, size)
    for _ in range(6):
        f = (torch.rand(2, batch, 3, 1, 1, generator=g) - 0.5) * (40.0 / size)
        img = img + torch.sin(f[0] * yy + f[1] * xx + 6.28 * torch.rand(batch, 3, 1, 1, generator=g))
    img = (0.5 + 0.4 * img / 6).clamp(0, 1)
    t = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(batch, 1, size, size)
    depth = (1.0 / (1 / 0.7 + t * (1 / 40.0 - 1 / 0.7))).contiguous()
    q = size // 4
    depth[..., q:2 * q, q:2 * q] = 0.7
    return img.to(device), depth.to(device)


def timed(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """Median ms over ``repeats`` CUDA-event timings and the peak memory (GiB) of one call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    return statistics.median(ms), torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> dict:
    a = parse(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_defocus.py needs a CUDA device; none is visible here (run bench/bench_defocus_render.py on CPU)")
    from ctrlgen.lightning_modules.defocus import GaussianLayered, LayeredThinLens

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the lens is an fp32 island; TF32 convolutions would break CPU parity
    lens = (1.8, 50.0, 2.0, 1.0)
    renderers = {"layered": LayeredThinLens(), "gaussian": GaussianLayered()}
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}, "checks": {}}

    def case(name, fn):
        ms, gib = timed(fn, a.repeats, a.warmup)
        res["cases"][name] = {"ms": ms, "peak_gib": gib}
        print(f"{name:32s} {ms:9.2f} ms   peak {gib:6.2f} GiB", flush=True)

    def fwd(r, img, depth, autocast=False):
        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return r.render(img, depth, *lens)
        return run

    def fwd_bwd(r, img, depth):
        def run():
            leaves = [img.clone().requires_grad_(), depth.clone().requires_grad_()]
            params = [torch.tensor([v], device=dev, requires_grad=True) for v in lens]
            r.render(leaves[0], leaves[1], *params).square().mean().backward()
            return [t.grad for t in leaves + params]
        return run

    img, depth = scene(a.size, 1, dev)
    for name, r in renderers.items():
        case(f"{name}_fwd_b1_{a.size}", fwd(r, img, depth))
        case(f"{name}_fwd_bwd_b1_{a.size}", fwd_bwd(r, img, depth))
    case(f"layered_fwd_b1_{a.size}_bf16ac", fwd(renderers["layered"], img, depth, autocast=True))
    img4, depth4 = scene(512, 4, dev)
    case("layered_fwd_bwd_b4_512", fwd_bwd(renderers["layered"], img4, depth4))

    lay = renderers["layered"]
    grads = fwd_bwd(lay, img, depth)()
    res["checks"]["finite_grads"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res["checks"]["fp32_under_autocast"] = lay.render(img, depth, *lens).dtype == torch.float32
    small_img, small_depth = scene(128)
    cpu = lay.render(small_img, small_depth, *lens)
    gpu = lay.render(small_img.to(dev), small_depth.to(dev), *lens).cpu()
    res["checks"]["cpu_gpu_max_abs"] = float((cpu - gpu).abs().max())
    b_img, b_depth = torch.cat([img4[:1], img4[1:2]]), torch.cat([depth4[:1], depth4[1:2].flip(-1)])
    both = lay.render(b_img, b_depth, *lens)
    singles = torch.cat([lay.render(b_img[i:i + 1], b_depth[i:i + 1], *lens) for i in range(2)])
    res["checks"]["batch_max_abs"] = float((both - singles).abs().max())
    ok = (res["checks"]["finite_grads"] and res["checks"]["fp32_under_autocast"]
          and res["checks"]["cpu_gpu_max_abs"] <= 1e-4 and res["checks"]["batch_max_abs"] <= 1e-5)
    frame = res["cases"][f"layered_fwd_b1_{a.size}"]["ms"]
    res["interactive_target_met"] = frame < a.target_ms
    res["checks_ok"] = ok
    print(f"checks {'ok' if ok else 'FAILED'}: {res['checks']}")
    print(f"interactive refocus at {a.size}²: {frame:.1f} ms per frame (target < {a.target_ms:.0f} ms): "
          f"{'met' if res['interactive_target_met'] else 'NOT met'}")
    emit(res, a.json)
    if not ok:
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
