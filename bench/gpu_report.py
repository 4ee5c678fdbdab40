"""Markdown report of a ``bench/gpu_ecm.py --json`` record against the ECM issue's GPU targets (acceptance 5).

Prints the run's setup, every case (ms/step, img/s, peak memory) and the targets table: for each target the best
case that measures it, its value and whether the target is met. The official reference figures (387 / 1,087 / 145
img/s) were measured on one H200 at batch 64 with VAR-d16: a run on another card, batch or model is flagged.

    python bench/gpu_report.py gpu_ecm.json >> notes.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable

OFFICIAL = {"train_all": 387.0, "train_8": 1087.0, "sample": 145.0}


def best(cases: dict, pattern: str, keep=lambda name: True) -> tuple[str, dict] | None:
    """The fastest case whose name matches ``pattern`` (full match) and that ``keep`` accepts."""
    hits = [(n, c) for n, c in cases.items() if re.fullmatch(pattern, n) and keep(n)]
    return max(hits, key=lambda nc: nc[1]["img_s"]) if hits else None


def ratio_rows(cases: dict, num: str, den: str, suffixes: list[str]) -> list[tuple[str, float]]:
    out = []
    for s in suffixes:
        a, b = cases.get(num.format(s)), cases.get(den.format(s))
        if a and b:
            out.append((f"{num.format(s)} / {den.format(s)}", a["ms"] / b["ms"]))
    return out


def sampler_verified(checks: dict, batch: int | None) -> Callable[[str], bool]:
    """``keep`` for the sampling target: eager (the reference), the ``_fd`` cases (built by gpu_ecm.py from checked
    modes and decoders only) and the modes whose ``sample_check_{base,ecm}_b{batch}_{mode}`` both passed."""
    def keep(name: str) -> bool:
        mode = name.rsplit("_", 1)[-1]
        return mode in ("eager", "fd") or all(checks.get(f"sample_check_{k}_b{batch}_{mode}", {}).get("ok") is True
                                              for k in ("base", "ecm"))
    return keep


def profile_table(profiles: dict) -> list[str]:
    """--profile: per profiled case the busy share and the time split by kind of kernel (columns: every kind that
    takes ≥ 1 % somewhere), then the top kernels."""
    if not profiles:
        return []
    share = {n: {k: v / p["busy_ms"] for k, v in p["by_category"].items()} for n, p in profiles.items() if p["busy_ms"]}
    kinds = sorted({k for sh in share.values() for k, f in sh.items() if f >= 0.01},
                   key=lambda k: -sum(sh.get(k, 0.0) for sh in share.values()))
    busy = "device busy" if any(p.get("device") for p in profiles.values()) else "op busy (CPU)"
    out = ["", f"Where the time goes (`--profile`: 2 steps under torch.profiler; shares of the {busy} time):", "",
           f"| case | wall ms | {busy} | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for n, sh in share.items():
        p = profiles[n]
        out.append(f"| `{n}` | {p['wall_ms']:.1f} | {100 * p['busy_frac']:.0f}% | "
                   + " | ".join(f"{100 * sh.get(k, 0.0):.0f}%" for k in kinds) + " |")
    out += ["", "Top kernels per profiled case:", ""]
    out += [f"- `{n}`: " + "; ".join(f"{name[:80]} {ms:.2f} ms [{kind}]" for name, ms, kind in p["top"])
            for n, p in profiles.items()]
    return out


def report(rec: dict) -> str:
    meta, cases, checks = rec["meta"], rec["cases"], rec.get("checks", {})
    lines = [f"**Card**: {meta.get('card')}, torch {meta.get('torch')}, CUDA {meta.get('cuda')}; VAR {meta.get('var')}, "
             f"VQVAE {meta.get('vqvae')}, control {meta.get('control')}, batch {meta.get('batch')}; "
             f"{meta.get('elapsed_s')} s. **Command**: `{meta.get('command')}`", ""]
    if "H200" not in str(meta.get("card")) or meta.get("batch") != 64 or meta.get("var") != "d16":
        lines += ["> The official figures are from an H200 at batch 64 with VAR-d16; this run differs, so compare "
                  "the targets below with care.", ""]
    lines += ["| case | tokens | ms/step | min ms | img/s | peak GiB |", "|---|---|---|---|---|---|"]
    for n, c in cases.items():
        peak = "–" if c.get("peak_gib") is None else f"{c['peak_gib']:.2f}"
        mn = "–" if c.get("min_ms") is None else f"{c['min_ms']:.1f}"
        lines.append(f"| `{n}` | {c['tokens']} | {c['ms']:.1f} | {mn} | {c['img_s']:.1f} | {peak} |")
    toks = sorted({int(m[1]) for n in cases if (m := re.fullmatch(r"var_train_(\d+)(c|cf)?", n))})
    B = meta.get("batch")
    targets = []
    if toks:
        for label, tok, ref in (("base VAR training, all tokens", toks[-1], OFFICIAL["train_all"]),
                                ("base VAR training, first 8 scales", toks[0], OFFICIAL["train_8"])):
            if label.endswith("scales") and len(toks) < 2:
                continue
            targets.append((f"{label} ({tok} tokens) ≥ official compiled", ref, best(cases, f"var_train_{tok}(c|cf)?"),
                            "≥"))
    targets.append(("ECM training, early-centric (Σ p_s t_s)", 1000.0, best(cases, r"ecm_train_early(c|cf)?"), "≥"))
    targets.append((f"CFG sampling incl. decode ≥ 2× official ({OFFICIAL['sample']:.0f})", 2 * OFFICIAL["sample"],
                    best(cases, rf"sample_base_b{B}_\w+", sampler_verified(checks, B)), "≥"))
    lines += ["", "| target | needed | best case | measured | met? |", "|---|---|---|---|---|"]
    for label, need, hit, _ in targets:
        if hit is None:
            lines.append(f"| {label} | {need:,.0f} img/s | – | not measured | – |")
        else:
            lines.append(f"| {label} | {need:,.0f} img/s | `{hit[0]}` | {hit[1]['img_s']:.1f} img/s | "
                         f"{'**yes**' if hit[1]['img_s'] >= need else 'no'} |")
    modes = sorted({m[1] for n in cases if (m := re.fullmatch(rf"sample_base_b{B}_(\w+)", n))})
    for name, value in ratio_rows(cases, f"sample_ecm_b{B}_{{}}", f"sample_base_b{B}_{{}}", modes):
        lines.append(f"| sampling with adapters ≤ 1.15× base | ≤ 1.15 | {name} | {value:.3f}× | "
                     f"{'**yes**' if value <= 1.15 else 'no'} |")
    full = [n for n in cases if re.fullmatch(r"ecm_fullft_\d+", n)]
    if full:
        tail = full[0][len("ecm_fullft"):]
        for name, value in ratio_rows(cases, "ecm_train_early{}", "ecm_fullft" + tail + "{}", ["", "c"]):
            lines.append(f"| ECM epoch ≤ 0.45× full fine-tune | ≤ 0.45 | {name} | {value:.3f}× | "
                         f"{'**yes**' if value <= 0.45 else 'no'} |")
    lines.append("")
    lines.append("The sampling target counts only samplers whose tokens matched the eager sampler's (checks below).")
    if checks:
        verdict = {True: "ok", False: "**FAILED**", None: "not checked"}
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| `{n}` | {verdict[c['ok']]} | {c['text'].replace('|', chr(92) + '|')} |" for n, c in checks.items()]
    lines += profile_table(rec.get("profiles", {}))
    notes = [(k, v) for k, v in rec.get("lines", []) if k not in cases and k not in checks and not k.startswith("prof_")]
    if notes:
        lines += ["", "Other lines:", ""] + [f"- `{k}`: {v}" for k, v in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="the file written by bench/gpu_ecm.py --json")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        sys.stdout.write(report(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
