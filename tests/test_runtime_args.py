"""Class contracts of every project module.

``runtime_args`` (init arguments ``test``/``predict --ckpt_path`` take from the config, not the checkpoint) name only
init parameters of the module or of a base it forwards ``**kwargs`` to: a stale name would silently stop protecting
the argument it once meant (the checkpoint's saved value would win again). The step hooks take the arguments of
``BaseGenModule``'s (``dataloader_idx`` for several eval/predict loaders)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from lightning.pytorch import LightningModule

import ctrlgen.lightning_modules
from ctrlgen.lightning_modules.common.base import BaseGenModule


def _project_modules() -> list[type]:
    """Every ``BaseGenModule`` subclass defined in ``ctrlgen`` or in the test helpers."""
    import tests.helpers

    for pkg in (ctrlgen.lightning_modules, tests.helpers):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
    found, todo = set(), [BaseGenModule]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted((c for c in found if c.__module__.startswith(("ctrlgen.", "tests.helpers."))),
                  key=lambda c: f"{c.__module__}.{c.__qualname__}")


def init_parameters(cls: type) -> set[str]:
    """Named parameters of ``__init__`` along the MRO down to ``BaseGenModule`` (each forwards ``**kwargs`` up)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if not (isinstance(base, type) and issubclass(base, BaseGenModule)) or "__init__" not in vars(base):
            continue
        params = inspect.signature(vars(base)["__init__"]).parameters.values()
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self")
    return names


def stale_runtime_args(cls: type) -> list[str]:
    return [name for name in cls.runtime_args if name not in init_parameters(cls)]


MODULES = _project_modules()


def test_the_walk_finds_every_method_module():
    names = {c.__name__ for c in MODULES}
    assert {"ECMModule", "VARModule", "VQVAEModule", "ManualOptimModule"} <= names, sorted(names)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_runtime_args_are_init_parameters(cls):
    assert len(set(cls.runtime_args)) == len(cls.runtime_args), f"{cls.__name__}.runtime_args repeats a name"
    assert not stale_runtime_args(cls), (
        f"{cls.__module__}.{cls.__name__}.runtime_args names {stale_runtime_args(cls)}, which are not init "
        f"parameters of it or its bases ({sorted(init_parameters(cls))}): rename or remove them")


STEP_HOOKS = {"training_step": ["batch", "batch_idx"], "validation_step": ["batch", "batch_idx", "dataloader_idx"],
              "test_step": ["batch", "batch_idx", "dataloader_idx"],
              "predict_step": ["batch", "batch_idx", "dataloader_idx"]}


def hook_mismatches(cls: type) -> list[str]:
    """Step hooks a project class defines whose parameters differ from ``STEP_HOOKS`` (``dataloader_idx`` needs the
    default 0: Lightning passes it only with several loaders)."""
    out = []
    for base in cls.__mro__:
        if base is LightningModule or not issubclass(base, LightningModule):
            continue
        for hook, want in STEP_HOOKS.items():
            if hook not in vars(base):
                continue
            params = list(inspect.signature(vars(base)[hook]).parameters.values())[1:]
            ok = [p.name for p in params] == want and all(
                p.default == 0 for p in params if p.name == "dataloader_idx")
            if not ok:
                out.append(f"{base.__name__}.{hook}({', '.join(map(str, params))})")
    return out


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_step_hooks_match_the_base_signature(cls):
    assert not hook_mismatches(cls), f"expected {STEP_HOOKS}, found {hook_mismatches(cls)}"


def test_a_stale_name_and_a_narrow_hook_are_found():
    class Renamed(BaseGenModule):
        runtime_args = ("weights_path", "cfg")

        def __init__(self, weights: str | None = None, cfg: float = 1.0, **kwargs):
            super().__init__(**kwargs)

        def test_step(self, batch, batch_idx):
            return super().test_step(batch, batch_idx)

    assert stale_runtime_args(Renamed) == ["weights_path"]
    assert {"weights", "cfg", "optimizer", "lr_reference_batch"} <= init_parameters(Renamed)
    assert hook_mismatches(Renamed) == ["Renamed.test_step(batch, batch_idx)"]
