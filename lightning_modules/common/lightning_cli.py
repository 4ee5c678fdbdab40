"""``CtrlgenCLI``: the LightningCLI every method trains, validates, tests and predicts with.

Subclass mode over ``BaseGenModule``/``BaseDataModule`` (full ``class_path`` in YAML), ``parser_mode="omegaconf"``,
injected optimizer/scheduler callables, ``configs/base.yaml`` applied first (trainer, logger, callbacks), the resolved
config saved overwrite-safe and sent to W&B, the SLURM launch guard run on the parsed trainer settings before any class
is built. W&B runs offline automatically when no API key is configured (:func:`configure_wandb_mode`) and writes
inside the run folder, or fails naming it.

Runs and checkpoints: ``--ckpt_path last`` resumes the newest intact checkpoint of the run's checkpoint folder
(:func:`~ctrlgen.callbacks.checkpoint.newest_intact_checkpoint`: a truncated or stale ``last.ckpt`` is passed over
with a warning naming both); none found warns loudly and starts from scratch, or fails with ``--require_ckpt``. A
``fit`` into a run folder that already holds a run (``config.yaml``, checkpoints) is refused unless it resumes
(``--ckpt_path``), SLURM requeues it (``hpc_ckpt_N.ckpt`` or ``SLURM_RESTART_COUNT``), or ``--overwrite`` is given
(the old checkpoints are then removed, so ``last.ckpt`` is this run's). Parse errors print one message naming the
key, the class that was given and the nearest valid option (:class:`CtrlgenArgumentParser`).

The ``ctrlgen`` entry point (``ctrlgen.lightning_modules.cli``) dispatches ``fit|validate|test|predict`` here; demos
build their stages with this class directly.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import ctrlgen.lightning_modules
from ctrlgen.callbacks.checkpoint import newest_intact_checkpoint
from ctrlgen.callbacks.wandb_config import WandbSaveConfig
from ctrlgen.configs import BASE_CONFIG
from ctrlgen.datamodules.base import BaseDataModule
from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.slurm import guard_or_exit

SUBCOMMANDS = ("fit", "validate", "test", "predict")
_wandb_said = False
ctrlgen.lightning_modules.import_methods()  # checkpoints name their class: every method must be importable by name


class UsageError(ValueError):
    """A command line that cannot run as given (run folder in use, ``--require_ckpt`` without a checkpoint): the
    entry point prints it as one line and exits 2."""


def debug_mode() -> bool:
    """``CTRLGEN_DEBUG=1``: errors keep their traceback."""
    return os.environ.get("CTRLGEN_DEBUG", "") not in ("", "0")


def init_parameters(cls: type) -> list[str]:
    """Named ``__init__`` parameters of ``cls`` and of the bases it forwards ``**kwargs`` to."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def suggest(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest of ``choices`` (difflib), else ``""``."""
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def explain_parse_error(message: str, parser: Any) -> str:
    """jsonargparse's error ``message`` as one message at the user's level: an unknown option with the nearest option
    of ``parser``; an unknown ``init_args`` key with the class that was given (not the base class of the Union) and
    the nearest of its arguments; anything else as jsonargparse says it, without the Union dump."""
    options = sorted({o for a in getattr(parser, "_actions", []) for o in a.option_strings if o.startswith("--")})
    m = re.search(r"unrecognized arguments: (\S+)", message)
    if m:
        opt = m.group(1).split("=", 1)[0]
        return f"unknown option {opt}{suggest(opt, options)}"
    m = re.search(r"does not accept option '([\w.]+)'", message)
    if m:
        key = m.group(1)
        return f"unknown config key {key!r}{suggest(key, [o[2:] for o in options])}"
    m = re.search(r"Parser key \"([\w.]+)\".*?Problem with given class_path '([\w.]+)':\s*\n\s*(.+?)\n", message,
                  re.DOTALL)
    if m:
        key, class_path, inner = m.groups()
        bad = re.search(r"Option '([\w.]+)' is not accepted", inner)
        if bad:
            arg = bad.group(1)
            first, _, rest = arg.partition(".")
            if rest and first not in ("init_args", "dict_kwargs"):  # `init_arg:` typo in YAML
                near = suggest(first, ["init_args", "class_path", "dict_kwargs"])
                return f"{key}: {first!r} is no key of a class entry (class_path {class_path}){near}"
            try:
                mod, _, name = class_path.rpartition(".")
                params = init_parameters(getattr(importlib.import_module(mod), name))
            except Exception:  # noqa: BLE001 - the names are only a hint
                params = []
            names = f" (it takes: {', '.join(params)})" if params else ""
            return f"{key}: {class_path} has no argument {arg!r}{suggest(arg, params)}{names}"
        return f"{key} ({class_path}): {inner.strip()}"
    return re.sub(r"\n\s*Given value type:.*", "", message, flags=re.DOTALL).strip()


class CtrlgenArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one message (:func:`explain_parse_error`) and exit 2, without
    the usage dump; ``CTRLGEN_DEBUG=1`` raises jsonargparse's error instead (traceback)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode():
            if debug_mode() and self.exit_on_error:
                from jsonargparse import ArgumentError

                raise ArgumentError(None, message) from ex
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {explain_parse_error(message, parser)}\n"
                         f"  (`{prog} --help` lists every option; CTRLGEN_DEBUG=1 shows the traceback)\n")
        raise SystemExit(2)


def checkpoint_dir(trainer: Any) -> Path:
    """Where the run's checkpoints go: the first ``ModelCheckpoint``'s ``dirpath``, else
    ``<default_root_dir>/checkpoints``."""
    root = trainer.default_root_dir or "runs/default"
    for cb in trainer.callbacks or []:
        is_ckpt = str(getattr(cb, "class_path", "")).endswith(("ModelCheckpoint", "RunCheckpoint"))
        if is_ckpt and cb.init_args.get("dirpath") is not None:
            return Path(cb.init_args.dirpath)
    return Path(root) / "checkpoints"


def _local_rank_zero() -> bool:
    """This process is the one started by the user (not a rank that Lightning or srun started beside it)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def slurm_resumes(root: Path) -> bool:
    """Lightning's SLURM resume applies: under SLURM with an ``hpc_ckpt_N.ckpt`` in the run folder, or a requeued
    attempt (``SLURM_RESTART_COUNT`` > 0)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return False
    return any(root.glob("hpc_ckpt_*.ckpt")) or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def check_run_folder(root: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """A ``fit`` into ``root`` that already holds a run (``config.yaml``, checkpoints) needs ``resume`` or
    ``overwrite`` (or a SLURM requeue); with ``overwrite`` the old ``*.ckpt`` files are removed (returned)."""
    if "://" in str(root):
        return []
    ckpts = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    used = ([root / "config.yaml"] if (root / "config.yaml").exists() else []) + ckpts
    if not used or resume or slurm_resumes(root):
        return []
    if not overwrite:
        shown = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in used[:4])
        raise UsageError(f"run folder {root} already holds a run ({shown}{', ...' if len(used) > 4 else ''}): a second "
                         f"fit would overwrite its config.yaml and sample grids and write last-v1.ckpt beside its "
                         f"checkpoints. Resume it with --ckpt_path last, reuse the folder with --overwrite (removes "
                         f"its checkpoints), or choose another --trainer.default_root_dir")
    for p in ckpts:
        p.unlink()
    if ckpts:
        print(f"ctrlgen: --overwrite: removed {len(ckpts)} checkpoint(s) of the earlier run in {ckpt_dir}",
              file=sys.stderr)
    return ckpts


def check_writable(folder: Path, what: str) -> None:
    """``folder`` exists (created if needed) and accepts a file, else an OSError naming it (W&B would otherwise
    write into a system temp folder without a word)."""
    probe = folder / f".ctrlgen-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"{what}: folder {folder} is not writable ({e.strerror or e}); fix its permissions or "
                               f"pass --trainer.default_root_dir=<a writable folder>") from e


def resolve_last(sub: str, ckpt_dir: Path, require: bool) -> str | None:
    """``--ckpt_path last``: the newest intact checkpoint in ``ckpt_dir``; none: a loud warning and None (start from
    scratch), or a FileNotFoundError with ``require``."""
    found = newest_intact_checkpoint(ckpt_dir)
    if found is not None:
        return str(found)
    what = "training starts from scratch" if sub == "fit" else f"{sub} runs the model as configured, untrained"
    if require:
        raise FileNotFoundError(f"--ckpt_path last --require_ckpt: no intact checkpoint (*.ckpt) in {ckpt_dir}; "
                                f"check --trainer.default_root_dir, or pass --ckpt_path <file>")
    print(f"ctrlgen: WARNING: --ckpt_path last: no intact checkpoint in {ckpt_dir}; {what}. "
          f"Pass --require_ckpt to fail instead", file=sys.stderr, flush=True)
    return None


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def configure_wandb_mode() -> str:
    """Offline when no API key is configured (said once); an explicit ``WANDB_MODE`` always wins."""
    global _wandb_said
    if "WANDB_MODE" not in os.environ and not wandb_has_key():
        os.environ["WANDB_MODE"] = "offline"
        if not _wandb_said:
            print("ctrlgen: no W&B API key configured -> W&B runs offline; upload later with "
                  "`wandb sync <save_dir>/wandb/offline-run-*`", file=sys.stderr)
            _wandb_said = True
    return os.environ.get("WANDB_MODE", "online")


