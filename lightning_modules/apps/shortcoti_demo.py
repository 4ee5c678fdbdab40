"""``ctrlgen demo shortcoti --out DIR``: ShortCoTI's length modes on the counted-scenes world (CPU, a tiny Janus).

Stages: (1) prompt files from :mod:`ctrlgen.lightning_modules.shortcoti.world` (train / disjoint held-out, half hard);
(2) supervised world pretraining of a tiny Janus with verbose CoTs (:func:`~.pretrain.pretrain_on_world`), saved to
``DIR/policy``; (3) GRPO from that policy with ``configs/shortcoti/demo.yaml`` under each length mode — ``none``
(T2I-R1), ``adaptive`` (ShortCoTI), ``cap`` (CapLength), ``target`` (TargetLength) — same start, seeds and steps,
two branches at a time in parallel processes; each branch then evaluates its policy on the held-out prompts
(``eval_G`` samples each): checker score and CoT words per row. Claims (``DIR/summary.json``):

- ``cot_length_reduction``: 1 − mean CoT words (ShortCoTI) / mean CoT words (no penalty), target ``>= 0.40``;
- ``task_reward_delta``: held-out checker score ShortCoTI − no penalty, target ``>= -0.02``;
- ``adaptive_hard_easy_ratio``: mean CoT words hard / easy under ShortCoTI, target ``>`` the same ratio under
  TargetLength (measured in the same run).

Runnable as ``python -m ctrlgen.lightning_modules.apps.shortcoti_demo --out DIR`` while not registered in the demo
dispatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ctrlgen.configs import CONFIG_DIR
from ctrlgen.lightning_modules.apps.claims import (
    Claim,
    claim,
    claims_table,
    write_summary,
)
from ctrlgen.lightning_modules.apps.stages import demo_threads, run_cli

CONFIG = CONFIG_DIR / "shortcoti" / "demo.yaml"
MODES = ("none", "adaptive", "cap", "target")
DEFAULTS = {"pretrain_steps": 700, "grpo_steps": 120, "n_train": 400, "n_val": 32, "eval_G": 4}
TARGETS = {"cot_length_reduction": ">= 0.40", "task_reward_delta": ">= -0.02"}


def run_branch(spec_json: str) -> None:
    """One GRPO branch (fit, then held-out evaluation) in this process; writes ``spec["result"]``."""
    import torch
    from ctrlgen.datamodules.prompts import load_prompts

    spec = json.loads(spec_json)
    torch.set_num_threads(demo_threads())
    out = Path(spec["out"])
    t = time.perf_counter()
    cli = run_cli(["fit", "-c", str(CONFIG), f"--trainer.default_root_dir={out / spec['mode']}", "--overwrite",
                   f"--model.init_args.janus_path={out / 'policy'}", f"--model.init_args.length.mode={spec['mode']}",
                   f"--model.init_args.max_iterations={spec['steps']}",
                   f"--trainer.val_check_interval={spec['steps']}",
                   f"--data.init_args.train_prompts={out / 'prompts' / 'train.jsonl'}",
                   f"--data.init_args.val_prompts={out / 'prompts' / 'val.jsonl'}", *spec.get("extra", [])])
    fit_s = time.perf_counter() - t
    model = cli.model.eval()
    val = load_prompts(str(out / "prompts" / "val.jsonl"))
    torch.manual_seed(1234)  # the same evaluation draws for every branch
    res = model.evaluate([p["prompt"] for p in val], [p["meta"] for p in val], G=spec["eval_G"])
    G = spec["eval_G"]
    rows = [{"prompt": p["prompt"], "difficulty": p["meta"]["difficulty"], "reward": float(res["reward"][i * G + g]),
             "words": float(res["words"][i * G + g]), "cot": res["texts"][i * G + g]}
            for i, p in enumerate(val) for g in range(G)]
    Path(spec["result"]).write_text(json.dumps({"rows": rows, "fit_s": fit_s, "iterations": model.iteration}))


def _start(out: Path, mode: str, steps: int, eval_G: int, extra: list[str]) -> tuple[subprocess.Popen, Path, Any]:
    result = out / f"{mode}.result.json"
    result.unlink(missing_ok=True)
    spec = {"out": str(out), "mode": mode, "steps": steps, "eval_G": eval_G, "result": str(result), "extra": extra}
    env = {**os.environ, "OMP_NUM_THREADS": str(demo_threads())}
    code = "import sys; from ctrlgen.lightning_modules.apps.shortcoti_demo import run_branch; run_branch(sys.argv[1])"
    log = open(out / f"{mode}.log", "w")  # noqa: SIM115 (closed once the child has ended)
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                            env=env), result, log


def _mean(rows: list[dict], key: str, difficulty: str | None = None) -> float:
    sel = [r[key] for r in rows if difficulty is None or r["difficulty"] == difficulty]
    return sum(sel) / max(1, len(sel))


def summarise(branches: dict[str, dict]) -> dict[str, Any]:
    """Per-mode held-out means (reward, words; all / easy / hard) and the hard/easy word ratio."""
    out = {}
    for mode, b in branches.items():
        rows = b["rows"]
        easy, hard = _mean(rows, "words", "easy"), _mean(rows, "words", "hard")
        out[mode] = {"reward": _mean(rows, "reward"), "reward_easy": _mean(rows, "reward", "easy"),
                     "reward_hard": _mean(rows, "reward", "hard"), "words": _mean(rows, "words"),
                     "words_easy": easy, "words_hard": hard, "hard_easy_ratio": hard / easy if easy else None,
                     "fit_s": b["fit_s"], "iterations": b["iterations"]}
    return out


def shortcoti_claims(res: dict[str, dict]) -> list[Claim]:
    """The three claims of the module docstring from :func:`summarise`'s per-mode results."""
    none, ada, tgt = res["none"], res["adaptive"], res["target"]
    reduction = 1 - ada["words"] / none["words"] if none["words"] else None
    ratio_target = tgt["hard_easy_ratio"]
    return [claim("cot_length_reduction", reduction, TARGETS["cot_length_reduction"]),
            claim("task_reward_delta", ada["reward"] - none["reward"], TARGETS["task_reward_delta"]),
            claim("adaptive_hard_easy_ratio", ada["hard_easy_ratio"],
                  f"> {ratio_target:.4f}" if ratio_target is not None else "> 1e9")]


