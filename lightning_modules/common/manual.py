"""``ManualOptimModule``: the shared base for modules that step several optimizers by hand (DMD2/Defocus, GANs).

YAML, through ``CtrlgenCLI`` (one entry per optimizer name the subclass declares in ``optimizer_params()``)::

    model:
      init_args:
        optimizers:                       # dict[str, OptimizerCallable]
          generator: {class_path: torch.optim.AdamW, init_args: {lr: 5.0e-7, weight_decay: 0.01}}
          critic: {class_path: torch.optim.AdamW, init_args: {lr: 5.0e-7, weight_decay: 0.01}}
        schedulers:                       # dict[str, LRSchedulerCallable] | None; names without one keep their lr
          generator: {class_path: torch.optim.lr_scheduler.LinearLR, init_args: {start_factor: 0.01, total_iters: 500}}
        update_every: {generator: 5}      # TTUR: generator on iterations 0, 5, 10, ...; unnamed optimizers every iteration
        clip_norm: 10.0                   # one value for all, or per optimizer {generator: 10.0, critic: 1.0}
        max_iterations: 19000             # with trainer.max_steps: -1 (see "global_step" below)
        lr_reference_batch: null          # 256: every lr is per 256 samples, x global batch / 256 (common/recipe.py)

``dict[str, OptimizerCallable]`` is taken as is by jsonargparse 4.53 from ``class_path/init_args`` entries (each value
becomes a partial of the class; pinned by tests/common/test_manual.py with a real ``CtrlgenCLI`` parse).

Subclasses implement ``optimizer_params()`` (``{name: module | params | param groups}``, in a fixed order: the order of
the optimizer and scheduler states in checkpoints), ``train_iteration(batch, batch_idx)`` (one iteration: for each
``name`` with ``self.is_turn(name)``, ``self.update(name, lambda: loss)``) and ``model_step`` for validation/test.
Subclasses call ``save_hyperparameters(ignore=["optimizers", "schedulers"])`` (the config is the record of those,
platform.md §1). A subclass that lists its own ``runtime_args`` extends ``ManualOptimModule.runtime_args`` (keeps ``max_iterations``
settable from the CLI when resuming from a checkpoint file).

``update(name, loss_fn)`` toggles the optimizer (every other optimizer's parameters ``requires_grad=False``) *while the
loss is computed*, so pass a closure: a loss tensor built before the call already recorded the other nets in its graph.
Then ``manual_backward``, ``clip_gradients(opt, clip, "norm")``, ``step``, ``zero_grad`` on **all** optimizers, this
optimizer's scheduler ``step`` (schedulers count this optimizer's steps; DMD2 steps both every iteration, so its
generator warm-up in iterations is ``total_iters × update_every``), untoggle; logs loss, lr and pre-clip grad norm.

global_step (pinned for lightning 2.6.6 by a test): under manual optimisation ``trainer.global_step`` counts
``optimizer.step()`` calls over all optimizers, not iterations: two optimizers stepped each iteration advance it by 2,
``update_every: {generator: 5}`` by 1.2 on average. So ``trainer.max_steps``, ``ModelCheckpoint(every_n_train_steps)``
and the ``step{step}`` checkpoint names count optimizer steps, while ``val_check_interval``, ``log_every_n_steps`` and
the logger's x-axis count batches (= iterations). This module keeps its own ``iteration`` (saved in checkpoints as
``ctrlgen_iteration``) for TTUR and stops on ``max_iterations`` via ``trainer.should_stop``.

Not supported under manual optimisation (Lightning refuses both at fit start): ``trainer.accumulate_grad_batches > 1``
and ``trainer.gradient_clip_val`` (use ``clip_norm``). DDP needs ``find_unused_parameters: true`` (checked in
``setup``). ``16-mixed`` (GradScaler) would clip and log scaled gradients: use ``bf16-mixed`` (DMD2 diverges in fp16
anyway). Random choices that must agree across ranks (DMD2's backward-simulation depth) come from
``iteration_generator()``; per-rank noise from ``ensure_generator()``. The logged grad norm is computed on plain
tensors (not yet checked with FSDP2/DTensor gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ctrlgen.datamodules.seeding import derive_seed
from ctrlgen.lightning_modules.common.base import BaseGenModule, global_seed
from ctrlgen.lightning_modules.common.recipe import planned_iterations


class ManualOptimModule(BaseGenModule):
    """Several named optimizers, stepped by hand in ``train_iteration`` through ``update`` (see module docstring)."""

    runtime_args = BaseGenModule.runtime_args + ("max_iterations",)

    def __init__(self, optimizers: dict[str, OptimizerCallable] | None = None,
                 schedulers: dict[str, LRSchedulerCallable] | None = None, update_every: dict[str, int] | None = None,
                 clip_norm: float | dict[str, float] | None = None, max_iterations: int | None = None,
                 lr_reference_batch: int | None = None):
        super().__init__(lr_reference_batch=lr_reference_batch)
        self.automatic_optimization = False
        self.optimizer_factory = None  # the single-optimizer injection of BaseGenModule is not used here
        self.optimizer_factories = dict(optimizers or {})
        self.scheduler_factories = dict(schedulers or {})
        self.update_every = dict(update_every or {})
        bad = {k: v for k, v in self.update_every.items() if int(v) < 1}
        if bad:
            raise ValueError(f"{type(self).__name__}: update_every must be >= 1, got {bad}")
        self.clip_norm = clip_norm
        self.max_iterations = max_iterations
        self.iteration = 0  # completed training iterations (batches); saved in checkpoints
        self._opt_names: list[str] = []
        self._sched_names: list[str] = []

    # ---------------------------------------------------------------------------------------------------- subclass API
    def optimizer_params(self) -> dict[str, Any]:
        """``{optimizer name: nn.Module | iterable of parameters | list of param-group dicts}``."""
        raise NotImplementedError(f"{type(self).__name__} must implement optimizer_params()")

    def train_iteration(self, batch: Any, batch_idx: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement train_iteration(batch, batch_idx)")

    # ---------------------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        cls, declared = type(self).__name__, self.optimizer_params()
        names = list(declared)
        for what, keys in (("optimizers", self.optimizer_factories), ("schedulers", self.scheduler_factories),
                           ("update_every", self.update_every),
                           ("clip_norm", self.clip_norm if isinstance(self.clip_norm, dict) else {})):
            unknown = sorted(set(keys) - set(names))
            if unknown:
                raise ValueError(f"{cls}: {what} names {unknown} are not optimizers of this module; optimizer_params() "
                                 f"declares {names}")
        missing = sorted(set(names) - set(self.optimizer_factories))
        if self.optimizer_factories and missing:
            raise ValueError(f"{cls}: no entry in `optimizers` for {missing} (optimizer_params() declares {names})")

        groups = {name: _trainable_groups(spec) for name, spec in declared.items()}
        owners: dict[int, list[str]] = {}
        for name, gs in groups.items():
            if not any(g["params"] for g in gs):
                raise ValueError(f"{cls}: optimizer {name!r} gets no trainable (requires_grad) parameters")
            for g in gs:
                for p in g["params"]:
                    owners.setdefault(id(p), []).append(name)
        named = list(self.named_parameters())
        twice = [f"{n} -> {owners[id(p)]}" for n, p in named if len(owners.get(id(p), ())) > 1]
        if twice:
            raise ValueError(f"{cls}: parameters claimed more than once by optimizers: {_short(twice)}")
        orphans = [n for n, p in named if p.requires_grad and id(p) not in owners]
        if orphans:
            raise ValueError(f"{cls}: trainable parameters in no optimizer (optimizers {names}): {_short(orphans)}; "
                             "freeze them (requires_grad_(False)) or add them to optimizer_params()")

        opts, scheds = [], []
        for name in names:
            opt = self.optimizer_factories.get(name, torch.optim.AdamW)(groups[name])
            self.scale_to_global_batch(opt, name)
            opts.append(opt)
            if name in self.scheduler_factories:
                sched = self.make_scheduler(opt, self.scheduler_factories[name],
                                            lambda n=name: self.planned_updates(n), name)
                scheds.append({"scheduler": sched, "interval": "step", "name": f"lr-{name}"})
        self._opt_names = names
        self._sched_names = [n for n in names if n in self.scheduler_factories]
        return (opts, scheds) if scheds else opts

    def planned_updates(self, name: str) -> int:
        """Steps optimizer ``name`` will make in this run: ⌈iterations / update_every⌉, iterations bounded by
        ``max_iterations`` or ``max_epochs`` (``trainer.max_steps`` counts all optimizers' steps, so it is not used)."""
        its = planned_iterations(self.trainer, -1 if self.max_iterations is None else self.max_iterations,
                                 accumulate=False)
        return math.ceil(its / int(self.update_every.get(name, 1)))

    def _check_name(self, name: str) -> None:
        if self._opt_names and name not in self._opt_names:
            raise KeyError(f"{type(self).__name__}: no optimizer {name!r}; optimizers are {self._opt_names}")

    def optimizer(self, name: str) -> Any:
        """The (Lightning-wrapped) optimizer called ``name``."""
        self._check_name(name)
        opts = self.optimizers()
        return (opts if isinstance(opts, list) else [opts])[self._opt_names.index(name)]

    def scheduler(self, name: str) -> Any:
        if name not in self._sched_names:
            return None
        scheds = self.lr_schedulers()
        return (scheds if isinstance(scheds, list) else [scheds])[self._sched_names.index(name)]

    def is_turn(self, name: str) -> bool:
        """Whether optimizer ``name`` updates in this iteration (``iteration % update_every[name] == 0``)."""
        self._check_name(name)
        return self.iteration % int(self.update_every.get(name, 1)) == 0

    def update(self, name: str, loss: Callable[[], torch.Tensor] | torch.Tensor,
               clip_norm: float | None = None) -> torch.Tensor:
        """One step of optimizer ``name`` on ``loss`` (a closure, evaluated with the other optimizers toggled off)."""
        opt = self.optimizer(name)
        self.toggle_optimizer(opt)
        try:
            value = loss() if callable(loss) else loss
            self.manual_backward(value)
            params = [p for g in opt.param_groups for p in g["params"]]
            norm = _grad_norm(params)
            clip = clip_norm if clip_norm is not None else (
                self.clip_norm.get(name) if isinstance(self.clip_norm, dict) else self.clip_norm)
            if clip:
                self.clip_gradients(opt, clip, "norm")
            lr = opt.param_groups[0]["lr"]
            opt.step()
            for o in self.trainer.optimizers:
                o.zero_grad(set_to_none=True)
            sched = self.scheduler(name)
            if sched is not None:
                sched.step()
        finally:
            self.untoggle_optimizer(opt)
        value = value.detach()
        for key, v in (("loss", value), ("lr", float(lr)), ("grad_norm", norm)):
            self.log(f"train/{name}/{key}", v, on_step=True, on_epoch=False, prog_bar=key == "loss")
        return value

    # ----------------------------------------------------------------------------------------------------- iterations
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self._drop_stale_update_logs()
        out = self.train_iteration(batch, batch_idx)
        self.iteration += 1
        self._stop_if_done()
        return out

    def _drop_stale_update_logs(self) -> None:
        """Lightning 2.6.6 sends the last value of every ``on_step`` key to the logger at each later step of the epoch:
        an optimizer that sits out this iteration would log its previous loss/lr/grad_norm again. ``update`` re-arms."""
        results = getattr(self._trainer, "_results", None) if self._trainer is not None else None
        if results is None:
            return
        for name in self._opt_names:
            for key in ("loss", "lr", "grad_norm"):
                metric = results.get(f"training_step.train/{name}/{key}")
                if metric is not None:
                    metric.has_reset = True

    def _stop_if_done(self) -> None:
        if self.max_iterations is not None and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True

    def iteration_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator identical on every rank for this iteration: ``derive_seed(seed, "iteration", it, salt)``."""
        return torch.Generator().manual_seed(derive_seed(global_seed(), "iteration", self.iteration, salt))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        cls, trainer = type(self).__name__, self.trainer
        # Lightning 2.6.6 already refuses this in its configuration validator; kept so an upgrade cannot silently ignore it
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"{cls}: trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not "
                             "supported with manual optimisation; use a larger batch (or more devices) instead")
        # each update's backward reaches only its own net: without this DDP fails at the 2nd iteration ("parameters that
        # were not used in producing the loss"); said here, before any work
        if isinstance(trainer.strategy, DDPStrategy) and not trainer.strategy._ddp_kwargs.get("find_unused_parameters"):
            raise ValueError(f"{cls}: DDP with several optimizers stepped by hand needs find_unused_parameters=True "
                             "(trainer.strategy.init_args.find_unused_parameters: true)")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.max_iterations is not None and self.trainer.max_steps not in (-1, None):
            rank_zero_warn(f"{type(self).__name__}: trainer.max_steps={self.trainer.max_steps} counts optimizer steps, "
                           f"not iterations; with max_iterations={self.max_iterations} set trainer.max_steps: -1")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._stop_if_done()  # resumed from a checkpoint that already reached max_iterations

    # ---------------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ctrlgen_iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.iteration = int(checkpoint.get("ctrlgen_iteration", 0))


def _trainable_groups(spec: Any) -> list[dict]:
    """Param groups of ``spec`` (module, params or group dicts) holding only ``requires_grad`` parameters."""
    items = list(spec.parameters() if isinstance(spec, nn.Module) else spec)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
    return [g for g in groups if g["params"]]


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _short(items: list[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
