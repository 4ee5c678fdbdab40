"""``ctrlgen``: the one entry point. One dispatch table (:data:`COMMANDS`) for every subcommand:

    ctrlgen fit|validate|test|predict -c configs/<method>/<recipe>.yaml [--trainer.max_steps=...]
    ctrlgen data synth|pack|inspect|refstats|tokenize ...
    ctrlgen demo <method>|table|list ...

``fit|validate|test|predict`` run :class:`~ctrlgen.lightning_modules.common.lightning_cli.CtrlgenCLI`; ``data`` and
``demo`` run the applications in ``ctrlgen.lightning_modules.apps``. ``ctrlgen --help``, an unknown subcommand and the
help of ``data``/``demo`` import neither Lightning nor torch (the Lightning subcommands' own ``--help`` does).

Errors at the user's level: a configuration, data or weights error raised by ctrlgen's own code (``ValueError``,
``KeyError``, ``OSError`` and their subclasses) prints one line ``ctrlgen: error: ...`` and exits 2 for a usage or
configuration error (parse errors, :class:`~ctrlgen.lightning_modules.common.lightning_cli.UsageError`) or 1 for a
data or weights error, without a traceback; ``CTRLGEN_DEBUG=1`` keeps the traceback. Errors raised inside third-party
code keep their traceback (they are bugs to report, not input to fix).

The SLURM launch guard (:mod:`ctrlgen.lightning_modules.common.slurm`) runs twice for the Lightning subcommands: before
the config is parsed (a multi-task job whose command was not started by ``srun`` is refused at once) and on the parsed
trainer settings (``CtrlgenCLI.before_instantiate_classes``: tasks per node vs ``trainer.devices``, nodes vs
``trainer.num_nodes``), so ``ctrlgen`` / ``python -m ctrlgen.lightning_modules.cli`` is the guarded entry for job
scripts.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ctrlgen.configs import resolve_config

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")  # == CtrlgenCLI.subcommands() (tests/test_cli.py)
_REEXPORTED = ("SUBCOMMANDS", "CtrlgenCLI", "configure_wandb_mode", "wandb_has_key")


def __getattr__(name: str) -> Any:
    """``CtrlgenCLI`` and friends, re-exported for callers and tests, imported (with Lightning) on first use."""
    if name in _REEXPORTED:
        from ctrlgen.lightning_modules.common import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from ctrlgen.lightning_modules.common.lightning_cli import CtrlgenCLI
    from ctrlgen.lightning_modules.common.slurm import guard_or_exit

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
    "fit": (run_lightning, "train a model (LightningCLI fit; --ckpt_path last resumes)"),
    "validate": (run_lightning, "run the validation loop on a checkpoint"),
    "test": (run_lightning, "score a checkpoint on the test split (results.md/.csv in the run folder)"),
    "predict": (run_lightning, "generate with a checkpoint (<run dir>/predictions/<key>.png)"),
    "data": (run_data, "make, pack, inspect and tokenize WebDataset shards; reference statistics"),
    "demo": (run_demo, "end-to-end CPU demos of the implemented methods and the table of their claims"),
}


def main_help() -> str:
    """``ctrlgen --help``: every subcommand with its summary (built without Lightning)."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: ctrlgen {{{','.join(COMMANDS)}}} ...\n\nsubcommands:\n{rows}\n\n"
            f"`ctrlgen <subcommand> --help` shows its options (fit|validate|test|predict: every config key).")


def unknown_subcommand(cmd: str) -> str:
    near = difflib.get_close_matches(cmd, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"ctrlgen: error: unknown subcommand {cmd!r}{hint}\n\n{main_help()}\n\n{tools_help()}"


def _raised_in_ctrlgen(tb: TracebackType | None) -> bool:
    """The innermost frame of ``tb`` is ctrlgen's code (or a test helper's), not a third-party library's."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    name = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return name.startswith(("ctrlgen.", "tests."))


def user_error_code(exc: BaseException) -> int | None:
    """Exit status for an error the user can fix from its message (module docstring), or None (keep the traceback)."""
    from_parse = type(exc).__name__ == "ArgumentError" and type(exc).__module__.startswith("jsonargparse")
    if from_parse:
        return 2
    if isinstance(exc, OSError) and exc.filename is not None:  # a file system error names its file
        return 1
    if not isinstance(exc, (ValueError, KeyError, OSError)) or not _raised_in_ctrlgen(exc.__traceback__):
        return None
    return 2 if type(exc).__name__ == "UsageError" else 1


def error_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # without the "[Errno N]" prefix
        text = exc.strerror + (f": {exc.filename}" if exc.filename is not None else "")
    return f"ctrlgen: error: {text}"


def dispatch(raw: list[str], own_argv: bool) -> None:
    """Run the subcommand of ``raw`` (``own_argv``: ``raw`` is ``sys.argv[1:]``, LightningCLI may read it itself)."""
    args = resolve_config_args(raw)
    cmd = args[0] if args else None
    if cmd is None or cmd in ("-h", "--help"):
        print(main_help())
        print(tools_help(), file=sys.stderr)
        return
    if not cmd.startswith("-") and cmd not in COMMANDS:
        print(unknown_subcommand(cmd), file=sys.stderr)
        raise SystemExit(2)
    if cmd in COMMANDS and cmd not in LIGHTNING_SUBCOMMANDS:
        COMMANDS[cmd][0](args[1:])
        return
    own = own_argv and args == raw  # LightningCLI reads sys.argv itself (no warning) when it was not rewritten
    run_lightning(None if own else args)


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        dispatch(raw, argv is None)
    except Exception as exc:  # user-level errors become one line; the rest is re-raised
        code = user_error_code(exc)
        if code is None or os.environ.get("CTRLGEN_DEBUG", "") not in ("", "0"):
            raise
        print(error_line(exc), file=sys.stderr)
        print("  (CTRLGEN_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
