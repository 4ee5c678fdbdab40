"""Canny F1 of one trained ECM checkpoint under ``cfg_control: both`` and ``cond_only``, paired image by image.

Both modes sample every test image from the same seed (the module's per-batch generator), so the per-image
difference of F1 is a paired comparison; the script prints the means, the paired difference ± SEM, and the F1 of the
base VAR without control from the same seeds. ``cond_only`` runs the adapters on the B conditional rows of the CFG
batch only, ``both`` on all 2B rows (spec ecm.md §2.4), so the question is whether the cheaper mode loses control.

    python bench/cfg_control_f1.py --config demo_runs/ecm/ecm-test/config.yaml   # its ckpt_path, or --ckpt PATH

The config is a ``ctrlgen test`` config of an ``ECMModule`` with canny conditions (``make demo`` writes one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a `ctrlgen test` config of an ECMModule (canny)")
    ap.add_argument("--ckpt", default=None, help="the ECM checkpoint (trainable weights; the bases come from the "
                                                 "config); default: the config's ckpt_path")
    ap.add_argument("--limit", type=int, default=None, help="only this many test batches (default: the config's "
                                                             "trainer.limit_test_batches, as `ctrlgen test`)")
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import yaml

    from ctrlgen.lightning_modules.cli import CtrlgenCLI
    from ctrlgen.lightning_modules.metrics.control import MeanSEM, canny_f1

    cfg = yaml.safe_load(Path(a.config).read_text())
    ckpt_path = a.ckpt or cfg.get("ckpt_path")
    if not ckpt_path:
        raise SystemExit(f"{a.config} has no ckpt_path; give --ckpt")
    # a saved `test` config also holds the subcommand's own arguments (ckpt_path, verbose): not parsed here
    cfg = {k: v for k, v in cfg.items() if k in ("seed_everything", "trainer", "model", "data")}
    cfg["trainer"] = {**cfg.get("trainer", {}), "logger": False}
    cli = CtrlgenCLI(args=cfg, run=False)
    model, dm = cli.model, cli.datamodule
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    if "canny" not in model.condition_types:
        raise SystemExit(f"{a.config}: the model's condition_types are {model.condition_types}; this script needs canny")
    dm.setup("test")
    loader = dm.test_dataloader()
    loader = loader[0] if isinstance(loader, list) else loader
    lim = cli.trainer.limit_test_batches if a.limit is None else a.limit
    if isinstance(lim, float):  # a fraction, as Lightning reads it
        lim = float("inf") if lim >= 1.0 else max(1, int(lim * len(loader)))
    f1 = {"both": [], "cond_only": [], "base": []}
    for i, batch in enumerate(loader):
        if i >= lim:
            break
        edges = batch["cond"][:, 0] > 0
        for mode in ("both", "cond_only"):
            model.cfg_control = mode
            f1[mode].append(canny_f1(model.sample(batch, control=True), edges, model.edge_extractor).per_sample)
        f1["base"].append(canny_f1(model.sample(batch, control=False), edges, model.edge_extractor).per_sample)
    f = {k: torch.cat(v) for k, v in f1.items()}
    n = f["both"].numel()
    print(f"[cfg_control_f1] {ckpt_path}: {n} test images, cfg {model.sample_kwargs['cfg']}, "
          f"top_k {model.sample_kwargs['top_k']}, top_p {model.sample_kwargs['top_p']}")
    for k in ("both", "cond_only", "base"):
        print(f"[cfg_control_f1] canny F1 {k:<9} {float(f[k].mean()):.4f}")
    for x, y in (("cond_only", "both"), ("both", "base"), ("cond_only", "base")):
        diff = MeanSEM()  # the module's paired margin ± SEM (test/canny_f1_margin), here between any two arms
        diff.update(f[x] - f[y])
        m, s = diff.compute()
        print(f"[cfg_control_f1] paired {x} − {y}: {float(m):+.4f} ± {float(s):.4f} (SEM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
