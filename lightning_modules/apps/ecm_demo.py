"""``ctrlgen demo ecm``: the CPU proof of life on the ``shapes`` world.

Stages, each a real ``ctrlgen fit``/``test`` run with its own checkpoint, sample grids and (offline) W&B run:
shards → VQVAE → VAR (class-conditional) → ECM canny adapters on the frozen VAR → the full-fine-tune baseline (same
control net and data, VAR unfrozen, full sequences) → ``test`` of both: canny F1 of controlled samples vs the same base
sampled without control (same seeds). Prints a summary table and writes ``<out>/results.md`` and ``<out>/summary.json``
with the demo contract's claims (:mod:`ctrlgen.lightning_modules.apps.claims`):

- ``canny_f1_margin``: canny F1 of ECM's controlled samples − that of the same frozen base sampled without control
  (paired, same seeds and test images), target ``> 0.05``;
- ``epoch_cost_ratio``: ECM train s/step ÷ full-fine-tune train s/step (:class:`StepTimer`), target ``< 1``.

Sized for 2 shared CPU cores (docs/results.md): one intra-op thread per process, and the ECM and full-fine-tune
branches (fit + test each; both need only the VAR) run in two processes side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ctrlgen.configs import CONFIG_DIR
from ctrlgen.lightning_modules.apps.claims import Claim, claim, claims_table, write_summary
from ctrlgen.lightning_modules.apps.stages import (  # StepTimer: re-exported, the timer the stages add
    STEP_TIMER,
    StepTimer,
    demo_threads,
    run_cli,
    step_time,
)

CONFIGS = CONFIG_DIR / "ecm"
SIZE = 32
# Steps per stage (`--fast`: a tenth). Sized for ≤ 15 min in total on 2 CPU cores (docs/results.md has a measured run).
DEFAULT_STEPS = {"vqvae": 300, "var": 400, "ecm": 300, "fullft": 300}
TARGETS = {"canny_f1_margin": "> 0.05", "epoch_cost_ratio": "< 1"}
__all__ = ["DEFAULT_STEPS", "TARGETS", "StepTimer", "add_arguments", "ecm_claims", "run", "run_demo"]


def _data_args(shards: Path, test: bool = False) -> list[str]:
    out = [f"--data.init_args.train_shards={shards}/train-{{000000..000007}}.tar",
           f"--data.init_args.val_shards={shards}/val-000000.tar", f"--data.init_args.resolution={SIZE}"]
    return out + ([f"--data.init_args.test_shards={shards}/test-000000.tar"] if test else [])


def _steps(n: int, fast: bool) -> list[str]:
    n = max(4, n // 10) if fast else n
    return [f"--trainer.max_steps={n}", f"--trainer.val_check_interval={n}",
            f"--data.init_args.train_batches_per_epoch={n}", f"--trainer.callbacks+={STEP_TIMER}"]


def _fit(out: Path, name: str, config: str, n: int, fast: bool, extra: list[str]) -> tuple[Any, float]:
    t = time.perf_counter()
    cli = run_cli(["fit", "-c", str(CONFIGS / config), f"--trainer.default_root_dir={out / name}", "--overwrite",
                *_data_args(out / "shards"), *_steps(n, fast), *extra])  # each demo run trains its stages afresh
    return cli, time.perf_counter() - t


def _test(out: Path, name: str, fit_cli: Any, fit_s: float, bases: list[str]) -> tuple[dict[str, float], float]:
    t = time.perf_counter()
    tested = run_cli(["test", "-c", str(CONFIGS / "demo_ecm.yaml"), f"--trainer.default_root_dir={out / name}-test",
                   *_data_args(out / "shards", test=True), *bases,
                   f"--model.init_args.finetune_base={'true' if name == 'fullft' else 'false'}",
                   f"--ckpt_path={out / name / 'checkpoints' / 'last.ckpt'}"])
    m = {k: float(v) for k, v in tested.trainer.callback_metrics.items() if k.startswith("test/")}
    m["trainable_params"] = float(sum(p.numel() for p in fit_cli.model.parameters() if p.requires_grad))
    step_s = step_time(fit_cli)
    m["train_s_per_step"] = step_s if step_s is not None else fit_s / max(1, fit_cli.trainer.global_step)
    m["train_steps"] = float(fit_cli.trainer.global_step)
    return m, time.perf_counter() - t


def _fit_and_test(out: Path, name: str, n: int, fast: bool, bases: list[str], extra: list[str]) -> dict[str, Any]:
    cli, fit_s = _fit(out, name, "demo_ecm.yaml", n, fast, bases + extra)
    metrics, test_s = _test(out, name, cli, fit_s, bases)
    return {"metrics": metrics, "fit_s": fit_s, "test_s": test_s}


def run_branch(spec_json: str) -> None:
    """The full-fine-tune branch (fit + test) in its own process, started by :func:`run_demo`; writes its metrics and
    times to ``spec["result"]``."""
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(demo_threads())
    res = _fit_and_test(Path(spec["out"]), spec["name"], spec["n"], spec["fast"], spec["bases"], spec["extra"])
    Path(spec["result"]).write_text(json.dumps(res))


def run_demo(out: Path, fast: bool = False, steps: dict[str, int] | None = None,
             parallel: bool = True) -> dict[str, Any]:
    """Run every stage into ``out``; returns the summary (also in ``out/summary.json``, with the claims).

    Every process uses ``demo_threads()`` intra-op threads. With ``parallel`` the full-fine-tune branch (fit + test)
    runs in a second process while this one runs the ECM branch; its console output goes to ``out/fullft.log``."""
    import torch

    from ctrlgen.datamodules.synth import synth

    console = Console()
    torch.set_num_threads(demo_threads())
    steps = {**DEFAULT_STEPS, **(steps or {})}
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

    step_s: dict[str, float | None] = {}
    console.rule("stage: vqvae")
    cli, timings["vqvae"] = _fit(out, "vqvae", "demo_vqvae.yaml", steps["vqvae"], fast, [])
    step_s["vqvae"] = step_time(cli)
    vq_ckpt = out / "vqvae" / "checkpoints" / "last.ckpt"
    console.rule("stage: var")
    cli, timings["var"] = _fit(out, "var", "demo_var.yaml", steps["var"], fast,
                               [f"--model.init_args.vqvae_weights={vq_ckpt}"])
    step_s["var"] = step_time(cli)
    del cli
    var_ckpt = out / "var" / "checkpoints" / "last.ckpt"
    bases = [f"--model.init_args.vqvae_weights={vq_ckpt}", f"--model.init_args.var_weights={var_ckpt}"]
    ft_extra = ["--model.init_args.finetune_base=true"]

    t = time.perf_counter()
    child = None
    if parallel:
        result = out / "fullft.result.json"
        result.unlink(missing_ok=True)
        spec = {"out": str(out), "name": "fullft", "n": steps["fullft"], "fast": fast, "bases": bases,
                "extra": ft_extra, "result": str(result)}
        env = {**os.environ, "OMP_NUM_THREADS": str(demo_threads())}
        code = "import sys; from ctrlgen.lightning_modules.apps.ecm_demo import run_branch; run_branch(sys.argv[1])"
        log = open(out / "fullft.log", "w")  # noqa: SIM115 (closed once the child has ended)
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                                 env=env)
        console.rule(f"stage: ecm (fit + test; the full fine-tune runs in parallel, log {out / 'fullft.log'})")
    else:
        console.rule("stage: ecm (fit + test)")
    branches = {"ecm": _fit_and_test(out, "ecm", steps["ecm"], fast, bases, [])}
    if child is not None:
        console.rule("waiting for the full fine-tune branch")
        rc = child.wait()
        log.close()
        if rc != 0 or not result.exists():
            tail = (out / "fullft.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"full fine-tune branch failed (exit {rc}); end of {out / 'fullft.log'}:\n{tail}")
        branches["fullft"] = json.loads(result.read_text())
    else:
        console.rule("stage: fullft (fit + test)")
        branches["fullft"] = _fit_and_test(out, "fullft", steps["fullft"], fast, bases, ft_extra)
    timings["ecm_and_fullft_branches"] = time.perf_counter() - t

    results: dict[str, dict[str, float]] = {}
    for name, b in branches.items():
        timings[name], timings[f"test_{name}"] = b["fit_s"], b["test_s"]
        results[name] = b["metrics"]
        step_s[name] = b["metrics"]["train_s_per_step"]
    total = time.perf_counter() - t0
    summary = {"results": results, "timings_s": timings, "total_s": total, "fast": fast, "steps": steps,
               "train_s_per_step": step_s, "threads_per_process": demo_threads(), "parallel_branches": parallel,
               "margin_f1_ecm_vs_base": results["ecm"]["test/canny_f1"] - results["ecm"]["test/canny_f1_base"],
               "margin_f1_ecm_vs_base_sem": results["ecm"].get("test/canny_f1_margin_sem"),
               "ratio_train_s_per_step_ecm_vs_fullft": results["ecm"]["train_s_per_step"]
               / results["fullft"]["train_s_per_step"]}
    claims = ecm_claims(summary)
    write_summary(out, {"method": "ecm", **summary}, claims)
    _print_and_write(console, summary, out)
    return {"method": "ecm", **summary, "claims": [asdict(c) for c in claims]}


def ecm_claims(summary: dict[str, Any]) -> list[Claim]:
    """The demo contract's claims from the summary's paired F1 margin and train s/step ratio (:data:`TARGETS`)."""
    return [claim("canny_f1_margin", summary["margin_f1_ecm_vs_base"], TARGETS["canny_f1_margin"]),
            claim("epoch_cost_ratio", summary["ratio_train_s_per_step_ecm_vs_fullft"], TARGETS["epoch_cost_ratio"])]


def _print_and_write(console: Console, s: dict[str, Any], out: Path) -> None:
    table = Table(title=f"ECM demo: canny F1 on {out}/shards/test (higher = follows the condition)")
    for col in ("model", "canny F1 (controlled)", "canny F1 (same base, no control)", "paired margin ± SEM",
                "trainable params", "train s/step"):
        table.add_column(col)
    lines = [("| model | canny F1 controlled | canny F1 base, no control | paired margin ± SEM | trainable params | "
              "train s/step |"), "|---|---|---|---|---|---|"]
    for name, label in (("ecm", "ECM (frozen VAR + adapters)"), ("fullft", "full fine-tune baseline")):
        m = s["results"][name]
        margin = f"{m['test/canny_f1'] - m['test/canny_f1_base']:+.4f}"
        if m.get("test/canny_f1_margin_sem") is not None:
            margin += f" ± {m['test/canny_f1_margin_sem']:.4f}"
        row = [label, f"{m['test/canny_f1']:.4f}", f"{m['test/canny_f1_base']:.4f}", margin,
               f"{int(m['trainable_params']):,}", f"{m['train_s_per_step']:.3f}"]
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items())
    ratio = s["ratio_train_s_per_step_ecm_vs_fullft"]
    sem = s.get("margin_f1_ecm_vs_base_sem")
    margin = f"{s['margin_f1_ecm_vs_base']:+.4f}" + (f" ± {sem:.4f} (SEM, paired per test image)" if sem else "")
    console.print(f"F1 margin ECM vs uncontrolled base: {margin}; ECM/full-FT train s/step "
                  f"{ratio:.2f}; total {s['total_s']:.0f} s; stage times {stages}")
    console.print(f"checkpoints, sample grids (samples/*.png) and offline W&B runs under {out}/<stage>/")
    claims, _ = claims_table([out])
    (out / "results.md").write_text("\n".join(lines) + f"\n\nmargin {margin}, ECM/full-FT "
                                    f"train s/step {ratio:.2f}, total {s['total_s']:.0f} s ({stages})\n\n"
                                    f"```\n{claims}\n```\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``ctrlgen demo ecm`` options."""
    p.add_argument("--fast", action="store_true", help="a tenth of the steps and a quarter of the data (smoke run)")
    p.add_argument("--steps", default="", metavar="STAGE=N,...",
                   help="override steps per stage, e.g. vqvae=600,var=800 (stages: vqvae, var, ecm, fullft)")
    p.add_argument("--sequential", action="store_true",
                   help="run the full-fine-tune branch after the ECM branch instead of in a parallel process")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any]:
    """``ctrlgen demo ecm``: parse ``--steps`` and run :func:`run_demo` into ``args.out``."""
    steps: dict[str, int] = {}
    for item in filter(None, args.steps.split(",")):
        name, _, n = item.partition("=")
        if name not in DEFAULT_STEPS or not n.isdigit() or int(n) < 1:
            p.error(f"--steps: bad item {item!r}; expected STAGE=N with STAGE in {sorted(DEFAULT_STEPS)} and N >= 1")
        steps[name] = int(n)
    return run_demo(Path(args.out), fast=args.fast, steps=steps, parallel=not args.sequential)
