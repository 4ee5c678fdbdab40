"""``BaseGenModule``: what every ctrlgen LightningModule shares.

- Optimizer and scheduler are injected callables (``OptimizerCallable``/``LRSchedulerCallable``, platform.md §1); only
  ``requires_grad`` parameters reach them, grouped by ``param_groups()``: :func:`decay_groups` is the one no-decay rule
  (1-D parameters and named exceptions, per parameter-name prefix when a module holds networks with their own lists).
- One ``model_step(batch, stage)`` per module returning ``{"loss": ..., <scalars to log>}``; train/val/test steps log it
  with the batch size of :func:`~ctrlgen.lightning_modules.common.recipe.batch_size_of`.
- Every seed comes from :func:`~ctrlgen.datamodules.seeding.derive_seed`. The per-rank sampling generator ``self.gen``
  is seeded with ``derive_seed(seed, rank)``: right for noise, timesteps and rollouts, which must differ across ranks;
  Lightning's global seed keeps init identical across ranks. Its state travels in checkpoints, so a resumed run
  continues the same random stream. Before every training batch torch's global RNG (dropout-like draws) is re-seeded
  with ``derive_seed(seed, rank, step, micro-batch)``, so it differs across ranks.
- Frozen bases are marked with :func:`~ctrlgen.lightning_modules.common.frozen.freeze` (``load_frozen`` does it for
  pretrained directories): they stay in eval mode through ``train()`` (trainable LoRA dropout inside them does not),
  out of the optimizer and out of checkpoints (reloaded from their own files by the config), and their path + sha256
  go into ``checkpoint["ctrlgen_bases"]``, checked on load (``base_mismatch``: error or warn). ``frozen_prefixes``
  adds state-dict prefixes to leave out for parts frozen by hand. What trains inside a frozen base stays in: keys of
  trainable parameters (``requires_grad`` or in an optimizer, e.g. peft LoRA weights
  ``unet.<path>.lora_A.<adapter>.weight``) and keys matching ``keep_in_checkpoint`` are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ctrlgen.datamodules.seeding import derive_seed, global_seed
from ctrlgen.lightning_modules.common.frozen import (base_records, frozen_components, frozen_parameter_ids,
                                                     keep_frozen_modes, provenance_mismatches)
from ctrlgen.lightning_modules.common.recipe import (batch_size_of, bind_total_steps, global_batch_size,
                                                     planned_iterations, scale_lr)

__all__ = ["BaseGenModule", "count_params", "decay_groups", "derive_seed", "global_seed"]


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def decay_groups(named: Iterable[tuple[str, torch.nn.Parameter]], no_decay_keywords: Sequence[str] = (),
                 by_prefix: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """The one no-decay rule, as two AdamW groups of the ``requires_grad`` parameters: weight decay for ≥2-D weights,
    none for 1-D params (biases, norms) and for names containing one of the keywords. ``by_prefix``: other keyword
    lists for names under a prefix (the longest matching prefix wins), e.g. ``{"var.": VAR_NO_DECAY}`` so that a VAR
    trained inside another module follows VAR's own list."""
    rules = sorted((by_prefix or {}).items(), key=lambda kv: -len(kv[0]))
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        keywords = next((kw for prefix, kw in rules if name.startswith(prefix)), no_decay_keywords)
        (no_decay if p.ndim < 2 or any(k in name for k in keywords) else decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class BaseGenModule(L.LightningModule):
    """Base of every method's module. Subclasses implement ``model_step`` and may override ``param_groups``."""

    # state-dict key prefixes dropped from checkpoints besides those of frozen components (freeze()), for parts frozen
    # by hand ("dec."): taken from the live module (loaded from its own files) on load; trainable parameters under them
    # (LoRA) are kept, see on_save_checkpoint
    frozen_prefixes: tuple[str, ...] = ()
    # substrings of state-dict keys kept in checkpoints although under frozen_prefixes and not trainable (e.g. a buffer
    # a method updates inside a frozen base, or ".lora_" to keep adapters that are frozen in the current phase)
    keep_in_checkpoint: tuple[str, ...] = ()
    # init arguments that `test/predict --ckpt_path` take from the config/CLI, not from the checkpoint's saved
    # hyper-parameters (paths of frozen bases, sampling and evaluation settings)
    runtime_args: tuple[str, ...] = ()

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, scheduler: LRSchedulerCallable | None = None,
                 scheduler_interval: str = "step", lr_reference_batch: int | None = None,
                 base_mismatch: str = "error"):
        """``lr_reference_batch``: when set, the optimizer's ``lr`` is per that many samples and is multiplied by
        global batch / ``lr_reference_batch`` at fit start (VAR/ECM: ``lr: 1.0e-4``, ``lr_reference_batch: 256``);
        see ``common/recipe.py``. ``base_mismatch``: ``error`` | ``warn`` when a checkpoint was made on other frozen
        base files (sha256) than the ones this run loads (``on_load_checkpoint``)."""
        super().__init__()
        if lr_reference_batch is not None and int(lr_reference_batch) < 1:
            raise ValueError(f"model.init_args.lr_reference_batch must be a positive batch size, "
                             f"got {lr_reference_batch}")
        if base_mismatch not in ("error", "warn"):
            raise ValueError(f"model.init_args.base_mismatch must be 'error' or 'warn', got {base_mismatch!r}")
        self.base_mismatch = base_mismatch
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
        self.check_no_frozen(groups)
        opt = factory(groups)
        self.scale_to_global_batch(opt)
        out: dict[str, Any] = {"optimizer": opt}
        if scheduler is not None:
            sched = self.make_scheduler(opt, scheduler, lambda: planned_iterations(self.trainer))
            out["lr_scheduler"] = {"scheduler": sched, "interval": self.scheduler_interval}
        return out

    def check_no_frozen(self, groups: list) -> None:
        """Frozen bases stay out of the optimizer: refuse param groups that hold a frozen parameter."""
        given = {id(p) for g in groups for p in (g["params"] if isinstance(g, dict) else [g])}
        frozen = frozen_parameter_ids(self) & given
        if frozen:
            names = [n for n, p in self.named_parameters() if id(p) in frozen]
            raise ValueError(f"{type(self).__name__}: {len(names)} parameters of frozen bases reach the optimizer "
                             f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); build param_groups() "
                             "from requires_grad parameters (decay_groups does)")

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
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self.gen = torch.Generator(device=self.device).manual_seed(derive_seed(seed, rank))
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
        torch.manual_seed(derive_seed(global_seed(), self.global_rank, self.global_step, micro))

    def train(self, mode: bool = True) -> BaseGenModule:
        """``nn.Module.train``, then frozen bases back in eval mode (their trainable adapters follow ``mode``)."""
        super().train(mode)
        keep_frozen_modes(self, mode)
        return self

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
        bs = batch_size_of(batch)
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
    def checkpoint_frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes left out of checkpoints: those of frozen components (``freeze``), ``frozen_prefixes``."""
        return tuple(self.frozen_prefixes) + tuple(f"{n}." for n in frozen_components(self))

    def frozen_bases(self) -> dict[str, dict | None]:
        """The frozen bases left out of checkpoints (reloaded from their own files): name → ``{"path", "sha256"}``,
        or None for random weights."""
        return base_records(self)

    def base_mismatch_found(self, msg: str) -> None:
        """A checkpoint or data made on other base files: fail, or warn with ``base_mismatch=warn``."""
        if self.base_mismatch == "error":
            raise ValueError(msg)
        rank_zero_warn(msg)

    def checkpoint_kept_keys(self) -> set[str]:
        """State-dict keys kept in checkpoints even under the frozen prefixes: trainable parameters (``requires_grad``,
        or held by one of the trainer's optimizers, which covers ``toggle_optimizer`` phases) inside a frozen base, and
        keys that contain a ``keep_in_checkpoint`` substring."""
        in_opt: set[int] = set()
        if self._trainer is not None:
            for opt in self._trainer.optimizers:
                in_opt.update(id(p) for g in opt.param_groups for p in g["params"])
        named = [(n, p.requires_grad or id(p) in in_opt) for n, p in self.named_parameters(remove_duplicate=False)]
        keep = {n for n, trainable in named if trainable and n.startswith(self.checkpoint_frozen_prefixes())}
        if self.keep_in_checkpoint:
            keep.update(k for k in self.state_dict() if any(s in k for s in self.keep_in_checkpoint))
        return keep

    @staticmethod
    def _dropped(key: str, prefixes: tuple[str, ...], kept: set[str]) -> bool:
        return key.startswith(prefixes) and key not in kept

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self.checkpoint_frozen_prefixes()
        if prefixes:  # frozen base weights out; what trains inside them (LoRA) and kept keys stay
            sd, kept = checkpoint["state_dict"], self.checkpoint_kept_keys()
            for k in [k for k in sd if self._dropped(k, prefixes, kept)]:
                del sd[k]
        bases = self.frozen_bases()
        if bases:
            checkpoint["ctrlgen_bases"] = bases
        if self.gen is not None:
            checkpoint["ctrlgen_generator_state"] = self.gen.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint holds no frozen base: refuse (or warn about, ``base_mismatch``) one made on other base files
        than this run's, then take the frozen weights from the live module (loaded from its own files)."""
        for msg in provenance_mismatches(checkpoint.get("ctrlgen_bases") or {}, self):
            self.base_mismatch_found(msg)
        prefixes = self.checkpoint_frozen_prefixes()
        if prefixes:
            sd, kept = checkpoint["state_dict"], self.checkpoint_kept_keys()
            for k, v in self.state_dict().items():
                # only frozen keys come from the live module: a kept (trainable) key missing from the checkpoint
                # is left missing, so strict loading names it instead of silently keeping the fresh init
                if k not in sd and self._dropped(k, prefixes, kept):
                    sd[k] = v
        self._gen_state = checkpoint.get("ctrlgen_generator_state")
        self.gen = None  # rebuilt from the saved state by ensure_generator() once the module sits on its device

    # ----------------------------------------------------------------------------------------------------- samples
    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        """Images to show for ``batch``: ``{name: (N,3,H,W) float in [0,1]}`` — logged as grids by ``ImageGridLogger``."""
        return {}

