"""``BaseGenModule``: what every ctrlgen LightningModule shares.

- Optimizer and scheduler are injected callables (``OptimizerCallable``/``LRSchedulerCallable``, platform.md §1); only
  ``requires_grad`` parameters reach them, grouped by ``param_groups()`` (subclasses exclude norms/gates from decay).
- One ``model_step(batch, stage)`` per module returning ``{"loss": ..., <scalars to log>}``; train/val/test steps log it.
- Per-rank sampling generator ``self.gen`` seeded with ``seed * world_size + global_rank`` (the DiT rule): right for noise,
  timesteps and rollouts, which must differ across ranks; Lightning's global seed keeps init identical across ranks.
  Its state travels in checkpoints, so a resumed run continues the same random stream. Before every training batch
  torch's global RNG (dropout-like draws) is re-seeded per (seed, rank, step, micro-batch), so it differs across ranks.
- Frozen bases (``frozen_prefixes``) stay out of checkpoints: they are reloaded from their own files by the config.
  What trains inside a frozen base stays in: keys of trainable parameters (``requires_grad`` or in an optimizer, e.g.
  peft LoRA weights ``unet.<path>.lora_A.<adapter>.weight``) and keys matching ``keep_in_checkpoint`` are kept.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from ctrlgen.lightning_modules.common.recipe import bind_total_steps, global_batch_size, planned_iterations, scale_lr


def global_seed() -> int:
    """The run's seed (``seed_everything``), identical on every rank."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def batch_seed(seed: int, rank: int, *counters: int) -> int:
    """A seed for one training batch of one rank: different across ranks and batches, and the same again when a
    resumed run reaches that batch (``counters``: e.g. epoch, batch index, optimizer step)."""
    mixed = (int(seed) * 0x9E3779B1 + int(rank) * 0x7FEB352D + 0x165667B1) % (2**63 - 1)
    for c in counters:
        mixed = (mixed * 0x85EBCA77 + int(c) + 0x27D4EB2F) % (2**63 - 1)
    return mixed


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def decay_groups(named: Iterable[tuple[str, torch.nn.Parameter]], no_decay_keywords: tuple[str, ...] = ()) -> list[dict]:
    """Two AdamW groups: weight decay for ≥2-D weights, none for 1-D params (biases, norms) and named exceptions."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in no_decay_keywords) else decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class BaseGenModule(L.LightningModule):
    """Base of every method's module. Subclasses implement ``model_step`` and may override ``param_groups``."""

    # state-dict key prefixes of frozen bases ("unet.", "vae."): dropped from checkpoints and taken from the live module
    # (loaded from its own files) on load; trainable parameters under them (LoRA) are kept, see on_save_checkpoint
    frozen_prefixes: tuple[str, ...] = ()
    # substrings of state-dict keys kept in checkpoints although under frozen_prefixes and not trainable (e.g. a buffer
    # a method updates inside a frozen base, or ".lora_" to keep adapters that are frozen in the current phase)
    keep_in_checkpoint: tuple[str, ...] = ()
    # init arguments that `test/predict --ckpt_path` take from the config/CLI, not from the checkpoint's saved
    # hyper-parameters (paths of frozen bases, sampling and evaluation settings)
    runtime_args: tuple[str, ...] = ()

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, scheduler: LRSchedulerCallable | None = None,
                 scheduler_interval: str = "step", lr_reference_batch: int | None = None):
        """``lr_reference_batch``: when set, the optimizer's ``lr`` is per that many samples and is multiplied by
        global batch / ``lr_reference_batch`` at fit start (VAR/ECM: ``lr: 1.0e-4``, ``lr_reference_batch: 256``);
        see ``common/recipe.py``."""
        super().__init__()
        if lr_reference_batch is not None and int(lr_reference_batch) < 1:
            raise ValueError(f"model.init_args.lr_reference_batch must be a positive batch size, "
                             f"got {lr_reference_batch}")
        self.lr_reference_batch = lr_reference_batch
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None
        self._eval_loss: dict[str, torch.Tensor] = {}  # stage -> (sum of loss x batch size, samples) over eval loaders

    # ---------------------------------------------------------------------------------------------------- optimizers
    def param_groups(self) -> list[dict] | list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def build_optimizer(self, factory: OptimizerCallable, params: Any, scheduler: LRSchedulerCallable | None) -> dict:
        groups = list(params)
        if not groups or (isinstance(groups[0], dict) and not any(g["params"] for g in groups)):
            raise ValueError(f"{type(self).__name__}: no trainable parameters reach the optimizer")
        opt = factory(groups)
        self.scale_to_global_batch(opt)
        out: dict[str, Any] = {"optimizer": opt}
        if scheduler is not None:
            sched = self.make_scheduler(opt, scheduler, lambda: planned_iterations(self.trainer))
            out["lr_scheduler"] = {"scheduler": sched, "interval": self.scheduler_interval}
        return out

    def scale_to_global_batch(self, opt: torch.optim.Optimizer, name: str = "optimizer") -> None:
        """With ``lr_reference_batch``: every param group's lr × global batch / ``lr_reference_batch``."""
        if self.lr_reference_batch is None:
            return
        gb = global_batch_size(self.trainer, accumulate=self.automatic_optimization)
        lrs = scale_lr(opt, gb / self.lr_reference_batch)
        rank_zero_info(f"{type(self).__name__}: {name} lr x {gb}/{self.lr_reference_batch} (global batch / "
                       f"lr_reference_batch) -> {', '.join(f'{lr:.4g}' for lr in lrs)}")

    def make_scheduler(self, opt: torch.optim.Optimizer, factory: LRSchedulerCallable, total_steps: Any,
                       name: str = "optimizer") -> Any:
        """``factory(opt)``; a scheduler built with ``total_steps: null`` is bound to ``total_steps()`` (the run's
        planned steps of this optimizer)."""
        sched = factory(opt)
        if getattr(sched, "total_steps", 0) is None:
            n = int(total_steps())
            bind_total_steps(sched, n)
            rank_zero_info(f"{type(self).__name__}: {name} schedule bound to {n:,} optimizer steps")
        return sched

    def configure_optimizers(self) -> Any:
        return self.build_optimizer(self.optimizer_factory, self.param_groups(), self.scheduler_factory)

    # ---------------------------------------------------------------------------------------------------- seeding
    def ensure_generator(self) -> torch.Generator:
        """The per-rank generator on this module's device (created after device placement; restored on resume)."""
        if self.gen is None or self.gen.device.type != self.device.type:
            seed = global_seed()
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
            self.gen = torch.Generator(device=self.device).manual_seed(seed * world + rank)
            if self._gen_state is not None:
                self.gen.set_state(self._gen_state)
        return self.gen

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Re-seed torch's global RNG per (seed, rank, optimizer step, micro-batch) before every training batch:
        dropout-like draws (class/control dropout, drop-path, ``nn.Dropout``) use it, often inside compiled regions
        that take no generator. Lightning seeds every rank alike, so otherwise every rank would drop the same batch
        positions. The step counter is restored exactly on resume (epoch and batch index are not, after a checkpoint
        written at train end in the middle of an epoch)."""
        micro = batch_idx % max(1, getattr(self._trainer, "accumulate_grad_batches", 1) or 1)
        torch.manual_seed(batch_seed(global_seed(), self.global_rank, self.global_step, micro))

    def on_train_start(self) -> None:
        # re-apply the checkpoint's generator state after the sanity check, which may have drawn from it
        if self._gen_state is not None:
            self.ensure_generator().set_state(self._gen_state)
            self._gen_state = None

    def on_fit_start(self) -> None:
        self.ensure_generator()
        trainable = count_params(p for p in self.parameters() if p.requires_grad)
        total = count_params(self.parameters())
        rank_zero_info(f"{type(self).__name__}: {trainable:,} trainable / {total:,} parameters "
                       f"({total - trainable:,} frozen)")

    def on_validation_start(self) -> None:
        self.ensure_generator()

    def on_test_start(self) -> None:
        self.ensure_generator()

    def on_predict_start(self) -> None:
        self.ensure_generator()

    # ------------------------------------------------------------------------------------------------------- steps
    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement model_step(batch, stage)")

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        out = self.model_step(batch, stage)
        bs = _batch_size(batch)
        for k, v in out.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            # several eval loaders (one per stream of a MultiStreamDataModule): Lightning suffixes the keys with
            # /dataloader_idx_<i>; the overall {stage}/loss (checkpoint monitor) is logged by _log_eval_loss
            self.log(f"{stage}/{k}", v, prog_bar=k == "loss", on_step=stage == "train", on_epoch=stage != "train",
                     batch_size=bs, sync_dist=stage != "train")
        t = self._trainer
        if stage in ("val", "test") and t is not None and len(getattr(t, f"num_{stage}_batches")) > 1:
            n = float(bs or 1)
            total = self._eval_loss.setdefault(stage, torch.zeros(2, device=self.device))
            total += torch.stack([out["loss"].detach().float().reshape(()) * n, torch.tensor(n, device=self.device)])
        return out["loss"]

    def _log_eval_loss(self, stage: str) -> None:
        """With several eval loaders: ``{stage}/loss`` = mean over all their samples on all ranks."""
        total = self._eval_loss.pop(stage, None)
        if total is not None:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            self.log(f"{stage}/loss", total[0] / total[1], prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._step(batch, "test")

    # ------------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_kept_keys(self) -> set[str]:
        """State-dict keys kept in checkpoints even under ``frozen_prefixes``: trainable parameters (``requires_grad``,
        or held by one of the trainer's optimizers, which covers ``toggle_optimizer`` phases) inside a frozen base, and
        keys that contain a ``keep_in_checkpoint`` substring."""
        in_opt: set[int] = set()
        if self._trainer is not None:
            for opt in self._trainer.optimizers:
                in_opt.update(id(p) for g in opt.param_groups for p in g["params"])
        named = [(n, p.requires_grad or id(p) in in_opt) for n, p in self.named_parameters(remove_duplicate=False)]
        keep = {n for n, trainable in named if trainable and n.startswith(self.frozen_prefixes)}
        if self.keep_in_checkpoint:
            keep.update(k for k in self.state_dict() if any(s in k for s in self.keep_in_checkpoint))
        return keep

    def _dropped(self, key: str, kept: set[str]) -> bool:
        return key.startswith(self.frozen_prefixes) and key not in kept

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.frozen_prefixes:  # frozen base weights out; what trains inside them (LoRA) and kept keys stay
            sd, kept = checkpoint["state_dict"], self.checkpoint_kept_keys()
            for k in [k for k in sd if self._dropped(k, kept)]:
                del sd[k]
        if self.gen is not None:
            checkpoint["ctrlgen_generator_state"] = self.gen.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.frozen_prefixes:  # the frozen base was loaded from its own files: keep it
            sd, kept = checkpoint["state_dict"], self.checkpoint_kept_keys()
            for k, v in self.state_dict().items():
                # only frozen keys come from the live module: a kept (trainable) key missing from the checkpoint
                # is left missing, so strict loading names it instead of silently keeping the fresh init
                if k not in sd and self._dropped(k, kept):
                    sd[k] = v
        self._gen_state = checkpoint.get("ctrlgen_generator_state")
        self.gen = None  # rebuilt from the saved state by ensure_generator() once the module sits on its device

    # ----------------------------------------------------------------------------------------------------- samples
    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        """Images to show for ``batch``: ``{name: (N,3,H,W) float in [0,1]}`` — logged as grids by ``ImageGridLogger``."""
        return {}


def _batch_size(batch: Any) -> int | None:
    """Leading size of the first tensor of a dict batch, else of its first nested ``{stream: batch}`` (multi-stream
    batches; Lightning's own inference warns when the streams' sizes differ)."""
    if isinstance(batch, dict):
        items = [(k, v) for k, v in batch.items() if not str(k).startswith("_")]
        for _, v in items:
            if torch.is_tensor(v) and v.ndim > 0:
                return int(v.shape[0])
        for _, v in items:
            if isinstance(v, dict) and (n := _batch_size(v)) is not None:
                return n
    return None
