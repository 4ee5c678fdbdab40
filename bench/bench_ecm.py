"""CPU side-by-side costs of ECM's training/sampling paths (ratios only: CPU timings on a shared machine are noisy).

One run builds ``ECMModule(finetune_base=false)`` (frozen VAR + control net, early-centric) and
``ECMModule(finetune_base=true)`` (the full-fine-tune baseline: same control net, VAR trainable, full sequences), then
times every case once per repetition, in a rotated order (interleaved: drifting machine load hits all cases alike), and
reports the median of ``--reps`` repetitions after ``--warmup`` discarded ones:

* (a) ``fullft_step``      full-FT train step (model_step → backward → clip 2.0 → AdamW) on all L tokens
      ``ecm_step_s{k}``    ECM train step truncated at scale k (k = the keys of the default ``trunc_probs``; the last
                           key is the full sequence). ECM epoch cost = Σ_k p_k · t(ecm_step_s{k}) vs ``fullft_step``
                           (target ≤ 0.45×)
* (b) early-centric ECM (that expectation) vs ECM on the full sequence (``ecm_step_s{K-1}``)
* (c) ``sample_base`` ``VAR.autoregressive_infer_cfg`` vs ``sample_ecm`` ``ECMControlNet.sample`` (control tokens
      included) at equal batch, cfg 1.5, top-k 900 (≤ V), top-p 0.96, ECM temperature schedule for both, without
      decoding; ``decode`` = VQVAE ``fhat_to_img`` of that batch (ratio incl. decode derived) (target ≤ 1.15×).
      ``sample_ecm_cond_only`` (c'): the same with ``cfg_control: cond_only`` (adapters on the cond rows only)
* (d) data-to-loss per step: ``tok_pretok`` / ``tok_fly`` (codes → per-scale indices → teacher-forcing input, vs the
      VQVAE encoder on the images) and ``ecm_step_s{mid}_fly`` (the whole ECM step with on-the-fly tokenisation) vs
      ``ecm_step_s{mid}`` (pre-tokenised)

Model sizes are flags; the default ``--size small`` is VAR depth 4, C 256, 4 heads, V 1024 on the 10-scale 256-px
schedule (L 680), VQVAE ch 32 (1,1,2,2,4) 1 res-block z 32, control ViT width 64 depth 1 patch 16, adapters at the
default placement (every 4, offset 3: one adapter per 4 blocks as for d16), batch 4. ``--size tiny`` = the 6-scale
32-px demo models (fast, but its token fractions differ from the 10-scale schedule).

    .venv/bin/python bench/bench_ecm.py                  # small, 1 thread, 1 + 7 reps (≈2-4 min on 2 shared cores)
    .venv/bin/python bench/bench_ecm.py --size tiny --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "small": {"depth": 4, "dim": 256, "heads": 4, "vocab": 1024, "cvae": 32, "patch_nums": None, "vae_ch": 32,
              "vae_mult": "1,1,2,2,4", "vae_res": 1, "vit_width": 64, "vit_depth": 1, "vit_heads": 2, "vit_patch": 16,
              "batch": 4},
    "tiny": {"depth": 4, "dim": 128, "heads": 4, "vocab": 512, "cvae": 16, "patch_nums": "1,2,3,4,6,8", "vae_ch": 32,
             "vae_mult": "1,2,2", "vae_res": 1, "vit_width": 32, "vit_depth": 1, "vit_heads": 2, "vit_patch": 4,
             "batch": 8},
}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    for k in SIZES["small"]:
        ap.add_argument(f"--{k.replace('_', '-')}", default=None, type=str if k in ("patch_nums", "vae_mult") else int)
    ap.add_argument("--every", type=int, default=4, help="adapter every N blocks (default placement: 4, offset 3)")
    ap.add_argument("--offset", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on 2 shared, oversubscribed cores 2 OpenMP threads thrash — medians 3-30x "
                         "the minima in a 2-thread run — while 1 thread gives max/min ≈ 1.1-1.6)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for k, v in SIZES[a.size].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def build(a, finetune: bool):
    from ctrlgen.lightning_modules.ecm import ECMModule
    from ctrlgen.lightning_modules.ecm.scales import DEFAULT_PATCH_NUMS

    pns = tuple(int(p) for p in a.patch_nums.split(",")) if a.patch_nums else DEFAULT_PATCH_NUMS
    var_o = {"depth": a.depth, "embed_dim": a.dim, "num_heads": a.heads, "vocab_size": a.vocab, "cvae": a.cvae,
             "num_classes": 10, "patch_nums": pns}
    vq_o = {"ch": a.vae_ch, "ch_mult": tuple(int(x) for x in a.vae_mult.split(",")), "num_res_blocks": a.vae_res,
            "z_channels": a.cvae, "vocab_size": a.vocab, "patch_nums": pns}
    ctl = {"patch": a.vit_patch, "width": a.vit_width, "vit_depth": a.vit_depth, "vit_heads": a.vit_heads,
           "every": a.every, "offset": a.offset}
    torch.manual_seed(a.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ECMModule(var_preset=None, var_overrides=var_o, vqvae_preset=None, vqvae_overrides=vq_o, control=ctl,
                      finetune_base=finetune, eval_base=False)
    m.train()
    return m


def main(argv=None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    ecm, ft = build(a, False), build(a, True)
    var, vq, K = ecm.var, ecm.vqvae, len(ecm.var.patch_nums)
    S, B, L = vq.image_size, a.batch, var.L
    eds = [e for _, e in var.begin_ends]
    trunc = ecm.trunc_probs  # the module's default early-centric distribution for this schedule
    ks = sorted(trunc)
    mid = max(trunc, key=trunc.get)
    g = torch.Generator().manual_seed(a.seed)
    batch = {"codes": torch.randint(0, var.V, (B, L), generator=g), "image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
             "cond": torch.rand(B, 3, S, S, generator=g) * 2 - 1, "label": torch.randint(0, 10, (B,), generator=g),
             "cond_type": torch.zeros(B, dtype=torch.long), "key": [f"k{i}" for i in range(B)]}
    fly = {k: v for k, v in batch.items() if k != "codes"}
    opt_ecm, opt_ft = ecm.configure_optimizers()["optimizer"], ft.configure_optimizers()["optimizer"]
    p_ecm = [p for p in ecm.parameters() if p.requires_grad]
    p_ft = [p for p in ft.parameters() if p.requires_grad]

    def step(module, opt, params, b, s):
        def run():
            if s is not None:
                module.trunc_probs = {s: 1.0}  # force the drawn scale (model_step draws from trunc_probs)
            out = module.model_step(b, "train")
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def tokens(b, s):
        @torch.no_grad()
        def run():
            vq.idx_to_var_input(ecm.tokens(b, s))
        return run

    kw = {"cfg": 1.5, "top_k": min(900, var.V), "top_p": 0.96, "temperature_schedule": ecm.temperatures,
          "decode": False}
    labels = batch["label"]
    f_hat = {}

    @torch.no_grad()
    def sample_base():
        var.eval()
        f_hat["x"] = var.autoregressive_infer_cfg(B, labels, vqvae=vq, g_seed=0, **kw)

    def sample_ecm_with(cfg_control: str):
        @torch.no_grad()
        def run():
            ecm.control.eval()
            ecm.control.sample(var, vq, B, labels, cond_img=batch["cond"], g_seed=0, cfg_control=cfg_control, **kw)
            ecm.control.train()
        return run

    @torch.no_grad()
    def decode():
        vq.fhat_to_img(f_hat["x"])

    cases = {"fullft_step": (step(ft, opt_ft, p_ft, batch, None), L)}
    for k in ks:
        cases[f"ecm_step_s{k}"] = (step(ecm, opt_ecm, p_ecm, batch, k), eds[k])
    cases[f"ecm_step_s{mid}_fly"] = (step(ecm, opt_ecm, p_ecm, fly, mid), eds[mid])
    cases[f"tok_pretok_s{mid}"] = (tokens(batch, mid), eds[mid])
    cases[f"tok_fly_s{mid}"] = (tokens(fly, mid), eds[mid])
    cases["sample_base"] = (sample_base, L)
    cases["sample_ecm"] = (sample_ecm_with(ecm.cfg_control), L)
    other = "cond_only" if ecm.cfg_control == "both" else "both"
    cases[f"sample_ecm_{other}"] = (sample_ecm_with(other), L)
    cases["decode"] = (decode, "-")
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    print(f"[bench_ecm] command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"[bench_ecm] torch {torch.__version__}, threads {torch.get_num_threads()}, size {a.size}: VAR depth {a.depth} "
          f"C {a.dim} heads {a.heads} V {a.vocab} scales {var.patch_nums} (L {L}, {S} px); VQVAE ch {a.vae_ch} "
          f"mult ({a.vae_mult}) res {a.vae_res}; control ViT w{a.vit_width} d{a.vit_depth} p{a.vit_patch}, adapters "
          f"after blocks {ecm.control.after_blocks}; batch {B}; trunc_probs {trunc}; {a.warmup} warm-up + {a.reps} "
          f"timed reps, interleaved")
    n_var = sum(p.numel() for p in var.parameters())
    print(f"[bench_ecm] params: VAR {n_var:,}; ECM trainable {sum(p.numel() for p in p_ecm):,}; full-FT trainable "
          f"{sum(p.numel() for p in p_ft):,}; VQVAE {sum(p.numel() for p in vq.parameters()):,}")
    for rep in range(a.warmup + a.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            t = time.perf_counter()
            cases[n][0]()
            dt = time.perf_counter() - t
            if rep >= a.warmup:
                times[n].append(dt)
        print(f"[bench_ecm] rep {rep + 1}/{a.warmup + a.reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    med = {n: statistics.median(v) for n, v in times.items()}
    mins = {n: min(v) for n, v in times.items()}
    ecm_epoch = sum(p * med[f"ecm_step_s{k}"] for k, p in trunc.items())
    ecm_epoch_min = sum(p * mins[f"ecm_step_s{k}"] for k, p in trunc.items())
    full = f"ecm_step_s{K - 1}"
    rows = [("case", "tokens", "median ms", "min ms", "max ms", "median ratio", "min ratio")]
    ref = {"fullft_step": None, **{f"ecm_step_s{k}": "fullft_step" for k in ks}, f"ecm_step_s{mid}_fly": f"ecm_step_s{mid}",
           f"tok_pretok_s{mid}": None, f"tok_fly_s{mid}": f"tok_pretok_s{mid}", "sample_base": None,
           "sample_ecm": "sample_base", f"sample_ecm_{other}": "sample_base", "decode": "sample_base"}
    for n in names:
        r = ref[n]
        rows.append((n, str(cases[n][1]), f"{med[n] * 1e3:.1f}", f"{mins[n] * 1e3:.1f}",
                     f"{max(times[n]) * 1e3:.1f}", f"{med[n] / med[r]:.3f}x {r}" if r else "",
                     f"{mins[n] / mins[r]:.3f}x" if r else ""))
    rows.append(("ecm_epoch (Σ p_k t_k)", f"{sum(p * eds[k] for k, p in trunc.items()):.0f}", f"{ecm_epoch * 1e3:.1f}",
                 f"{ecm_epoch_min * 1e3:.1f}", "", f"{ecm_epoch / med['fullft_step']:.3f}x fullft_step",
                 f"{ecm_epoch_min / mins['fullft_step']:.3f}x"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    samp = med["sample_ecm"] / med["sample_base"]
    samp_dec = (med["sample_ecm"] + med["decode"]) / (med["sample_base"] + med["decode"])
    res = {
        "ecm_epoch_vs_fullft": ecm_epoch / med["fullft_step"],
        "ecm_full_seq_vs_fullft": med[full] / med["fullft_step"],
        "early_vs_full_seq_ecm": ecm_epoch / med[full],
        "sampling_overhead": samp, "sampling_overhead_incl_decode": samp_dec,
        f"sampling_overhead_{other}": med[f"sample_ecm_{other}"] / med["sample_base"],
        "fly_vs_pretok_step": med[f"ecm_step_s{mid}_fly"] / med[f"ecm_step_s{mid}"],
        "fly_vs_pretok_tokens": med[f"tok_fly_s{mid}"] / med[f"tok_pretok_s{mid}"],
        "min_based": {"ecm_epoch_vs_fullft": ecm_epoch_min / mins["fullft_step"],
                      "early_vs_full_seq_ecm": ecm_epoch_min / mins[full],
                      "sampling_overhead": mins["sample_ecm"] / mins["sample_base"],
                      "fly_vs_pretok_step": mins[f"ecm_step_s{mid}_fly"] / mins[f"ecm_step_s{mid}"]},
    }
    print()
    print(f"(a) ECM epoch cost / full-FT epoch cost = {res['ecm_epoch_vs_fullft']:.3f}  (target ≤ 0.45: "
          f"{'MET' if res['ecm_epoch_vs_fullft'] <= 0.45 else 'NOT met'}); ECM full sequence / full-FT = "
          f"{res['ecm_full_seq_vs_fullft']:.3f}")
    print(f"(b) early-centric ECM / full-sequence ECM = {res['early_vs_full_seq_ecm']:.3f}  (token ratio "
          f"{sum(p * eds[k] for k, p in trunc.items()) / L:.3f})")
    print(f"(c) sampling ECM / base = {samp:.3f} without decode, {samp_dec:.3f} incl. VQVAE decode  (target ≤ 1.15: "
          f"{'MET' if samp <= 1.15 else 'NOT met'} / {'MET' if samp_dec <= 1.15 else 'NOT met'}; "
          f"cfg_control {ecm.cfg_control})")
    print(f"(c') with cfg_control {other}: sampling ECM / base = {res[f'sampling_overhead_{other}']:.3f} "
          "without decode")
    print(f"(d) on-the-fly / pre-tokenised: ECM step at s={mid} {res['fly_vs_pretok_step']:.3f}x; tokenisation alone "
          f"{res['fly_vs_pretok_tokens']:.1f}x ({med[f'tok_fly_s{mid}'] * 1e3:.1f} vs {med[f'tok_pretok_s{mid}'] * 1e3:.2f} ms)")
    mb = res["min_based"]
    print(f"    cross-check on per-case minima (noise only adds time): (a) {mb['ecm_epoch_vs_fullft']:.3f}, "
          f"(b) {mb['early_vs_full_seq_ecm']:.3f}, (c) {mb['sampling_overhead']:.3f}, (d) {mb['fly_vs_pretok_step']:.3f}")
    print(f"[bench_ecm] total {time.perf_counter() - t_start:.0f} s")
    return res


if __name__ == "__main__":
    main()
