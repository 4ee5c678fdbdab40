"""GPU throughput of ctrlgen's VAR / ECM / VQVAE on RANDOM weights (ecm.md §7 anchors), one line per case.

Cases (batch 64, 256 px, VAR d16 + VQVAE vae_ch160v4096z32, bf16 autocast, SDPA, AdamW fused, grad-clip 2.0):

* ``vqvae_encode``       VQVAE ``img_to_idx`` (encoder bf16, quantiser fp32)
* ``var_train_680``      base VAR training step on all 680 tokens (all 310M params trainable, drop-path + class dropout)
* ``var_train_255``      same on the first 8 scales (``prog_si=7``)
* ``ecm_train_s{5,7,9}`` ECM step (frozen d16 in eval mode + default control net, trainable only) truncated at scale s;
                         s = 9 is the full sequence. ``ecm_train_early`` = expectation under the default
                         ``trunc_probs`` {5: .2, 7: .6, 9: .2} (mean step time Σ p_s t_s, derived from the three lines)
* ``sample_base_b{64,256}`` / ``sample_ecm_b{64,256}``  KV-cached CFG sampling incl. VQVAE decode (cfg 1.5, top_k 900,
                         top_p 0.96; ECM with its T 1.0 → 0.8 step schedule and the control tokens of a condition image)
* ``--compile``: ``var_train_680c`` / ``var_train_255c`` with every VAR block ``torch.compile``d (run last, time-guarded)
* ``diag_sdpa``          whether the masked training attention runs on the memory-efficient SDPA kernel

Tokens are random codes (pre-tokenised path: ``idx_to_var_input`` is part of each training step). Peak memory =
``torch.cuda.max_memory_allocated`` over the case (model, optimizer state and activations). Only torch is needed: the
networks are imported from their files without the ``lightning_modules`` package ``__init__`` (which needs Lightning).

    PYTHONUNBUFFERED=1 python bench/gpu_ecm.py [--compile] [--warmup 3 --iters 10]
    python bench/gpu_ecm.py --smoke          # CPU/GPU proof of life: tiny presets, batch 2, 1 iteration
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _import_networks():
    """Import var/vqvae/control/sampling/scales without running ``lightning_modules/__init__.py`` (Lightning-free)."""
    if "lightning_modules" not in sys.modules:
        for name, path in (("lightning_modules", REPO / "lightning_modules"),
                           ("lightning_modules.ecm", REPO / "lightning_modules" / "ecm")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    from lightning_modules.ecm import control, sampling, scales, var, vqvae

    return var, vqvae, control, sampling, scales


VARM, VQM, CTLM, SAMPM, SCALESM = _import_networks()
T0 = time.perf_counter()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, warmup: int, iters: int, dev: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def gib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


class Runner:
    def __init__(self, args, dev: torch.device, card: str):
        self.args, self.dev, self.card, self.results = args, dev, card, {}

    def case(self, name: str, fn_factory, batch: int, tokens: int | str, warmup=None, iters=None) -> float | None:
        """Build the step with ``fn_factory()`` (returns (step, cleanup)), time it, print one line. Returns s/step."""
        a = self.args
        if time.perf_counter() - T0 > a.time_budget:
            print(f"[gpu_ecm] {self.card} | {name:<18} | SKIPPED (time budget {a.time_budget:.0f} s used)", flush=True)
            return None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        t_case = time.perf_counter()
        try:
            step, cleanup = fn_factory()
            ts = timed(step, a.warmup if warmup is None else warmup, a.iters if iters is None else iters, self.dev)
            cleanup()
        except Exception as e:  # noqa: BLE001 - report (OOM, compile failure) and go on with the next case
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            print(f"[gpu_ecm] {self.card} | {name:<18} | FAILED {type(e).__name__}: {msg}", flush=True)
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
            return None
        med = statistics.median(ts)
        self.results[name] = med
        print(f"[gpu_ecm] {self.card} | {name:<18} | B {batch:>3} | tok {tokens!s:>5} | "
              f"{med * 1e3:8.1f} ms/step (min {min(ts) * 1e3:.1f}, n {len(ts)}) | {batch / med:8.1f} img/s | "
              f"peak {gib(self.dev):6.2f} GiB | case wall {time.perf_counter() - t_case:5.1f} s", flush=True)
        return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--big-batch", type=int, default=256, help="second sampling batch (0 = skip)")
    ap.add_argument("--var", default="d16")
    ap.add_argument("--vqvae", default="vae_ch160v4096z32")
    ap.add_argument("--control", default="default")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sample-iters", type=int, default=6, help="timed sampling runs (after 2 warm-up runs)")
    ap.add_argument("--compile", action="store_true", help="also time base training with torch.compile'd blocks")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: quick check)")
    ap.add_argument("--time-budget", type=float, default=300.0, help="no new case starts after this many seconds")
    ap.add_argument("--compile-deadline", type=float, default=170.0,
                    help="compiled cases start only if fewer seconds than this have elapsed")
    ap.add_argument("--smoke", action="store_true", help="tiny presets, batch 2, 1 iteration (CPU check)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.big_batch, args.var, args.vqvae, args.control = 2, 0, "tiny", "tiny", "tiny"
        args.warmup, args.iters, args.sample_iters = 0, 1, 1

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    amp_dtype = torch.bfloat16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"[gpu_ecm] command: {' '.join([sys.executable, *sys.argv])}", flush=True)
    print(f"[gpu_ecm] torch {torch.__version__}, cuda {torch.version.cuda}, device {card}, "
          f"{'bf16 autocast' if dev.type == 'cuda' else 'fp32'}, batch {args.batch}, VAR {args.var}, VQVAE {args.vqvae}, control {args.control}, "
          f"warmup {args.warmup} + {args.iters} timed (sampling 2 + {args.sample_iters}), RANDOM weights", flush=True)

    torch.manual_seed(args.seed)
    with torch.device(dev):
        var = VARM.build_var(args.var)
        vq = VQM.build_vqvae(args.vqvae).eval().requires_grad_(False)
        ctl = CTLM.ECMControlNet(var, **CTLM.CONTROL_PRESETS[args.control])
    B, V, K = args.batch, var.V, len(var.patch_nums)
    S = vq.image_size
    eds = SCALESM.ends_for(var.patch_nums)
    n_var = sum(p.numel() for p in var.parameters())
    n_ctl = sum(p.numel() for p in ctl.parameters())
    print(f"[gpu_ecm] VAR params {n_var:,}, control params {n_ctl:,}, image {S} px, L {var.L}, scales {K}, "
          f"build {time.perf_counter() - T0:.1f} s", flush=True)
    g = torch.Generator(device=dev).manual_seed(args.seed)

    def batch_data(b: int):
        idx = [torch.randint(0, V, (b, pn * pn), device=dev, generator=g) for pn in var.patch_nums]
        label = torch.randint(0, var.num_classes, (b,), device=dev, generator=g)
        cond = torch.rand(b, 3, S, S, device=dev, generator=g) * 2 - 1
        return idx, label, cond

    idx, label, cond = batch_data(B)
    img = torch.rand(B, 3, S, S, device=dev, generator=g) * 2 - 1
    run = Runner(args, dev, card)
    # bf16 autocast on the GPU; plain fp32 on a CPU (CPU bf16 autocast is emulated and very slow: smoke runs only)
    ac = lambda: torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=dev.type == "cuda")

    # ------------------------------------------------------------------ VQVAE encode
    def enc_factory():
        def step():
            with ac():
                vq.img_to_idx(img)
        return step, lambda: None

    run.case("vqvae_encode", enc_factory, B, "-")

    # ------------------------------------------------------------------ base VAR training
    def make_opt(params):
        kw = {"fused": True} if dev.type == "cuda" else {}
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **kw)

    def var_train_factory(prog_si: int | None):
        def factory():
            var.requires_grad_(True).train()
            params = [p for p in var.parameters() if p.requires_grad]
            opt = make_opt(params)
            n = K if prog_si is None else prog_si + 1
            target = torch.cat(idx[:n], 1)

            def step():
                x = vq.idx_to_var_input(idx[:n])
                with ac():
                    logits = var(label, x, prog_si=prog_si)
                loss = F.cross_entropy(logits.view(-1, V), target.view(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 2.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            def cleanup():
                opt.state.clear()
                var.zero_grad(set_to_none=True)
            return step, cleanup
        return factory

    run.case(f"var_train_{eds[-1]}", var_train_factory(None), B, eds[-1])
    run.case(f"var_train_{eds[K - 3]}", var_train_factory(K - 3), B, eds[K - 3])

    # ------------------------------------------------------------------ ECM training (frozen VAR)
    CTLM.freeze_backbone(var)
    trunc = dict(SAMPM.DEFAULT_TRUNC_PROBS) if K == 10 else {K - 5: 0.2, K - 3: 0.6, K - 1: 0.2}

    def ecm_factory(s: int):
        def factory():
            ctl.train()
            params = [p for p in ctl.parameters() if p.requires_grad]
            opt = make_opt(params)
            target = torch.cat(idx[:s + 1], 1)

            def step():
                x = vq.idx_to_var_input(idx[:s + 1])
                with ac():
                    logits = ctl(var, label, x, cond_img=cond, prog_si=s)
                loss = F.cross_entropy(logits.view(-1, V), target.view(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 2.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            def cleanup():
                opt.state.clear()
                ctl.zero_grad(set_to_none=True)
            return step, cleanup
        return factory

    ecm_t = {s: run.case(f"ecm_train_s{s}", ecm_factory(s), B, eds[s]) for s in sorted(trunc)}
    if all(v is not None for v in ecm_t.values()):
        mean_t = sum(p * ecm_t[s] for s, p in trunc.items())
        mean_tok = sum(p * eds[s] for s, p in trunc.items())
        print(f"[gpu_ecm] {card} | {'ecm_train_early':<18} | B {B:>3} | tok {mean_tok:>5.0f} | {mean_t * 1e3:8.1f} ms/step "
              f"(= Σ p_s t_s, trunc_probs {trunc}) | {B / mean_t:8.1f} img/s | peak = ecm_train_s{max(trunc)}", flush=True)

    # ------------------------------------------------------------------ sampling
    temps = SAMPM.temperature_schedule(K, "step", 1.0, 0.8, K - 2)
    ctl.eval()
    top_k = min(900, V)

    def sample_factory(b: int, control: bool):
        def factory():
            _, lab, cnd = batch_data(b)

            def step():
                with ac():
                    if control:
                        ctl.sample(var, vq, b, lab, cond_img=cnd, g_seed=0, cfg=1.5, top_k=top_k, top_p=0.96,
                                   temperature_schedule=temps)
                    else:
                        var.autoregressive_infer_cfg(b, lab, vqvae=vq, g_seed=0, cfg=1.5, top_k=top_k, top_p=0.96)
            return step, lambda: None
        return factory

    for b in [B] + ([args.big_batch] if args.big_batch else []):
        tb = run.case(f"sample_base_b{b}", sample_factory(b, False), b, var.L, warmup=min(2, args.warmup + 1),
                      iters=args.sample_iters)
        te = run.case(f"sample_ecm_b{b}", sample_factory(b, True), b, var.L, warmup=min(2, args.warmup + 1),
                      iters=args.sample_iters)
        if tb and te:
            print(f"[gpu_ecm] {card} | {'sample_ratio_b' + str(b):<18} | ECM / base time = {te / tb:.3f}", flush=True)

    # ------------------------------------------------------------------ SDPA kernel diagnostic (masked training attention)
    if dev.type == "cuda" and time.perf_counter() - T0 < args.time_budget:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(B, var.num_heads, var.L, var.C // var.num_heads, device=dev, dtype=amp_dtype, requires_grad=True)
        mask = var.attn_bias_for_masking.to(amp_dtype)
        for name, be in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=1.0).sum().backward()
                ok = "available"
            except Exception as e:  # noqa: BLE001
                ok = f"NOT available ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
            print(f"[gpu_ecm] {card} | diag_sdpa          | masked (1,1,L,L) bf16 fwd+bwd on {name} kernel: {ok}",
                  flush=True)
        del q

    # ------------------------------------------------------------------ compiled base training
    if args.compile:
        if time.perf_counter() - T0 > args.compile_deadline:
            print(f"[gpu_ecm] {card} | compiled cases SKIPPED: {time.perf_counter() - T0:.0f} s elapsed > "
                  f"--compile-deadline {args.compile_deadline:.0f} s", flush=True)
        else:
            # every block has its own drop-path p (a guarded float) → one graph per block and sequence length; the
            # default recompile limit (8) would silently leave the other blocks eager (seen in the first H200 run)
            dc = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(dc, name):
                    setattr(dc, name, max(getattr(dc, name), 256))
            for blk in var.blocks:  # the ECM hook path stays eager
                blk.compile(dynamic=False, backend=args.compile_backend)
            t = time.perf_counter()
            run.case(f"var_train_{eds[-1]}c", var_train_factory(None), B, eds[-1])
            run.case(f"var_train_{eds[K - 3]}c", var_train_factory(K - 3), B, eds[K - 3])
            print(f"[gpu_ecm] {card} | compiled cases incl. compilation took {time.perf_counter() - t:.0f} s", flush=True)
    print(f"[gpu_ecm] done in {time.perf_counter() - T0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
