"""Where the time of one step goes: a ``torch.profiler`` pass over a few steps, summed by kind of kernel.

``bench/gpu_ecm.py --profile REGEX`` runs this after timing each case whose name matches. On CUDA it sums the device
time of every kernel (GEMM, attention, convolution, norms, Triton-fused, optimizer, ...) and compares it with the
wall time of the step: a device busy far below 100 % means the step waits on the host (launch-bound or syncs), which
CUDA graphs or compilation fix; a large elementwise/norm share means memory traffic, which fusion fixes. On a CPU the
same summary is taken over the self CPU time of the ATen ops (for the smoke test; the categories are the same).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# first match wins: attention first (cuDNN/cutlass attention kernels also say fprop/cutlass), convolution before GEMM
# (cuDNN's implicit-GEMM kernels are convolutions), Triton templates (max-autotune GEMMs) before Triton-fused
# pointwise kernels, optimizer before norm (clip_grad_norm's LpNorm runs in the optimizer's multi-tensor kernels)
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"fmha|flash|attention|sdpa|scaled_dot_product|mha"),
    ("conv", r"conv|implicit_gemm|implicit_convolve|winograd|dgrad|wgrad|fprop|cudnn::"),
    ("gemm", r"^triton_tem|gemm|gemv|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|matmul|baddbmm|_addmm_activation)$"),
    ("triton fused", r"^triton_"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("norm", r"norm|RowwiseMoments|FusedParams"),
    ("softmax/CE", r"softmax|nll_loss|cross_entropy"),
    ("sampling", r"topk|sort|cumsum|scan|multinomial|argmax|scatter|gather|exponential|bernoulli|uniform|normal_|"
                 r"distribution"),
    ("copy/cast", r"copy|memcpy|memset|\bcat\b|cat_|CatArray|to_copy|fill|clone|contiguous|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|aten::(add|mul|sub|div|silu|gelu|where|exp|pow|rsqrt|"
                    r"sqrt|neg|clamp|sum|mean|max|min|lerp|addcmul|addcdiv|sigmoid|tanh|threshold|relu)"),
)
_CAT = [(name, re.compile(rx, re.IGNORECASE)) for name, rx in CATEGORIES]


def category(kernel: str) -> str:
    """The kind of a CUDA kernel or ATen op name ("other" when no pattern matches)."""
    return next((name for name, rx in _CAT if rx.search(kernel)), "other")


def _self_time_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def kernel_profile(step: Callable[[], object], device: torch.device, steps: int = 2, top: int = 5) -> dict:
    """Profile ``steps`` calls of ``step`` (already warmed up). Returns {wall_ms, busy_ms (per step), busy_frac,
    by_category: {kind: ms per step}, top: [(name, ms per step, kind)]}. On CUDA the times are kernel device times;
    on a CPU the self CPU times of ATen ops (autograd bookkeeping events are left out)."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t) / steps
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        on_device = ev.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device or (not cuda and not ev.key.startswith("aten::")):
            continue
        us = _self_time_us(ev, cuda)
        if us > 0:
            kernels[ev.key] = kernels.get(ev.key, 0.0) + us / 1e3 / steps
    kind = {name: category(name) for name in kernels}
    by_cat: dict[str, float] = {}
    for name, ms in kernels.items():
        by_cat[kind[name]] = by_cat.get(kind[name], 0.0) + ms
    busy = sum(kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"device": cuda, "wall_ms": wall * 1e3, "busy_ms": busy,
            "busy_frac": busy / (wall * 1e3) if wall > 0 else float("nan"),
            "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [(name, ms, kind[name]) for name, ms in ranked]}


def summary(p: dict) -> tuple[str, str]:
    """Two printable lines: the busy time and the split by kind; the top kernels."""
    if not p["busy_ms"]:
        return (f"{p['wall_ms']:.1f} ms/step wall (profiled), no {'kernel' if p.get('device') else 'op'} events "
                f"recorded (CUPTI not permitted here?)"), "top: –"
    busy = p["busy_ms"]
    split = ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in p["by_category"].items() if v / busy >= 0.005)
    head = (f"{p['wall_ms']:.1f} ms/step wall (profiled), {'device' if p.get('device') else 'op'} busy "
            f"{p['busy_ms']:.1f} ms ({100 * p['busy_frac']:.0f}%): {split}")
    tops = "; ".join(f"{name[:70]} {ms:.2f} ms [{kind}]" for name, ms, kind in p["top"])
    return head, "top: " + tops
