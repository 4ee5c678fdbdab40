"""``CtrlgenCLI``: the LightningCLI every method trains, validates, tests and predicts with.

Subclass mode over ``BaseGenModule``/``BaseDataModule`` (full ``class_path`` in YAML), ``parser_mode="omegaconf"``,
injected optimizer/scheduler callables, ``configs/base.yaml`` applied first (trainer, logger, callbacks), the resolved
config saved overwrite-safe and sent to W&B, the SLURM launch guard run on the parsed trainer settings before any class
is built. W&B runs offline automatically when no API key is configured (:func:`configure_wandb_mode`).

The ``ctrlgen`` entry point (``ctrlgen.lightning_modules.cli``) dispatches ``fit|validate|test|predict`` here; demos
build their stages with this class directly.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from ctrlgen.callbacks.wandb_config import WandbSaveConfig
from ctrlgen.configs import BASE_CONFIG
from ctrlgen.datamodules.base import BaseDataModule
from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.slurm import guard_or_exit

SUBCOMMANDS = ("fit", "validate", "test", "predict")
_wandb_said = False


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
        parser_kwargs = {"parser_mode": "omegaconf"}
        if BASE_CONFIG.exists():
            parser_kwargs = {"parser_mode": "omegaconf", **{s: {"default_config_files": [str(BASE_CONFIG)]}
                                                             for s in SUBCOMMANDS}}
            if not run:  # run=False has no subcommand: the single parser takes the defaults directly
                parser_kwargs = {"parser_mode": "omegaconf", "default_config_files": [str(BASE_CONFIG)]}
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_callback", WandbSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        super().__init__(BaseGenModule, BaseDataModule, args=args, run=run, **kwargs)

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
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for lg in loggers:  # loggers without a save_dir write into the run dir
            init = getattr(lg, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, ".", ""):
                init.save_dir = root
        for cb in trainer.callbacks or []:  # checkpoints in <run dir>/checkpoints, so `--ckpt_path last` finds them
            is_ckpt = str(getattr(cb, "class_path", "")).endswith(("ModelCheckpoint", "RunCheckpoint"))
            if is_ckpt and cb.init_args.get("dirpath") is None:
                cb.init_args.dirpath = str(Path(root) / "checkpoints")
