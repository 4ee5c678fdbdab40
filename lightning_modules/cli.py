"""``ctrlgen``: the one entry point. One dispatch table (:data:`COMMANDS`) for every subcommand:

    ctrlgen fit|validate|test|predict -c configs/<method>/<recipe>.yaml [--trainer.max_steps=...]
    ctrlgen data synth|pack|inspect|refstats|tokenize ...
    ctrlgen demo <method>|table|list ...

``fit|validate|test|predict`` run :class:`~ctrlgen.lightning_modules.common.lightning_cli.CtrlgenCLI`; ``data`` and
``demo`` run the applications in ``ctrlgen.lightning_modules.apps``. The SLURM launch guard
(:mod:`ctrlgen.lightning_modules.common.slurm`) runs twice for the Lightning subcommands: before the config is parsed
(a multi-task job whose command was not started by ``srun`` is refused at once) and on the parsed trainer settings
(``CtrlgenCLI.before_instantiate_classes``: tasks per node vs ``trainer.devices``, nodes vs ``trainer.num_nodes``),
so ``ctrlgen`` / ``python -m ctrlgen.lightning_modules.cli`` is the guarded entry for job scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ctrlgen.configs import resolve_config
from ctrlgen.lightning_modules.common.lightning_cli import (  # noqa: F401 - re-exported for callers and tests
    SUBCOMMANDS,
    CtrlgenCLI,
    configure_wandb_mode,
    wandb_has_key,
)
from ctrlgen.lightning_modules.common.slurm import guard_or_exit


def resolve_config_args(argv: list[str]) -> list[str]:
    """``-c NAME`` / ``--config NAME`` / ``--config=NAME``: a name that is no file here is looked up in the packaged
    configs (``ctrlgen fit -c ecm/demo_var.yaml`` from any folder); anything else is passed on as given."""
    out, i = list(argv), 0
    while i < len(out):
        arg = out[i]
        if arg in ("-c", "--config") and i + 1 < len(out):
            found = resolve_config(out[i + 1])
            out[i + 1] = str(found) if found is not None else out[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            found = resolve_config(arg.split("=", 1)[1])
            out[i] = f"--config={found}" if found is not None else arg
        i += 1
    return out


def run_lightning(argv: list[str] | None) -> None:
    """``fit|validate|test|predict`` (and anything else LightningCLI parses): the launch guard before parsing, then
    the CLI (``argv`` None: it reads sys.argv itself)."""
    guard_or_exit(None)
    CtrlgenCLI(args=argv)


def run_data(argv: list[str]) -> None:
    from ctrlgen.lightning_modules.apps import data

    data.main(argv)


def run_demo(argv: list[str]) -> None:
    from ctrlgen.lightning_modules.apps import demo

    code = demo.main(argv)
    if code:
        raise SystemExit(code)


def tools_help() -> str:
    """The ``data``/``demo`` part of ``ctrlgen --help``: one usage line per tool, from their own parsers."""
    import textwrap

    from ctrlgen.lightning_modules.apps import data, demo

    lines = [textwrap.fill(u, 118, initial_indent="  ", subsequent_indent=" " * 6, break_on_hyphens=False)
             for u in [*data.usage_lines(), *demo.usage_lines()]]
    return "tool subcommands:\n" + "\n".join(lines)


# subcommand → (runner, one-line summary); the Lightning ones share one runner
COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    **{s: (run_lightning, f"LightningCLI {s}") for s in SUBCOMMANDS},
    "data": (run_data, "make, pack, inspect and tokenize WebDataset shards; reference statistics"),
    "demo": (run_demo, "end-to-end CPU demos of the implemented methods and the table of their claims"),
}


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = resolve_config_args(raw)
    cmd = args[0] if args else None
    if cmd in COMMANDS and cmd not in SUBCOMMANDS:
        COMMANDS[cmd][0](args[1:])
        return None
    own = argv is None and args == raw  # LightningCLI reads sys.argv itself (no warning) when it was not rewritten
    if cmd is None or cmd in ("-h", "--help"):
        print(tools_help(), file=sys.stderr)
        CtrlgenCLI(args=None if own and args else (args or ["--help"]))  # Lightning's help of its subcommands (exits)
        return None
    run_lightning(None if own else args)
    return None


if __name__ == "__main__":
    main()