class CtrlgenCLI(LightningCLI):
    """LightningCLI with ctrlgen's defaults (see module docstring). Importing this module imports the package
    ``ctrlgen.lightning_modules``, which imports every method, so checkpoints can rebuild their subclass."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs: dict[str, Any] = {"parser_mode": "omegaconf", "prog": "ctrlgen"}
        if BASE_CONFIG.exists():
            parser_kwargs = {**parser_kwargs, **{s: {"default_config_files": [str(BASE_CONFIG)]} for s in SUBCOMMANDS}}
            if not run:  # run=False has no subcommand: the single parser takes the defaults directly
                parser_kwargs = {"parser_mode": "omegaconf", "prog": "ctrlgen",
                                 "default_config_files": [str(BASE_CONFIG)]}
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_callback", WandbSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        kwargs.setdefault("parser_class", CtrlgenArgumentParser)
        super().__init__(BaseGenModule, BaseDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from jsonargparse import ActionYesNo

        parser.add_argument("--require_ckpt", action=ActionYesNo, default=False,
                            help="fail when --ckpt_path last finds no intact checkpoint (default: warn, start fresh)")
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="fit: reuse a run folder that already holds a run (removes its checkpoints)")

    def _parse_ckpt_path(self) -> None:
        """Lightning re-applies a checkpoint's saved hyper-parameters over the config (architecture wins). Arguments a
        module lists in ``runtime_args`` (weights paths, sampling and evaluation knobs) are left to the config/CLI."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        import torch

        class_path = str(self.config[sub].model.class_path)
        mod, _, name = class_path.rpartition(".")
        runtime = set(getattr(getattr(importlib.import_module(mod), name, None), "runtime_args", ()))
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k not in runtime}
        hparams.pop("_instantiator", None)
        if not hparams:
            return None
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        return None

    def before_instantiate_classes(self) -> None:
        configure_wandb_mode()
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = cfg.trainer
        guard_or_exit(trainer)  # SLURM: no srun in a multi-task job / tasks != devices / nodes != num_nodes -> exit 2
        root = trainer.default_root_dir or "runs/default"
        if self.subcommand:
            self._check_run_and_checkpoint(cfg, Path(root), checkpoint_dir(trainer))
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for lg in loggers:  # loggers without a save_dir write into the run dir
            init = getattr(lg, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, ".", ""):
                init.save_dir = root
            is_wandb = str(getattr(lg, "class_path", "")).endswith("WandbLogger") and init is not None
            if is_wandb and os.environ.get("WANDB_MODE") != "disabled":
                check_writable(Path(init.get("dir") or init.get("save_dir") or root), "W&B")
        for cb in trainer.callbacks or []:  # checkpoints in <run dir>/checkpoints, so `--ckpt_path last` finds them
            is_ckpt = str(getattr(cb, "class_path", "")).endswith(("ModelCheckpoint", "RunCheckpoint"))
            if is_ckpt and cb.init_args.get("dirpath") is None:
                cb.init_args.dirpath = str(Path(root) / "checkpoints")

    def _check_run_and_checkpoint(self, cfg: Any, root: Path, ckpt_dir: Path) -> None:
        """``--ckpt_path`` (``last`` resolved, a missing file named), ``--require_ckpt``, and the run folder of a
        ``fit`` (:func:`check_run_folder`); run by the process the user started, once."""
        ckpt = cfg.get("ckpt_path")
        require = bool(cfg.get("require_ckpt"))
        if require and ckpt is None:
            raise UsageError("--require_ckpt needs --ckpt_path (a checkpoint file, or last)")
        if ckpt == "last":
            cfg.ckpt_path = resolve_last(self.subcommand, ckpt_dir, require)
        elif ckpt and ckpt not in ("best", "hpc", "registry") and "://" not in str(ckpt) and not Path(ckpt).exists():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no such file; `--ckpt_path last` takes the newest intact "
                                    f"checkpoint of {ckpt_dir}")
        if self.subcommand == "fit" and _local_rank_zero():
            check_run_folder(root, ckpt_dir, resume=ckpt is not None, overwrite=bool(cfg.get("overwrite")))
