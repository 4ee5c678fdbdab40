"""Time FID (+ improved P/R k=3, + IS) with the TF Inception on CPU.

Uses the real weights when ``FID_INCEPTION_WEIGHTS`` (or ``--weights``) points at
``weights-inception-2015-12-05-6726825d.pth``; otherwise builds a same-shape Inception with random weights, saves
it to a temporary TORCH_HOME under the expected file name and loads it from there through the normal offline path
(``inception_from_local``). With random weights the FID value itself is meaningless (features ≈ 0); the timing is
what this measures. Images are synthetic uint8 (two different distributions).

    .venv/bin/python bench/bench_fid.py                      # 1000 images per side
    .venv/bin/python bench/bench_fid.py --num-images 250     # faster
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrlgen.lightning_modules.metrics.distribution import GenerativeMetrics
from ctrlgen.lightning_modules.metrics.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    FIDInceptionV3,
    inception_from_local,
)


def _synthetic(n: int, size: int, seed: int, lo: int, hi: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images: low-res noise upsampled (closer to natural-image statistics than white noise)
    small = torch.randint(lo, hi, (n, 3, size // 8, size // 8), generator=g, dtype=torch.uint8).float()
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return big.round().clamp(0, 255).to(torch.uint8)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=1000, help="images per side (real and fake)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic images (resized to 299 inside)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--weights", default=None, help=f"Inception weights file (default ${INCEPTION_WEIGHTS_ENV})")
    ap.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    weights = args.weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    tmp = None
    t0 = time.perf_counter()
    if weights and Path(weights).is_file():
        which = f"REAL Inception weights from {weights}"
        net = inception_from_local(weights, outputs=("2048", "logits_unbiased"))
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_fid_torch_home_")
        ck = Path(tmp.name) / "hub" / "checkpoints"
        ck.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(FIDInceptionV3().state_dict(), ck / INCEPTION_WEIGHTS_FILENAME)
        os.environ["TORCH_HOME"] = tmp.name
        os.environ.pop(INCEPTION_WEIGHTS_ENV, None)
        which = (f"RANDOM same-shape Inception (no {INCEPTION_WEIGHTS_ENV}); weights saved to "
                 f"$TORCH_HOME/hub/checkpoints/{INCEPTION_WEIGHTS_FILENAME} in a temp TORCH_HOME and loaded offline "
                 f"- FID value meaningless, timing only")
        net = inception_from_local(outputs=("2048", "logits_unbiased"))
    t_load = time.perf_counter() - t0
    print(f"[bench_fid] using {which}")
    print(f"[bench_fid] torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.num_images} images/side at {args.size}x{args.size}, batch {args.batch_size}")

    metric = GenerativeMetrics(net, compute_pr=not args.no_pr, compute_is=True)
    real = _synthetic(args.num_images, args.size, 0, 0, 256)
    fake = _synthetic(args.num_images, args.size, 1, 30, 220)

    net(real[:2])  # warm-up (oneDNN primitive creation)
    times = {}
    for name, imgs, is_real in (("real", real, True), ("fake", fake, False)):
        t = time.perf_counter()
        for i in range(0, imgs.shape[0], args.batch_size):
            metric.update(imgs[i:i + args.batch_size], real=is_real)
        times[name] = time.perf_counter() - t
        print(f"[bench_fid] {name}: {imgs.shape[0]} images in {times[name]:.1f} s "
              f"({imgs.shape[0] / times[name]:.2f} img/s)")
    t = time.perf_counter()
    out = metric.compute()
    t_compute = time.perf_counter() - t
    total = t_load + times["real"] + times["fake"] + t_compute
    vals = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items())
    print(f"[bench_fid] load {t_load:.1f} s | features {times['real'] + times['fake']:.1f} s | "
          f"compute (FID 2048-d + P/R k=3 + IS) {t_compute:.2f} s | total {total:.1f} s")
    print(f"[bench_fid] {vals}")
    per_img = (times["real"] + times["fake"]) / (2 * args.num_images)
    print(f"[bench_fid] extrapolated feature time for 1000/side: {2000 * per_img:.0f} s; "
          f"for 50k generated (ADM protocol): {50000 * per_img / 3600:.2f} h on this CPU")
    if tmp is not None:
        tmp.cleanup()
    return {"which": which, "load_s": t_load, **{f"{k}_s": v for k, v in times.items()}, "compute_s": t_compute,
            **{k: v.item() for k, v in out.items()}}


if __name__ == "__main__":
    main()
