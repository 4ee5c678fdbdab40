"""``EMA``: an exponential moving average of chosen weights, for every method, as a callback.

YAML (``trainer.callbacks``)::

    - class_path: ctrlgen.callbacks.EMA
      init_args:
        decay: 0.999                # the average's decay once warmed up
        targets: [generator]        # attribute names / state-dict prefixes; null: every parameter of the optimizer
        optimizer: generator        # ManualOptimModule optimizer whose steps update it; null: the module's only one
        use_ema_for_eval: true      # validation / test / predict run on the averaged weights, swapped back after
        warmup: none                # none | power | ratio (see ema_decay)
        update_after_step: 0        # the first updates copy the weights (decay 0)

After every ``step()`` of the named optimizer (a torch step post-hook: with ``ManualOptimModule`` accumulation that is
once per iteration on the optimizer's turns; a step that a GradScaler skips does not count), every averaged parameter
``e`` moves towards the live weight ``p``: ``e ← d·e + (1 − d)·p`` with ``d = ema_decay(updates so far)``. Only
parameters that optimizer holds are averaged (trainable ones: a frozen base, whether or not it is kept out of
checkpoints, is never copied; LoRA weights inside one are); buffers are not averaged. The average is kept in float32
for half-precision weights, else in the weights' dtype, on their device.

The average travels in the checkpoint (``callbacks[state_key]``: ``num_updates`` and ``shadow``, keyed by parameter
name) and is restored on resume; ``ctrlgen test/predict --ckpt_path`` with ``use_ema_for_eval`` evaluates it. A
checkpoint written while the average is swapped in still holds the live weights in its ``state_dict``.

A callback, not a helper inside the base: it applies to ``BaseGenModule`` (automatic optimisation, ECM) and
``ManualOptimModule`` alike without either knowing about it, is switched on from the config, and reaches every hook it
needs (optimizer steps, evaluation start/end, checkpoint state) through Lightning's public callback API. Lightning's
own ``WeightAveraging`` copies the whole module (frozen teachers included), counts ``global_step`` (all optimizers'
steps under manual optimisation) and writes the averaged weights as the checkpoint's model weights; this one does none
of that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

WARMUPS = ("none", "power", "ratio")


def ema_decay(updates: int, decay: float, warmup: str = "none", power: float = 2 / 3, inv_gamma: float = 1.0,
              min_decay: float = 0.0, update_after_step: int = 0) -> float:
    """Decay of the update that follows ``updates`` earlier ones: 0 (copy) while ``updates < update_after_step``;
    then with ``t = updates - update_after_step``: ``decay`` (``none``), ``1 - (1 + t / inv_gamma) ** -power``
    (``power``: the warm-up of diffusers' ``EMAModel(use_ema_warmup=True)``, 0 at t = 0) or ``(1 + t) / (10 + t)``
    (``ratio``), the last two capped at ``decay``; never below ``min_decay`` after ``update_after_step``."""
    if warmup not in WARMUPS:
        raise ValueError(f"EMA warmup must be one of {WARMUPS}, got {warmup!r}")
    t = int(updates) - int(update_after_step)
    if t < 0:
        return 0.0
    if warmup == "none":
        d = decay
    elif warmup == "power":
        d = min(decay, 1.0 - (1.0 + t / inv_gamma) ** -power)
    else:
        d = min(decay, (1.0 + t) / (10.0 + t))
    return max(d, min_decay)


@torch.no_grad()
def ema_update_(shadow: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """In place: every ``shadow[i] ← decay·shadow[i] + (1 − decay)·params[i]``."""
    for s, p in zip(shadow, params, strict=True):
        s.lerp_(p.detach().to(s.dtype), 1.0 - decay)


def _shadow_copy(p: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
    return p.detach().to(dtype=dtype, copy=True)


class EMA(L.Callback):
    """Exponential moving average of the weights an optimizer steps (module docstring)."""

    def __init__(self, decay: float = 0.999, targets: list[str] | None = None, optimizer: str | None = None,
                 use_ema_for_eval: bool = False, warmup: str = "none", power: float = 2 / 3, inv_gamma: float = 1.0,
                 min_decay: float = 0.0, update_after_step: int = 0):
        if not 0.0 <= decay <= 1.0 or not 0.0 <= min_decay <= decay:
            raise ValueError(f"EMA: need 0 <= min_decay <= decay <= 1, got decay={decay}, min_decay={min_decay}")
        if warmup not in WARMUPS:
            raise ValueError(f"EMA: warmup must be one of {WARMUPS}, got {warmup!r}")
        if isinstance(targets, str):
            targets = [targets]
        self.decay, self.warmup, self.power, self.inv_gamma = float(decay), warmup, float(power), float(inv_gamma)
        self.min_decay, self.update_after_step = float(min_decay), int(update_after_step)
        self.targets = [t.rstrip(".") for t in targets] if targets else None
        self.optimizer_name = optimizer
        self.use_ema_for_eval = bool(use_ema_for_eval)
        self.shadow: dict[str, torch.Tensor] | None = None  # parameter name -> average
        self.num_updates = 0
        self._params: dict[str, torch.nn.Parameter] = {}
        self._loaded: dict[str, Any] | None = None
        self._backup: dict[str, torch.Tensor] | None = None
        self._hook: Any = None
        self._warned = False

    @property
    def state_key(self) -> str:
        """One entry per (targets, optimizer): changing decay or warm-up on resume keeps the average."""
        return f"EMA[targets={self.targets}, optimizer={self.optimizer_name}]"

    def decay_now(self) -> float:
        return ema_decay(self.num_updates, self.decay, self.warmup, self.power, self.inv_gamma, self.min_decay,
                         self.update_after_step)

    # ------------------------------------------------------------------------------------------------- selection
    def _trigger(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.optim.Optimizer:
        opts = list(trainer.optimizers)
        names = list(getattr(pl_module, "optimizer_names", None) or [])
        if self.optimizer_name is None:
            if len(opts) != 1:
                raise ValueError(f"EMA: {type(pl_module).__name__} has {len(opts)} optimizers {names}; name the one "
                                 "whose steps update the average (EMA init_args.optimizer)")
            return opts[0]
        if self.optimizer_name not in names:
            raise ValueError(f"EMA: optimizer {self.optimizer_name!r} is not one of {type(pl_module).__name__}'s "
                             f"optimizers {names}; set EMA init_args.optimizer to one of them")
        return opts[names.index(self.optimizer_name)]

    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        """The averaged parameters: those the trigger optimizer holds, under ``targets`` when given."""
        held = {id(p) for g in self._trigger(trainer, pl_module).param_groups for p in g["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in held]
        if self.targets is not None:
            unmatched = [t for t in self.targets if not any(n == t or n.startswith(t + ".") for n, _ in named)]
            if unmatched:
                tops = sorted({n.split(".")[0] for n, _ in named})
                raise ValueError(f"EMA: targets {unmatched} match no parameter the optimizer steps (its parameters lie "
                                 f"under {tops}); fix EMA init_args.targets")
            named = [(n, p) for n, p in named if any(n == t or n.startswith(t + ".") for t in self.targets)]
        return dict(named)

    def _ensure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Build the average once the trainer's optimizers and the restored state exist; False if there is none
        (evaluation of a checkpoint without an average)."""
        if self.shadow is not None:
            return True
        fitting = trainer.state.fn == "fit"
        if fitting:
            self._params = self._select(trainer, pl_module)
        elif self._loaded is not None:
            named = dict(pl_module.named_parameters())
            missing = sorted(set(self._loaded["shadow"]) - set(named))
            if missing:
                raise ValueError(f"EMA: the checkpoint's average holds parameters this module lacks: {missing[:5]}")
            self._params = {n: named[n] for n in self._loaded["shadow"]}
        else:
            if self.use_ema_for_eval and not self._warned:
                rank_zero_warn("EMA: use_ema_for_eval, but no averaged weights (no checkpoint with an EMA state): "
                               "evaluating the live weights")
                self._warned = True
            return False
        if self._loaded is not None:
            saved = self._loaded["shadow"]
            if set(saved) != set(self._params):
                extra, lacking = sorted(set(saved) - set(self._params)), sorted(set(self._params) - set(saved))
                raise ValueError(f"EMA: the checkpoint's average does not match the selected parameters (only in the "
                                 f"checkpoint: {extra[:5]}, only selected now: {lacking[:5]}); keep EMA targets / "
                                 "optimizer as they were when it was written")
            self.shadow = {n: saved[n].to(device=p.device, dtype=_shadow_copy(p).dtype).clone()
                           for n, p in self._params.items()}
            self.num_updates = int(self._loaded["num_updates"])
            self._loaded = None
        else:
            if fitting and trainer.ckpt_path is not None:
                rank_zero_warn(f"EMA: the checkpoint {trainer.ckpt_path} has no state for {self.state_key}; the "
                               "average starts from the current weights")
            self.shadow = {n: _shadow_copy(p) for n, p in self._params.items()}
            self.num_updates = 0
        return True

    # ------------------------------------------------------------------------------------------------- updates
    def _after_step(self, *_: Any) -> None:
        assert self.shadow is not None
        names = list(self._params)
        ema_update_([self.shadow[n] for n in names], [self._params[n] for n in names], self.decay_now())
        self.num_updates += 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(trainer, pl_module)
        self._remove_hook()
        self._hook = self._trigger(trainer, pl_module).register_step_post_hook(self._after_step)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hook()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hook()
        self.swap_out()

    # ------------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the average into the module's parameters (the live weights kept aside until ``swap_out``)."""
        if self.shadow is None or self._backup is not None:
            return
        self._backup = {n: p.detach().clone() for n, p in self._params.items()}
        for n, p in self._params.items():
            p.copy_(self.shadow[n])

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._backup is None:
            return
        for n, p in self._params.items():
            p.copy_(self._backup[n])
        self._backup = None

    @contextlib.contextmanager
    def averaged(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """``with ema.averaged(trainer, module): ...`` runs the block on the averaged weights."""
        active = self._ensure(trainer, pl_module) and self._backup is None
        if active:
            self.swap_in()
        try:
            yield
        finally:
            if active:
                self.swap_out()

    def _eval_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_ema_for_eval and self._ensure(trainer, pl_module):
            self.swap_in()

    def _eval_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    on_validation_start = on_test_start = on_predict_start = _eval_start
    on_validation_end = on_test_end = on_predict_end = _eval_end

    # ------------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.shadow is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return {"num_updates": self.num_updates, "shadow": {n: t.detach().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = {"num_updates": int(state_dict["num_updates"]), "shadow": dict(state_dict["shadow"])}
            self.shadow = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._backup is not None:  # saved while evaluating on the average: the model weights stay the live ones
            sd = checkpoint.get("state_dict", {})
            for n, t in self._backup.items():
                if n in sd:
                    sd[n] = t.clone()
