"""Warm start-up time of ``ctrlgen --help`` next to ``python -c "import lightning"``, in one run.

Each command runs as a fresh process ``--reps`` times after ``--warmup`` runs (which fill the OS file cache, so the
times are warm); the order alternates between repetitions. Prints the median and minimum of each and the ratio of the
medians. ``ctrlgen --help`` is run as ``python -m ctrlgen.lightning_modules.cli --help`` (what the console script
does) with this interpreter.

    .venv/bin/python bench/bench_cli_help.py [--reps 9] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "ctrlgen --help": [sys.executable, "-m", "ctrlgen.lightning_modules.cli", "--help"],
    'python -c "import lightning"': [sys.executable, "-c", "import lightning"],
    'python -c "pass"': [sys.executable, "-c", "pass"],
}


def once(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    names = list(CASES)
    for _ in range(args.warmup):
        for n in names:
            once(CASES[n], env)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.reps):
        for n in names[r % 2:] + names[: r % 2]:  # alternate the order
            times[n].append(once(CASES[n], env))
    med = {n: statistics.median(v) for n, v in times.items()}
    ref = med['python -c "import lightning"']
    print(f"reps {args.reps} after {args.warmup} warm-up runs; python {sys.version.split()[0]}")
    print("| command | median s | min s | median ratio to `import lightning` |")
    print("|---|---|---|---|")
    for n in names:
        print(f"| `{n}` | {med[n]:.3f} | {min(times[n]):.3f} | {med[n] / ref:.3f}× |")


if __name__ == "__main__":
    main()
