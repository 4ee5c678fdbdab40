"""``ctrlgen demo ecm``: the CPU proof of life on the ``shapes`` world.

Stages, each a real ``ctrlgen fit``/``test`` run with its own checkpoint, sample grids and (offline) W&B run:
shards → VQVAE → VAR (class-conditional) → ECM canny adapters on the frozen VAR → the full-fine-tune baseline (same
control net and data, VAR unfrozen, full sequences) → ``test`` of both: canny F1 of controlled samples vs the same base
sampled without control (same seeds). Prints a summary table and writes ``<out>/results.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ecm"
SIZE = 32


def _cli(args: list[str]):
    from lightning_modules.cli import CtrlgenCLI, configure_wandb_mode

    configure_wandb_mode()
    return CtrlgenCLI(args=args)


def _data_args(shards: Path, test: bool = False) -> list[str]:
    out = [f"--data.init_args.train_shards={shards}/train-{{000000..000007}}.tar",
           f"--data.init_args.val_shards={shards}/val-000000.tar", f"--data.init_args.resolution={SIZE}"]
    return out + ([f"--data.init_args.test_shards={shards}/test-000000.tar"] if test else [])


def _steps(n: int, fast: bool) -> list[str]:
    n = max(4, n // 10) if fast else n
    return [f"--trainer.max_steps={n}", f"--trainer.val_check_interval={n}",
            f"--data.init_args.train_batches_per_epoch={n}"]


def run_demo(out: Path, fast: bool = False, steps: dict[str, int] | None = None) -> dict[str, Any]:
    """Run every stage into ``out``; returns the summary (also in ``out/summary.json``)."""
    from datamodules.synth import synth

    console = Console()
    steps = {"vqvae": 300, "var": 400, "ecm": 300, "fullft": 150, **(steps or {})}  # ~15 min on 2 cores
    out = Path(out)
    shards = out / "shards"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    console.rule("[bold]ECM demo on the shapes world[/bold] (CPU, 32 px, 8x8 tokens over 6 scales)")
    if not (shards / "test-000000.tar").exists():
        n_train = 512 if fast else 2048
        synth("shapes", shards, n_train=n_train, n_val=64, n_test=64 if fast else 256, size=SIZE, seed=0,
              shard_size=n_train // 8)
    timings["shards"] = time.perf_counter() - t0

    def stage(name: str, config: str, extra: list[str]):
        t = time.perf_counter()
        console.rule(f"stage: {name}")
        cli = _cli(["fit", "-c", str(CONFIGS / config), f"--trainer.default_root_dir={out / name}",
                    *_data_args(shards), *_steps(steps[name], fast), *extra])
        timings[name] = time.perf_counter() - t
        return cli

    stage("vqvae", "demo_vqvae.yaml", [])
    vq_ckpt = out / "vqvae" / "checkpoints" / "last.ckpt"
    stage("var", "demo_var.yaml", [f"--model.init_args.vqvae_weights={vq_ckpt}"])
    var_ckpt = out / "var" / "checkpoints" / "last.ckpt"
    bases = [f"--model.init_args.vqvae_weights={vq_ckpt}", f"--model.init_args.var_weights={var_ckpt}"]
    ecm = stage("ecm", "demo_ecm.yaml", bases)
    ft = stage("fullft", "demo_ecm.yaml", bases + ["--model.init_args.finetune_base=true"])

    results: dict[str, dict[str, float]] = {}
    for name, cli in (("ecm", ecm), ("fullft", ft)):
        t = time.perf_counter()
        console.rule(f"test: {name}")
        tested = _cli(["test", "-c", str(CONFIGS / "demo_ecm.yaml"), f"--trainer.default_root_dir={out / name}-test",
                       *_data_args(shards, test=True), *bases,
                       f"--model.init_args.finetune_base={'true' if name == 'fullft' else 'false'}",
                       f"--ckpt_path={out / name / 'checkpoints' / 'last.ckpt'}"])
        m = {k: float(v) for k, v in tested.trainer.callback_metrics.items() if k.startswith("test/")}
        m["trainable_params"] = float(sum(p.numel() for p in cli.model.parameters() if p.requires_grad))
        m["train_s_per_step"] = timings[name] / max(1, cli.trainer.global_step)
        results[name] = m
        timings[f"test_{name}"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    summary = {"results": results, "timings_s": timings, "total_s": total, "fast": fast, "steps": steps,
               "margin_f1_ecm_vs_base": results["ecm"]["test/canny_f1"] - results["ecm"]["test/canny_f1_base"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_and_write(console, summary, out)
    return summary


def _print_and_write(console: Console, s: dict[str, Any], out: Path) -> None:
    table = Table(title=f"ECM demo: canny F1 on {out}/shards/test (higher = follows the condition)")
    for col in ("model", "canny F1 (controlled)", "canny F1 (same base, no control)", "trainable params",
                "train s/step"):
        table.add_column(col)
    lines = ["| model | canny F1 controlled | canny F1 base, no control | trainable params | train s/step |",
             "|---|---|---|---|---|"]
    for name, label in (("ecm", "ECM (frozen VAR + adapters)"), ("fullft", "full fine-tune baseline")):
        m = s["results"][name]
        row = [label, f"{m['test/canny_f1']:.4f}", f"{m['test/canny_f1_base']:.4f}", f"{int(m['trainable_params']):,}",
               f"{m['train_s_per_step']:.3f}"]
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    console.print(f"F1 margin ECM vs uncontrolled base: {s['margin_f1_ecm_vs_base']:+.4f}; total {s['total_s']:.0f} s; "
                  f"stage times {', '.join(f'{k} {v:.0f}s' for k, v in s['timings_s'].items())}")
    console.print(f"checkpoints, sample grids (samples/*.png) and offline W&B runs under {out}/<stage>/")
    (out / "results.md").write_text("\n".join(lines) + f"\n\nmargin {s['margin_f1_ecm_vs_base']:+.4f}, "
                                    f"total {s['total_s']:.0f} s\n")
