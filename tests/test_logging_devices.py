"""Every value a module or callback logs is a number or a tensor on the module's device.

Under NCCL, Lightning all-reduces a tensor logged with ``sync_dist=True`` as it is, and a CPU tensor fails ("No backend
type associated with device type cpu"). On a CPU-only machine every tensor is on the module's device, so the test
tracks where tensors come from instead: a ``TorchFunctionMode`` marks each tensor a factory (``torch.tensor``,
``torch.zeros``, ...) creates without an explicit device (it would sit on the default device, the CPU, while the module
runs on a GPU), and everything computed from marked tensors alone; an explicit ``.to(device)`` clears the mark (as
Lightning's batch transfer does). A logged marked tensor fails the test.
"""

from __future__ import annotations

import inspect
import numbers
import weakref
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ctrlgen.lightning_modules.cli import CtrlgenCLI

_FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.full, torch.empty,
              torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


class DefaultDeviceTaint(TorchFunctionMode):
    """Marks tensors that would sit on the default (CPU) device whatever device the module runs on."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}

    def marked(self, t: Any) -> bool:
        ref = self._marked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _mark(self, out: Any, on: bool) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if on:
                self._marked[id(t)] = weakref.ref(t)
            else:
                self._marked.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            on = self.marked(src) if src is not None else kwargs.get("device") is None
        elif func in _MOVES:
            explicit = kwargs.get("device") is not None or any(
                isinstance(a, (torch.device, str, int, torch.Tensor)) for a in args[1:])
            on = self.marked(args[0]) and not explicit
        elif func is torch.Tensor.cpu:
            on = True
        else:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            on = bool(inputs) and all(self.marked(t) for t in inputs)
        self._mark(out, on)
        return out


@pytest.fixture
def logged(monkeypatch):
    """(name, value, sync_dist, marked) of every ``LightningModule.log`` call while the mode tracks tensors."""
    records: list[tuple[str, Any, bool, bool]] = []
    mode = DefaultDeviceTaint()
    original = LightningModule.log
    sig = inspect.signature(original)

    def log(self, name, value, *args, **kwargs):
        bound = sig.bind(self, name, value, *args, **kwargs)
        bound.apply_defaults()
        records.append((name, value, bool(bound.arguments["sync_dist"]), mode.marked(value)))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LightningModule, "log", log)
    with mode:
        yield records


def _bad(records: list[tuple[str, Any, bool, bool]]) -> list[str]:
    """Logged values that are neither numbers, metrics nor unmarked tensors."""
    from torchmetrics import Metric

    out = []
    for name, value, _, marked in records:
        ok = isinstance(value, (numbers.Number, Metric)) or (isinstance(value, torch.Tensor) and not marked)
        if not ok:
            out.append(f"{name} ({type(value).__name__}{', default device' if marked else ''})")
    return out


TINY_VAR = ["--model.init_args.var_preset=tiny",
            "--model.init_args.var_overrides={embed_dim: 32, num_heads: 2, depth: 2}"]


def _args(shards, root, config, extra=()):
    return ["-c", config, f"--data.init_args.train_shards={shards['train']}",
            f"--data.init_args.val_shards={shards['val']}", f"--data.init_args.test_shards={shards['test']}",
            "--data.init_args.resolution=32", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
            "--data.init_args.num_workers=0", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--data.init_args.train_batches_per_epoch=2", "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}",
            "-c", "configs/logger/csv.yaml", *extra]


RANDOM_BASES = ["--model.init_args.vqvae_weights=null"]
CASES = {
    "vqvae": ("configs/ecm/demo_vqvae.yaml", [], ["val/codebook_usage_mean", "test/codebook_usage_mean"]),
    "var": ("configs/ecm/demo_var.yaml", [*TINY_VAR, *RANDOM_BASES], ["val/loss", "test/acc"]),
    "ecm": ("configs/ecm/demo_ecm.yaml", [*TINY_VAR, *RANDOM_BASES, "--model.init_args.var_weights=null"],
            ["val/tokens", "test/tokens", "train/trunc_frac_s2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_and_test_log_numbers_or_tensors_on_the_module_device(case, shapes_shards, tmp_path, logged):
    config, extra, must = CASES[case]
    cli = CtrlgenCLI(args=["fit", *_args(shapes_shards, tmp_path, config, extra)])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    names = {name for name, *_ in logged}
    assert set(must) <= names, sorted(set(must) - names)
    assert any(sync for _, _, sync, _ in logged)  # validation/test values are synced over ranks
    assert not _bad(logged), f"logged from the default device, not the module's (crashes an NCCL all-reduce with " \
                             f"sync_dist=True): {_bad(logged)}"


def test_the_tracker_marks_default_device_tensors_only(logged):
    """The check can fail: a tensor made without a device is marked, also after detach/float; one moved to a device
    or computed with an unmarked tensor is not."""
    module = torch.nn.Linear(2, 1).to("cpu")  # placed, as the trainer places the LightningModule
    bare = torch.tensor(3.0).detach().float()
    placed = torch.tensor(3.0, device="cpu")
    computed = module(torch.ones(1, 2).to("cpu")).sum() * torch.tensor(2.0)
    for name, value in (("bare", bare), ("placed", placed), ("computed", computed), ("number", 1.5),
                        ("moved_back", computed.detach().cpu())):
        LightningModule.log(LightningModule(), name, value)  # recorded (Lightning then skips a trainer-less log)
    assert _bad(logged) == ["bare (Tensor, default device)", "moved_back (Tensor, default device)"]
