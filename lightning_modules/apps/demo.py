"""``ctrlgen demo``: the registry of implemented methods' demos, and the table of their claims.

    ctrlgen demo <method> [--out DIR] [method options]   run one method's demo (default DIR: demo_runs/<method>)
    ctrlgen demo table DIR [DIR ...]                      one table of the claims in DIR/summary.json; exit 1 if any
                                                          claim is not met or a DIR has none
    ctrlgen demo list                                     the implemented methods, one line (what ``make demo`` runs)

Every demo follows the contract of :mod:`ctrlgen.lightning_modules.apps.claims`: it writes ``DIR/summary.json`` with a
``claims`` list next to its detailed results; ``ctrlgen demo <method>`` prints them after the run. A demo run exits 0
when it completed, whether or not its claims are met; ``ctrlgen demo table`` (the last step of ``make demo``) sets the
exit code from the claims. A demo module provides ``add_arguments(parser)`` and ``run(args, parser)``; it is imported
only for the demo that runs (or whose ``--help`` is asked for), so ``ctrlgen demo --help`` needs no Lightning.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ctrlgen.lightning_modules.apps.claims import SUMMARY, claims_table, table_main


def _ecm() -> ModuleType:
    from ctrlgen.lightning_modules.apps import ecm_demo

    return ecm_demo


# method → loader of its demo module (imported only when that demo runs or the parser is built)
DEMOS: dict[str, Callable[[], ModuleType]] = {"ecm": _ecm}
HELP = {"ecm": "ECM on VAR on the shapes world: VQVAE → VAR → ECM adapters vs full fine-tune (CPU, ~10 min)"}


def parser(load: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The ``ctrlgen demo`` parser; the options of the demos in ``load`` (None: all) come from their modules."""
    p = argparse.ArgumentParser(prog="ctrlgen demo", description="end-to-end CPU demos of the implemented methods")
    sub = p.add_subparsers(dest="command", required=True)
    for name, loader in DEMOS.items():
        d = sub.add_parser(name, help=HELP.get(name), description=HELP.get(name))
        d.add_argument("--out", default=f"demo_runs/{name}", help="output directory (default %(default)s)")
        if load is None or name in load:
            loader().add_arguments(d)
    t = sub.add_parser("table", help="one table of the claims of demo directories; exit 1 if any is not met")
    t.add_argument("dirs", nargs="+", metavar="DIR")
    sub.add_parser("list", help="print the implemented methods")
    p.tool_parsers = sub.choices  # name → parser, for the usage lines
    return p


def usage_lines() -> list[str]:
    """One ``ctrlgen demo ...`` usage line per subcommand (for ``ctrlgen --help``; a demo's own options are listed
    by ``ctrlgen demo <method> --help``)."""
    lines = [" ".join(t.format_usage().split()).removeprefix("usage: ") for t in parser(()).tool_parsers.values()]
    return [f"{u} [options]" if u.split()[2] in DEMOS else u for u in lines]


def main(argv: list[str]) -> int:
    """Run ``ctrlgen demo ...``; returns the exit code."""
    p = parser(tuple(a for a in argv[:1] if a in DEMOS))  # only the demo that was named is imported
    args = p.parse_args(argv)
    if args.command == "list":
        print(" ".join(DEMOS))
        return 0
    if args.command == "table":
        return table_main(args.dirs)
    out = Path(args.out)
    (out / SUMMARY).unlink(missing_ok=True)  # a failed run must not leave the claims of an earlier one
    DEMOS[args.command]().run(args, p.tool_parsers[args.command])
    text, _ = claims_table([out])
    print(text)
    return 0