def run_demo(out: Path, pretrain_steps: int, grpo_steps: int, n_train: int, n_val: int, eval_G: int,
             extra: list[str] | None = None) -> dict[str, Any]:
    import torch
    from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy, TinyJanusSpec
    from ctrlgen.lightning_modules.shortcoti.pretrain import pretrain_on_world
    from ctrlgen.lightning_modules.shortcoti.world import split_prompts, write_jsonl

    torch.set_num_threads(demo_threads())
    out = Path(out)
    t0 = time.perf_counter()
    train, val = split_prompts(n_train, n_val, seed=0)
    write_jsonl(train, out / "prompts" / "train.jsonl")
    write_jsonl(val, out / "prompts" / "val.jsonl")
    torch.manual_seed(0)
    policy = JanusPolicy.tiny(TinyJanusSpec(init_std=0.02), seed=0)
    history = pretrain_on_world(policy, [p["prompt"] for p in train], steps=pretrain_steps)
    policy.save_pretrained(out / "policy")
    timings = {"pretrain": time.perf_counter() - t0}
    branches: dict[str, dict] = {}
    for pair in (MODES[:2], MODES[2:]):
        t = time.perf_counter()
        started = [(m, *_start(out, m, grpo_steps, eval_G, list(extra or []))) for m in pair]
        for mode, child, result, log in started:
            rc = child.wait()
            log.close()
            if rc != 0 or not result.exists():
                tail = (out / f"{mode}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ShortCoTI branch {mode} failed (exit {rc}); end of {out / f'{mode}.log'}:\n{tail}")
            branches[mode] = json.loads(result.read_text())
        timings["+".join(pair)] = time.perf_counter() - t
    results = summarise(branches)
    summary = {"method": "shortcoti", "results": results, "pretrain": history[-1], "timings_s": timings,
               "total_s": time.perf_counter() - t0, "settings": {"pretrain_steps": pretrain_steps,
                                                                  "grpo_steps": grpo_steps, "n_train": n_train,
                                                                  "n_val": n_val, "eval_G": eval_G,
                                                                  "extra": list(extra or [])}}
    claims = shortcoti_claims(results)
    write_summary(out, summary, claims)
    print(json.dumps(results, indent=1))
    print(claims_table([out])[0])
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    for key, v in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=v, help=f"default {v}")
    p.add_argument("--extra", action="append", default=[], help="extra ctrlgen fit arguments for every GRPO branch")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, Any]:
    return run_demo(Path(args.out), args.pretrain_steps, args.grpo_steps, args.n_train, args.n_val, args.eval_G,
                    args.extra)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ctrlgen.lightning_modules.apps.shortcoti_demo")
    parser.add_argument("--out", default="demo_runs/shortcoti")
    add_arguments(parser)
    run(parser.parse_args(), parser)
