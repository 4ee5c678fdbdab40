"""``ManualOptimModule``: the shared base for modules that step several optimizers by hand (DMD2/Defocus, GANs, GRPO).

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
        accumulate_grad_batches: 1        # k training batches (micro-batches) per iteration, one step per optimizer
        max_iterations: 19000             # with trainer.max_steps: -1 (see "Steps" below)
        lr_reference_batch: null          # 256: every lr is per 256 samples, x global batch / 256 (common/recipe.py)

``dict[str, OptimizerCallable]`` is taken as is by jsonargparse 4.53 from ``class_path/init_args`` entries (each value
becomes a partial of the class; pinned by tests/common/test_manual.py with a real ``CtrlgenCLI`` parse).

Subclasses implement ``optimizer_params()`` (``{name: module | params | param groups}``, in a fixed order: the order of
the optimizer and scheduler states in checkpoints), ``train_iteration(batch, batch_idx)`` (one micro-batch: for each
``name`` with ``self.is_turn(name)``, ``self.update(name, lambda: loss)``) and ``model_step`` for validation/test.
Subclasses call ``save_hyperparameters(ignore=["optimizers", "schedulers"])`` (the config is the record of those,
platform.md §1). A subclass that lists its own ``runtime_args`` extends ``ManualOptimModule.runtime_args`` (keeps
``max_iterations`` settable from the CLI when resuming from a checkpoint file).

``update(name, loss_fn)`` toggles the optimizer (every other optimizer's parameters ``requires_grad=False``) *while the
loss is computed*, so pass a closure: a loss tensor built before the call already recorded the other nets in its graph.
Then ``manual_backward(loss / k)``; on the last micro-batch of the iteration ``clip_gradients(opt, clip, "norm")``,
``step``, ``zero_grad``, this optimizer's scheduler ``step`` (schedulers count this optimizer's steps; DMD2 steps both
every iteration, so its generator warm-up in iterations is ``total_iters × update_every``), untoggle; it logs the
iteration's mean loss, the lr and the pre-clip grad norm of the accumulated gradient.

Gradient accumulation (``accumulate_grad_batches: k``): an iteration is k consecutive training batches. ``is_turn`` and
``iteration_generator`` depend on the iteration only, so all k micro-batches of an iteration make the same choices;
each update's loss is scaled by 1/k and its gradient accumulates until the k-th micro-batch, where every optimizer whose
turn it is steps once. Under DDP the backward of the first k-1 micro-batches runs in ``strategy.block_backward_sync()``
(DDP ``no_sync``: no gradient all-reduce). k × batch b then equals one batch of k·b for batch-mean losses, except
that a later update sees an earlier one's new weights only on the last micro-batch: compute what several updates share
(the generator's output) before the first ``update`` of ``train_iteration``. Lightning's ``trainer.accumulate_grad_batches``
does not apply to manual optimisation and is refused (pointing here). Training epochs (and an int
``val_check_interval``) must be multiples of k batches, so no validation or epoch-end checkpoint falls inside an
iteration (checked at train start).

Steps (lightning 2.6.6, pinned by tests): under manual optimisation ``trainer.global_step`` counts ``optimizer.step()``
calls over all optimizers, not iterations: two optimizers stepped each iteration advance it by 2, ``update_every:
{generator: 5}`` by 1.2 on average, and accumulation only on an iteration's last micro-batch. So ``trainer.max_steps``,
``ModelCheckpoint(every_n_train_steps)`` and the ``step{step}`` checkpoint names count optimizer steps;
``val_check_interval``, ``log_every_n_steps``, ``check_val_every_n_epoch`` and the logger's x-axis count training
batches (= iterations × k). This module's ``iteration`` counts completed iterations (saved in checkpoints as
``ctrlgen_iteration``); ``max_iterations`` stops the run after that many (``trainer.should_stop``, so Lightning also
validates once at the stop). Bound a run with ``max_iterations`` and ``trainer.max_steps: -1``; validate every M
iterations with ``val_check_interval: M × k`` and ``check_val_every_n_epoch: null``.

Per-update metrics (``train/<name>/{loss,lr,grad_norm}``) go to the loggers only at iterations where that optimizer
stepped (own bookkeeping: ``self.log`` would repeat an optimizer's last value at every later step of the epoch); they
also reach ``trainer.callback_metrics`` and the progress bar through ``self.log(logger=False)``.

Not supported under manual optimisation: ``trainer.gradient_clip_val`` (use ``clip_norm``; Lightning refuses it). DDP
needs ``find_unused_parameters: true`` (checked at fit start). ``16-mixed`` (GradScaler) would clip and log scaled
gradients: use ``bf16-mixed`` (DMD2 diverges in fp16 anyway). Random choices that must agree across ranks (DMD2's
backward-simulation depth) come from ``iteration_generator()``; per-rank noise from ``ensure_generator()``. The logged
grad norm is computed on plain tensors (not yet checked with FSDP2/DTensor gradients). EMA of chosen weights:
``ctrlgen.callbacks.EMA`` (``optimizer: <name>`` updates it after each step of that optimizer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctrlgen.datamodules.seeding import derive_seed
from ctrlgen.lightning_modules.common.base import BaseGenModule, global_seed
from ctrlgen.lightning_modules.common.recipe import global_batch_size, planned_iterations, scale_lr


class TrainerAccumulationError(MisconfigurationException, ValueError):
    """``trainer.accumulate_grad_batches > 1`` with a ``ManualOptimModule`` (Lightning's type, and a ``ValueError``)."""


class ManualOptimModule(BaseGenModule):
    """Several named optimizers, stepped by hand in ``train_iteration`` through ``update`` (see module docstring)."""

    runtime_args = BaseGenModule.runtime_args + ("max_iterations",)

    def __init__(self, optimizers: dict[str, OptimizerCallable] | None = None,
                 schedulers: dict[str, LRSchedulerCallable] | None = None, update_every: dict[str, int] | None = None,
                 clip_norm: float | dict[str, float] | None = None, max_iterations: int | None = None,
                 lr_reference_batch: int | None = None, accumulate_grad_batches: int = 1):
        super().__init__(lr_reference_batch=lr_reference_batch)
        self.automatic_optimization = False
        self.optimizer_factory = None  # the single-optimizer injection of BaseGenModule is not used here
        self.optimizer_factories = dict(optimizers or {})
        self.scheduler_factories = dict(schedulers or {})
        self.update_every = dict(update_every or {})
        bad = {k: v for k, v in self.update_every.items() if int(v) < 1}
        if bad:
            raise ValueError(f"{type(self).__name__}: update_every must be >= 1, got {bad}")
        if isinstance(accumulate_grad_batches, bool) or int(accumulate_grad_batches) != accumulate_grad_batches \
                or accumulate_grad_batches < 1:
            raise ValueError(f"{type(self).__name__}: model.init_args.accumulate_grad_batches must be an integer >= 1 "
                             f"(training batches per iteration), got {accumulate_grad_batches!r}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.clip_norm = clip_norm
        self.max_iterations = max_iterations
        self.iteration = 0    # completed training iterations (k batches each); saved in checkpoints
        self.micro_batch = 0  # index of the current training batch within its iteration (0 .. k-1)
        self._opt_names: list[str] = []
        self._sched_names: list[str] = []
        self._stepped: dict[str, dict[str, Any]] = {}  # this iteration's metrics per optimizer that stepped
        self._loss_sum: dict[str, torch.Tensor] = {}   # per optimizer: unscaled losses of this iteration so far

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

    def scale_to_global_batch(self, opt: torch.optim.Optimizer, name: str = "optimizer") -> None:
        """With ``lr_reference_batch``: lr × samples per step (per-device batch × world size × k) / reference."""
        if self.lr_reference_batch is None:
            return
        gb = global_batch_size(self.trainer, accumulate=False) * self.accumulate_grad_batches
        lrs = scale_lr(opt, gb / self.lr_reference_batch)
        rank_zero_info(f"{type(self).__name__}: {name} lr x {gb}/{self.lr_reference_batch} (global batch / "
                       f"lr_reference_batch) -> {', '.join(f'{lr:.4g}' for lr in lrs)}")

    def planned_updates(self, name: str) -> int:
        """Steps optimizer ``name`` will make in this run: ⌈iterations / update_every⌉, iterations bounded by
        ``max_iterations`` or ``max_epochs`` × epoch batches / k (``trainer.max_steps`` counts all optimizers' steps,
        so it is not used)."""
        k = self.accumulate_grad_batches
        cap = -1 if self.max_iterations is None else int(self.max_iterations) * k  # in batches
        its = math.ceil(planned_iterations(self.trainer, cap, accumulate=False) / k)
        return math.ceil(its / int(self.update_every.get(name, 1)))

    @property
    def optimizer_names(self) -> list[str]:
        """Optimizer names in the order of ``trainer.optimizers`` (set by ``configure_optimizers``)."""
        return list(self._opt_names)

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

    @property
    def accumulating(self) -> bool:
        """Whether the current training batch is not the last micro-batch of its iteration (no optimizer steps)."""
        return self.micro_batch < self.accumulate_grad_batches - 1

    def update(self, name: str, loss: Callable[[], torch.Tensor] | torch.Tensor,
               clip_norm: float | None = None) -> torch.Tensor:
        """Backward of ``loss`` (a closure, evaluated with the other optimizers toggled off) / k for optimizer
        ``name``; on the iteration's last micro-batch also clip, step, zero_grad and schedule (module docstring).
        With accumulation, call it once per optimizer and micro-batch (several calls on the last one would step
        several times, the later ones on their own gradient only)."""
        opt, k = self.optimizer(name), self.accumulate_grad_batches
        strategy = self.trainer.strategy
        no_sync = self.accumulating and isinstance(strategy, ParallelStrategy)
        self.toggle_optimizer(opt)
        try:
            value = loss() if callable(loss) else loss
            with strategy.block_backward_sync() if no_sync else contextlib.nullcontext():
                self.manual_backward(value / k if k > 1 else value)
            total = self._loss_sum.get(name)
            self._loss_sum[name] = value.detach() if total is None else total + value.detach()
            if not self.accumulating:
                params = [p for g in opt.param_groups for p in g["params"]]
                norm = _grad_norm(params)
                clip = clip_norm if clip_norm is not None else (
                    self.clip_norm.get(name) if isinstance(self.clip_norm, dict) else self.clip_norm)
                if clip:
                    self.clip_gradients(opt, clip, "norm")
                lr = opt.param_groups[0]["lr"]
                opt.step()
                opt.zero_grad(set_to_none=True)  # the other optimizers' parameters were toggled off: no grads there
                sched = self.scheduler(name)
                if sched is not None:
                    sched.step()
                self._stepped[name] = {"loss": self._loss_sum.pop(name) / k, "lr": float(lr), "grad_norm": norm}
        finally:
            self.untoggle_optimizer(opt)
        return value.detach()

    # ----------------------------------------------------------------------------------------------------- iterations
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = self.train_iteration(batch, batch_idx)
        if self.accumulating:
            self.micro_batch += 1
            return out
        self.micro_batch = 0
        self.iteration += 1
        self._stop_if_done()
        self._log_updates()
        self._loss_sum.clear()  # an optimizer whose turn came on a later micro-batch only: its partial sum
        return out

    def _log_updates(self) -> None:
        """Metrics of the optimizers that stepped in this iteration: to the loggers at this batch's step (the x-axis
        Lightning uses: training batches before this one; every ``log_every_n_steps`` batches and at the stop), and
        to ``callback_metrics`` / the progress bar."""
        stepped, self._stepped = self._stepped, {}
        metrics = {f"train/{name}/{key}": v for name, m in stepped.items() for key, v in m.items()}
        for key, v in metrics.items():
            self.log(key, v, on_step=True, on_epoch=False, prog_bar=key.endswith("/loss"), logger=False)
        trainer = self.trainer
        k = self.accumulate_grad_batches
        step = self.iteration * k - 1  # this batch's index in the run
        every = trainer.log_every_n_steps  # due when this iteration's k batches reach a multiple of it
        due = trainer.fast_dev_run or trainer.should_stop or (every > 0 and (step + 1) // every > (step + 1 - k) // every)
        if metrics and due and trainer.loggers:
            scalars = {k: float(v) for k, v in metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    def _stop_if_done(self) -> None:
        if self.max_iterations is not None and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True

    def iteration_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator identical on every rank for this iteration: ``derive_seed(seed, "iteration", it, salt)``."""
        return torch.Generator().manual_seed(derive_seed(global_seed(), "iteration", self.iteration, salt))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.accumulate_grad_batches > 1:  # global_step stays put within an iteration: the micro-batch tells apart
            torch.manual_seed(derive_seed(global_seed(), self.global_rank, self.global_step, self.micro_batch))

    # ------------------------------------------------------------------------------------------------ trainer checks
    def _refuse_lightning_accumulation(self) -> None:
        n = self.trainer.accumulate_grad_batches
        if n != 1:
            raise TrainerAccumulationError(
                f"{type(self).__name__}: trainer.accumulate_grad_batches={n} is not supported with manual optimisation "
                f"(Lightning's gradient accumulation is not supported for manual optimisation); set "
                f"model.init_args.accumulate_grad_batches: {n} (this module accumulates its updates itself) and leave "
                "trainer.accumulate_grad_batches at 1")

    def configure_callbacks(self) -> Any:
        """Adds no callbacks; refuses ``trainer.accumulate_grad_batches > 1`` here, the first hook of ``fit``, so the
        message names this module's own knob (Lightning refuses it right after, with its own message)."""
        if self.trainer.state.fn == "fit":
            self._refuse_lightning_accumulation()
        return super().configure_callbacks()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._refuse_lightning_accumulation()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        cls, trainer = type(self).__name__, self.trainer
        # each update's backward reaches only its own net: without this DDP fails at the 2nd iteration ("parameters that
        # were not used in producing the loss"); said here, before any work
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ValueError(f"{cls}: DDP with several optimizers stepped by hand needs find_unused_parameters=True "
                             "(trainer.strategy.init_args.find_unused_parameters: true)")
        if self.max_iterations is not None and trainer.max_steps not in (-1, None):
            rank_zero_warn(f"{cls}: trainer.max_steps={trainer.max_steps} counts optimizer steps, "
                           f"not iterations; with max_iterations={self.max_iterations} set trainer.max_steps: -1")

    def on_train_start(self) -> None:
        super().on_train_start()
        cls, trainer, k = type(self).__name__, self.trainer, self.accumulate_grad_batches
        checks = [("an epoch", trainer.num_training_batches, "limit_train_batches or the datamodule's epoch")]
        if trainer.enable_validation:
            checks.append(("trainer.val_check_interval", trainer.val_check_batch, "trainer.val_check_interval"))
        for what, n, fix in checks:
            if k > 1 and isinstance(n, int) and n % k:
                raise ValueError(f"{cls}: {what} of {n} training batches is not a multiple of "
                                 f"model.init_args.accumulate_grad_batches={k}: an iteration would straddle it; set "
                                 f"{fix} to a multiple of {k}")
        self.micro_batch = 0
        self._stop_if_done()  # resumed from a checkpoint that already reached max_iterations

    # ---------------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.micro_batch:
            rank_zero_warn(f"{type(self).__name__}: checkpoint saved at micro-batch {self.micro_batch} of "
                           f"{self.accumulate_grad_batches}: the gradients accumulated so far are not in it, a resumed "
                           f"run starts iteration {self.iteration} afresh")
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
