"""Timing, printing and the JSON record of ``bench/gpu_ecm.py`` (only torch needed), and its activation diagnostic.

:class:`Runner` times one case per call (``case``: warm-up, timed steps, median, peak memory), prints one line, keeps
going after a failed case and, with ``--json``, rewrites the record after every line so that a killed run keeps what
it measured. ``check`` records a correctness check (``ok`` / ``CHECK FAILED`` / ``not checked``); failed cases and
failed checks are listed in ``failures`` (the script's exit status). :func:`saved_for_backward` accounts the bytes autograd keeps for the backward, per block.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_profile import kernel_profile, summary  # noqa: E402

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


def elapsed() -> float:
    return time.perf_counter() - T0


class Runner:
    """Runs and prints the cases; with ``--json`` it also rewrites a JSON record after every line (so a run killed
    by a timeout keeps what it measured): {"meta", "cases": {name: {ms, min_ms, n, img_s, peak_gib, batch, tokens}},
    "lines": [[name, text], …]} (every printed line, in order) — ``bench/gpu_report.py`` turns it into the docs
    table against the issue's targets."""

    def __init__(self, args, dev: torch.device, card: str, meta: dict | None = None):
        self.args, self.dev, self.card, self.results = args, dev, card, {}
        self.record = {"meta": {"card": card, **(meta or {})}, "cases": {}, "lines": [], "profiles": {}, "checks": {}}
        self.failures: list[str] = []  # FAILED cases and failed checks: the script's exit status
        self.profile_rx = re.compile(args.profile) if getattr(args, "profile", None) else None

    def save(self) -> None:
        if getattr(self.args, "json", None):
            self.record["meta"]["elapsed_s"] = round(elapsed(), 1)
            tmp = Path(f"{self.args.json}.tmp")  # write + rename: a kill mid-write leaves the previous record whole
            tmp.write_text(json.dumps(self.record, indent=1))
            tmp.replace(self.args.json)

    def check(self, name: str, ok: bool | None, text: str) -> bool | None:
        """A correctness check of the run (tokens, images): prints ``ok: …``, ``CHECK FAILED: …`` or, with ``ok``
        None, ``not checked: …``; kept under "checks" in the JSON record. A failed check fails the run (exit 1)."""
        self.record["checks"][name] = {"ok": ok, "text": text}
        if ok is False:
            self.failures.append(name)
        self.say(name, f"{'ok' if ok else 'not checked' if ok is None else 'CHECK FAILED'}: {text}")
        return ok

    def passed(self, name: str) -> bool:
        return bool(self.record["checks"].get(name, {}).get("ok"))

    def say(self, name: str, text: str) -> None:
        print(f"[gpu_ecm] {self.card} | {name:<22} | {text}", flush=True)
        self.record["lines"].append([name, text])
        self.save()

    def _keep(self, name: str, med: float, ts: list[float] | None, batch: int, tokens, peak: float | None) -> None:
        self.results[name] = med
        self.record["cases"][name] = {"ms": med * 1e3, "min_ms": min(ts) * 1e3 if ts else None,
                                      "n": len(ts) if ts else None, "img_s": batch / med, "batch": batch,
                                      "tokens": tokens, "peak_gib": None if peak is None or peak != peak else peak}

    def case(self, name: str, fn_factory, batch: int, tokens: int | str, warmup=None, iters=None,
             need: float = 0.0) -> float | None:
        """Build the step with ``fn_factory()`` (returns (step, cleanup)), time it, print one line. Returns s/step.
        Skipped when fewer than ``need`` seconds of --time-budget are left."""
        a = self.args
        if elapsed() + need > a.time_budget:
            self.say(name, f"SKIPPED ({elapsed():.0f} s elapsed, needs ~{need:.0f} s, time budget {a.time_budget:.0f} s)")
            return None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        t_case = time.perf_counter()
        cleanup = None
        try:
            step, cleanup = fn_factory()
            ts = timed(step, a.warmup if warmup is None else warmup, a.iters if iters is None else iters, self.dev)
            med, peak = statistics.median(ts), gib(self.dev)
            self._keep(name, med, ts, batch, tokens, peak)
            self.say(name, f"B {batch:>3} | tok {tokens!s:>5} | {med * 1e3:8.1f} ms/step (min {min(ts) * 1e3:.1f}, "
                           f"n {len(ts)}) | {batch / med:8.1f} img/s | peak {peak:6.2f} GiB | "
                           f"case wall {time.perf_counter() - t_case:5.1f} s")
            if self.profile_rx is not None and self.profile_rx.fullmatch(name):
                self.profile(name, step)
        except Exception as e:  # noqa: BLE001 - report (OOM, compile failure) and go on with the next case
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            self.failures.append(name)
            self.say(name, f"FAILED {type(e).__name__}: {msg}")
            return None
        finally:
            if cleanup is not None:
                cleanup()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        return med

    def profile(self, name: str, step) -> None:
        """--profile: two more steps under torch.profiler, summed by kind of kernel (``prof_<case>`` lines)."""
        try:
            p = kernel_profile(step, self.dev, steps=2)
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            self.say(f"prof_{name}", f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return
        self.record["profiles"][name] = p
        head, tops = summary(p)
        self.say(f"prof_{name}", head)
        self.say(f"prof_{name}", tops)

    def derived(self, name: str, times: dict[int, float | None], probs: dict[int, float], eds: list[int],
                batch: int, peak_of: str) -> float | None:
        """Expected step time Σ p_s t_s of early-centric training from the per-s lines."""
        if any(times.get(s) is None for s in probs):
            return None
        mean_t = sum(p * times[s] for s, p in probs.items())
        mean_tok = sum(p * eds[s] for s, p in probs.items())
        self._keep(name, mean_t, None, batch, round(mean_tok), None)
        self.say(name, f"B {batch:>3} | tok {mean_tok:>5.0f} | {mean_t * 1e3:8.1f} ms/step (= Σ p_s t_s, trunc_probs "
                       f"{probs}) | {batch / mean_t:8.1f} img/s | peak = {peak_of}")
        return mean_t


def saved_for_backward(fn, blocks) -> tuple[dict[str, dict[tuple, int]], int]:
    """Run ``fn()`` (a forward + loss) and account the tensors autograd saves for backward, by where they were
    saved ("block i" while ``blocks[i]`` runs, else "other": embeddings, head, loss) and by (dtype, shape); each
    storage is counted once. Parameters and their autocast copies are saved too (batch-independent)."""
    where, seen = ["other"], set()
    out: dict[str, dict[tuple, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            d = out.setdefault(where[-1], {})
            key = (str(t.dtype).replace("torch.", ""), tuple(t.shape))
            d[key] = d.get(key, 0) + st.nbytes()
        return t

    def enter(i):
        def pre_hook(module, args) -> None:
            where.append(f"block {i}")
        return pre_hook

    def leave(module, args, output) -> None:  # returns None: the block's output is kept
        where.pop()

    hooks = []
    for i, b in enumerate(blocks):
        hooks += [b.register_forward_pre_hook(enter(i)), b.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in hooks:
            h.remove()
    return out, sum(sum(d.values()) for d in out.values())
