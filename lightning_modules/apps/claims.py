"""The demo contract every method's demo follows: ``ctrlgen demo <method> --out DIR`` writes ``DIR/summary.json`` with a
``claims`` list next to its detailed results, one :class:`Claim` per statement the method's paper makes and the demo
measures::

    {"method": "ecm", ..., "claims": [{"name": "canny_f1_margin", "value": 0.12, "target": "> 0.05", "met": true}, ...]}

``target`` is a comparison with a number (``"> 0.05"``, ``"< 1"``, ``">= 0.3"``, ``"<= 2"``); ``met`` is whether
``value`` satisfies it (a claim without a value is not met). :func:`claims_table` prints the claims of several demo
directories as one table and :func:`table_main` (``ctrlgen demo table DIR...``, the end of ``make demo``) returns a
non-zero exit code when any claim is not met or a directory has no readable claims.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_TARGET = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class ClaimsError(ValueError):
    """A summary.json without a readable claims list (the message names the file, what was expected and found)."""


@dataclass(frozen=True)
class Claim:
    """One measured claim of a method's demo."""

    name: str
    value: float | None
    target: str
    met: bool


def parse_target(target: str) -> tuple[str, float]:
    """``"> 0.05"`` → (">", 0.05); ValueError for anything else."""
    m = _TARGET.match(str(target))
    if m is None:
        raise ValueError(f"claim target {target!r}: expected a comparison with a number, e.g. '> 0.05' or '< 1' "
                         f"(operators {', '.join(_OPS)})")
    return m.group(1), float(m.group(2))


def meets(value: float | None, target: str) -> bool:
    """Whether ``value`` satisfies ``target``; a missing or non-finite value never does."""
    op, bound = parse_target(target)
    return value is not None and math.isfinite(float(value)) and _OPS[op](float(value), bound)


def claim(name: str, value: float | None, target: str) -> Claim:
    """A :class:`Claim` with ``met`` computed from ``value`` and ``target``."""
    v = None if value is None else float(value)
    return Claim(name, v, str(target), meets(v, target))


def write_summary(out: str | Path, summary: dict[str, Any], claims: list[Claim]) -> Path:
    """Write ``summary`` with its ``claims`` to ``out/summary.json``; returns the path."""
    path = Path(out) / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "claims": [asdict(c) for c in claims]}, indent=1))
    return path


def read_claims(where: str | Path) -> tuple[str, list[Claim]]:
    """(method, claims) of a demo directory or summary.json; :class:`ClaimsError` if there are none to read."""
    path = Path(where)
    path = path / SUMMARY if path.is_dir() or not path.suffix else path
    fix = "rerun the demo (`ctrlgen demo <method> --out DIR`) or pass the directory it wrote"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClaimsError(f"{path}: no such file; expected the demo's summary.json ({fix})") from None
    except json.JSONDecodeError as e:
        raise ClaimsError(f"{path}: not JSON ({e}); {fix}") from None
    raw = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        found = "no 'claims' key" if not isinstance(data, dict) or "claims" not in data else f"claims={raw!r}"
        raise ClaimsError(f"{path}: expected a non-empty 'claims' list of {{name, value, target, met}}, found "
                          f"{found}; {fix}")
    claims = []
    for i, c in enumerate(raw):
        missing = [k for k in ("name", "value", "target", "met") if not isinstance(c, dict) or k not in c]
        if missing:
            raise ClaimsError(f"{path}: claims[{i}] lacks {missing}; each claim is {{name, value, target, met}}")
        value = c["value"]
        if value is not None and not isinstance(value, (int, float)):
            raise ClaimsError(f"{path}: claims[{i}] ({c['name']}) value {value!r} is not a number or null")
        claims.append(Claim(str(c["name"]), None if value is None else float(value), str(c["target"]),
                            bool(c["met"])))
    method = str(data.get("method") or path.parent.name)
    return method, claims


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def claims_table(dirs: list[str | Path]) -> tuple[str, bool]:
    """One table of the claims of every demo directory, and whether every claim of every directory is met (a
    directory without readable claims counts as not met)."""
    rows, ok = [("method", "claim", "value", "target", "met")], True
    for d in dirs:
        try:
            method, claims = read_claims(d)
        except ClaimsError as e:
            rows.append((Path(d).name, "(no claims)", "-", "-", "NO"))
            rows.append(("", f"  {e}", "", "", ""))
            ok = False
            continue
        for c in claims:
            rows.append((method, c.name, _fmt(c.value), c.target, "yes" if c.met else "NO"))
            ok = ok and c.met
    widths = [max(len(r[i]) for r in rows if not r[1].startswith("  ")) for i in range(5)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(r[1] if r[1].startswith("  ") else "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    n = sum(1 for r in rows[1:] if r[4] in ("yes", "NO"))
    bad = sum(1 for r in rows[1:] if r[4] == "NO")
    lines.append(f"all {n} claims met" if ok else f"{bad} of {n} claims NOT met")
    return "\n".join(lines), ok


def table_main(dirs: list[str | Path]) -> int:
    """Print :func:`claims_table` of ``dirs``; exit code 0 if every claim is met, else 1."""
    text, ok = claims_table(dirs)
    print(text)
    return 0 if ok else 1
