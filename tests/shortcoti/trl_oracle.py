"""TRL 1.16.0's own ``GRPOTrainer._compute_loss`` as a numerical oracle, run without a real trainer or model.

The trainer is made with ``GRPOTrainer.__new__`` and given only the attributes ``_compute_loss`` reads; its model is a
stub with TRL's fused-LM-head contract (``model(..., labels=labels, fused_lm_head=True).log_probs`` = per-token
log-probs of the next token, shifted by one, 0 where the label is -100), computed from given logits with TRL's own
``selective_log_softmax``. An AttributeError after a TRL upgrade names an attribute the method now also reads.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch
from ctrlgen.lightning_modules.shortcoti.grpo import LossConfig
from trl import GRPOTrainer
from trl.trainer.utils import selective_log_softmax


class FusedHeadStub(torch.nn.Module):
    """Returns log-probs of ``logits`` (B, P + C, V) at the labels, or fixed ``completion_logps`` (B, C)."""

    def __init__(self, logits: torch.Tensor | None = None, completion_logps: torch.Tensor | None = None):
        super().__init__()
        self.logits, self.completion_logps = logits, completion_logps

    def forward(self, input_ids, attention_mask, labels, fused_lm_head=False, **kwargs):
        assert fused_lm_head, "TRL 1.16 scores completions through the fused LM head"
        shifted = labels[:, 1:]
        if self.logits is not None:
            logps = selective_log_softmax(self.logits[:, :-1], shifted.clamp(min=0)).masked_fill(shifted == -100, 0.0)
        else:
            C = self.completion_logps.shape[1]
            pad = self.completion_logps.new_zeros(shifted.shape[0], shifted.shape[1] - C)
            logps = torch.cat([pad, self.completion_logps], dim=1)
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps))


def make_trainer(cfg: LossConfig, model: torch.nn.Module, accumulation_steps: int = 1,
                 steps_per_generation: int = 1) -> GRPOTrainer:
    """A GRPOTrainer shell carrying the loss settings of ``cfg`` and nothing else."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.loss_type = cfg.type
    trainer.beta = cfg.beta
    trainer.epsilon_low = cfg.epsilon
    trainer.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    trainer.args = SimpleNamespace(delta=cfg.delta, use_bias_correction_kl=cfg.kl_bias_correction,
                                   steps_per_generation=steps_per_generation)
    trainer.use_vllm = False
    trainer.model = model
    trainer.current_gradient_accumulation_steps = accumulation_steps
    trainer.max_completion_length = cfg.max_completion_length
    trainer.accelerator = SimpleNamespace(
        autocast=contextlib.nullcontext, gather=lambda x: x, gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x, num_processes=1, sync_gradients=True, is_main_process=True,
    )
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def trl_loss(trainer: GRPOTrainer, prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
             old_logps=None, ref_logps=None, num_items=None) -> torch.Tensor:
    """``trainer._compute_loss`` on one micro-batch (the stub model sits in ``trainer.model``)."""
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum() if num_items is None else torch.as_tensor(num_items),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    return trainer._compute_loss(trainer.model, inputs)
