"""FLOPs per image of the VAR / ECM / VQVAE work that bench/gpu_ecm.py times, counted on CPU at batch 1.

``torch.utils.flop_counter.FlopCounterMode`` counts matmul, convolution and attention FLOPs (forward, and backward
for the training steps); elementwise ops and norms are not counted. The counts are linear in the batch, so they are
taken at batch 1 and reported per image. With a measured img/s they give the achieved TFLOP/s of a case (and the
rate a target needs); the table in docs/benchmarks.md §2c comes from this script.

Cases (RANDOM weights, the same presets as gpu_ecm.py):

* ``var_train_{L}``      base VAR forward + CE + backward, all parameters trainable, all tokens / first 8 scales
* ``ecm_train_s{s}``     ECM forward + CE + backward: frozen VAR (no weight gradients) + control net, truncated at s
* ``sample_cfg``         one image with CFG: the VAR forward on 2 rows over all tokens (the KV-cached sampler does the
                         same GEMMs; its attention is over the cached prefix)
* ``decode`` / ``encode``  VQVAE ``fhat_to_img`` / ``img_to_idx``

    python bench/flops_ecm.py [--var d16] [--vqvae vae_ch160v4096z32] [--control default] [--rate CASE=IMG_PER_S ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ecm import CTLM, SAMPM, SCALESM, VARM, VQM  # noqa: E402  (Lightning-free network import)


def count(fn) -> int:
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return fc.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var", default="d16")
    ap.add_argument("--vqvae", default="vae_ch160v4096z32")
    ap.add_argument("--control", default="default")
    ap.add_argument("--rate", action="append", default=[], metavar="CASE=IMG_PER_S",
                    help="a measured (or target) rate: prints the TFLOP/s it means")
    args = ap.parse_args(argv)
    rates = {k: float(v) for k, v in (r.split("=", 1) for r in args.rate)}

    torch.manual_seed(0)
    var = VARM.build_var(args.var)
    vq = VQM.build_vqvae(args.vqvae).eval().requires_grad_(False)
    ctl = CTLM.ECMControlNet(var, **CTLM.CONTROL_PRESETS[args.control])
    K, V, S = len(var.patch_nums), var.V, vq.image_size
    eds = SCALESM.ends_for(var.patch_nums)
    idx = [torch.randint(0, V, (1, pn * pn)) for pn in var.patch_nums]
    label = torch.zeros(1, dtype=torch.long)
    cond = torch.rand(1, 3, S, S) * 2 - 1
    var.cond_drop_rate = 0.0

    def train(kind: str, s: int | None):
        n = K if s is None else s + 1
        x, tgt = vq.idx_to_var_input(idx[:n]), torch.cat(idx[:n], 1)
        if kind == "var":
            var.requires_grad_(True).train()
            logits = var(label, x, prog_si=s)
        else:
            CTLM.freeze_backbone(var)
            ctl.train()
            logits = ctl(var, label, x, cond_img=cond, prog_si=s)
        F.cross_entropy(logits.view(-1, V), tgt.view(-1)).backward()
        var.zero_grad(set_to_none=True)
        ctl.zero_grad(set_to_none=True)

    def sample_cfg():
        var.eval()
        with torch.no_grad():
            var(label.repeat(2), vq.idx_to_var_input(idx).repeat(2, 1, 1))

    def decode():
        with torch.no_grad():
            vq.fhat_to_img(vq.idx_to_fhat(idx))

    n8 = K - 3
    s_cases = sorted(SAMPM.DEFAULT_TRUNC_PROBS) if K == 10 else [K - 5, K - 3, K - 1]
    cases = {f"var_train_{eds[-1]}": lambda: train("var", None),
             f"var_train_{eds[n8]}": lambda: train("var", n8),
             **{f"ecm_train_s{s}": (lambda s=s: train("ecm", s)) for s in s_cases},
             "sample_cfg": sample_cfg, "decode": decode, "encode": lambda: vq.img_to_idx(cond)}
    print(f"[flops_ecm] VAR {args.var}, VQVAE {args.vqvae}, control {args.control}; GFLOP per image "
          f"(matmul/conv/attention; training = forward + backward)")
    flops = {}
    for name, fn in cases.items():
        flops[name] = count(fn)
        line = f"[flops_ecm] {name:<16} {flops[name] / 1e9:10.1f} GFLOP/img"
        if name in rates:
            line += f" | at {rates[name]:.1f} img/s: {flops[name] * rates[name] / 1e12:.1f} TFLOP/s"
        print(line, flush=True)
    if K == 10:
        probs = SAMPM.DEFAULT_TRUNC_PROBS
        early = sum(p * flops[f"ecm_train_s{s}"] for s, p in probs.items())
        print(f"[flops_ecm] ecm_train_early  {early / 1e9:10.1f} GFLOP/img (Σ p_s, trunc_probs {dict(probs)}); "
              f"{early / flops[f'var_train_{eds[-1]}']:.3f}× var_train_{eds[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
