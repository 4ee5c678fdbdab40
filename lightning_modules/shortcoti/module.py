"""``ShortCoTIModule``: T2I-R1's two-level GRPO on a Janus policy with ShortCoTI's CoT length modes (spec §2, §3).

One training batch = B prompts (``data.prompts_per_batch``), each rolled out G times without gradient: CoT
(:func:`~.rollout.rollout_cot`) → length stage on the CoT segment only (CapLength cuts before the image prompt is
built) → image tokens with CFG (:func:`~.rollout.rollout_image`) → quality rewards on the **original** prompts
(:mod:`.rewards`) → R = Σ λ_k r_k + R_len (:func:`~.length.apply_length_mode`; the adaptive mode reads the quality
rewards) → group advantages (:func:`~ctrlgen.lightning_modules.common.rollouts.group_advantages`) → GRPO loss on
[CoT | image] rows (:func:`~.grpo.grpo_loss`), ``loss.num_iterations`` (μ) optimizer steps per rollout (μ > 1
keeps the rollout's log-probs as the old policy, so the ratio and clipping act).

Only ``policy.trainable_parameters()`` (language model + lm_head) reach the injected optimizer (``optimizers:
{policy: ...}``, ManualOptimModule); the reference for the KL (β > 0) is a frozen copy of the language model and
lm_head (``ref``, frozen with ``common.frozen.freeze``: out of the optimizer and out of checkpoints, rebuilt from
``janus_path`` on resume); the vision, VQ and generation modules are frozen by :class:`~.policy.JanusPolicy` and
shared. Reference log-probs come from the same policy with its language model and lm_head swapped for the copies.

Logged per step (``train/…``): reward, reward_std, frac_zero_std, each quality reward, the length reward, CoT words and
tokens (mean, p50, p90, max), fraction of empty and of capped CoTs, w(e) and easiness (adaptive), KL, clip ratios;
``train/policy/{loss,lr,grad_norm}`` from ManualOptimModule. Validation rolls out ``eval_G`` samples per prompt and logs
the quality reward and CoT lengths; ``val/loss`` = −mean weighted quality reward (the checkpoint monitor keeps the best).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from ctrlgen.lightning_modules.common.frozen import freeze
from ctrlgen.lightning_modules.common.manual import ManualOptimModule
from ctrlgen.lightning_modules.common.rollouts import (
    group_advantages,
    group_stats,
    repeat_for_groups,
)
from ctrlgen.lightning_modules.shortcoti.grpo import (
    LossConfig,
    concat_segments,
    grpo_loss,
)
from ctrlgen.lightning_modules.shortcoti.length import (
    LengthConfig,
    apply_length_mode,
    cap_max_new_tokens,
    ema_easiness,
)
from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy, TinyJanusSpec
from ctrlgen.lightning_modules.shortcoti.rewards import (
    RewardFn,
    instantiate,
    score_all,
    weighted_sum,
)
from ctrlgen.lightning_modules.shortcoti.rollout import (
    ImageSamplingConfig,
    PromptTemplate,
    SamplingConfig,
    rollout_cot,
    rollout_image,
)
from ctrlgen.lightning_modules.shortcoti.rollout_types import CotRollout, ImageRollout
from ctrlgen.lightning_modules.shortcoti.scoring import IMAGE_LOGP, score_rollout
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclasses.dataclass
class GroupRollout:
    """One batch of B·G rollouts, ready for the loss: ``cot`` (its mask after the length stage), ``image``,
    ``advantages`` (B·G,), ``ref``/``old`` per-token log-probs of [CoT | image] (None when unused), ``metrics``."""

    cot: CotRollout
    image: ImageRollout
    advantages: torch.Tensor
    ref: torch.Tensor | None
    old: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


def _typed(d: dict | None) -> dict:
    """A knob dict with command-line strings read as YAML scalars (``--model.init_args.length.alpha=0.1`` reaches an
    untyped dict as the string "0.1")."""
    import yaml

    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (d or {}).items()}


def _quantiles(x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    x = x.to(torch.float64)
    return {f"{prefix}": x.mean(), f"{prefix}_p50": x.quantile(0.5), f"{prefix}_p90": x.quantile(0.9),
            f"{prefix}_max": x.max()}


class ShortCoTIModule(ManualOptimModule):
    """Two-level GRPO with CoT length modes (module docstring). Knobs follow spec §3 (``model.init_args.*``)."""

    runtime_args = ManualOptimModule.runtime_args + ("janus_path",)

    def __init__(self, rewards: Sequence[RewardFn], janus_path: str | None = None, tiny: dict | None = None,
                 tiny_seed: int = 0, dtype: str | None = None, G: int = 8, eval_G: int = 1,
                 cot: dict | None = None, eval_cot_max_new_tokens: int | None = None, image: dict | None = None,
                 template: dict | None = None, max_prompt_length: int | None = 512, image_logp: str = "cond",
                 loss: dict | None = None, length: dict | None = None, advantage: dict | None = None,
                 reward_weights: dict[str, float] | None = None,
                 optimizers: dict[str, OptimizerCallable] | None = None,
                 schedulers: dict[str, LRSchedulerCallable] | None = None, clip_norm: float | None = 1.0,
                 max_iterations: int | None = None, lr_reference_batch: int | None = None,
                 accumulate_grad_batches: int = 1):
        """``janus_path``: a local ``save_pretrained`` directory (Janus-Pro-1B/7B in transformers' format, or a
        pretrained tiny policy); None builds a random tiny Janus from ``tiny`` (:class:`TinyJanusSpec` fields) and
        ``tiny_seed``. ``cot``/``image``/``loss``/``length``/``template``: fields of :class:`SamplingConfig`,
        :class:`ImageSamplingConfig`, :class:`LossConfig`, :class:`LengthConfig`, :class:`PromptTemplate`;
        ``advantage``: ``{scale: group|batch|none, eps: 1e-4}``; ``image_logp``: ``cond`` (T2I-R1) | ``guided``."""
        super().__init__(optimizers=optimizers, schedulers=schedulers, clip_norm=clip_norm,
                         max_iterations=max_iterations, lr_reference_batch=lr_reference_batch,
                         accumulate_grad_batches=accumulate_grad_batches)
        self.save_hyperparameters(ignore=["optimizers", "schedulers", "rewards"])
        if G < 2 or eval_G < 1:
            raise ValueError(f"ShortCoTIModule: G must be >= 2 (group advantages) and eval_G >= 1, got {G}, {eval_G}")
        if image_logp not in IMAGE_LOGP:
            raise ValueError(f"model.init_args.image_logp must be one of {IMAGE_LOGP}, got {image_logp!r}")
        self.rewards = [instantiate(r) for r in rewards]
        self.reward_weights = dict(reward_weights or {})
        self.G, self.eval_G, self.image_logp = int(G), int(eval_G), image_logp
        self.cot_cfg = SamplingConfig(**_typed(cot))
        self.length_cfg = LengthConfig(**_typed(length))
        if self.length_cfg.mode == "cap":  # no need to decode past what the cap keeps
            budget = min(self.cot_cfg.max_new_tokens, cap_max_new_tokens(self.length_cfg))
            self.cot_cfg = dataclasses.replace(self.cot_cfg, max_new_tokens=budget)
        eval_tokens = eval_cot_max_new_tokens or self.cot_cfg.max_new_tokens
        self.eval_cot_cfg = dataclasses.replace(self.cot_cfg, max_new_tokens=eval_tokens)
        self.image_cfg = ImageSamplingConfig(**_typed(image))
        self.loss_cfg = LossConfig(**_typed(loss))
        if self.loss_cfg.num_iterations > 1 and self.accumulate_grad_batches > 1:
            raise ValueError("ShortCoTIModule: loss.num_iterations > 1 (several steps per rollout) cannot be combined "
                             "with accumulate_grad_batches > 1; set one of them to 1")
        adv = {"scale": "group", "eps": 1e-4, **_typed(advantage)}
        self.adv_scale, self.adv_eps = str(adv["scale"]), float(adv["eps"])
        self.template = PromptTemplate(**(template or {}))
        self.max_prompt_length = max_prompt_length
        self.needs_images = any(r.needs_images for r in self.rewards)
        self.policy = self._build_policy(janus_path, tiny, tiny_seed, dtype)
        self.ref = None
        if self.loss_cfg.beta > 0:
            pair = nn.ModuleDict({"lm": self.policy.language_model, "head": self.policy.model.lm_head})
            self.ref = freeze(copy.deepcopy(pair).eval(), source=janus_path, config_key="model.init_args.janus_path")
        self._easiness: dict[int, float] = {}  # per-prompt running easiness (length.difficulty_source: ema)

    @staticmethod
    def _build_policy(path: str | None, tiny: dict | None, seed: int, dtype: str | None) -> JanusPolicy:
        torch_dtype = None if dtype is None else _DTYPES[dtype]
        if path is not None:
            return JanusPolicy.from_pretrained(path, dtype=torch_dtype)
        policy = JanusPolicy.tiny(TinyJanusSpec(**_typed(tiny)), seed=seed)
        return policy if torch_dtype is None else policy.to(torch_dtype)

    def optimizer_params(self) -> dict[str, Any]:
        return {"policy": self.policy.trainable_parameters()}

    # ------------------------------------------------------------------------------------------------- rollouts
    @contextlib.contextmanager
    def reference(self):
        """The policy with its language model and lm_head swapped for the frozen reference copies."""
        if self.ref is None:
            raise RuntimeError("no reference model (loss.beta is 0)")
        inner, model = self.policy.model.model, self.policy.model
        lm, head = inner.language_model, model.lm_head
        inner.language_model, model.lm_head = self.ref["lm"], self.ref["head"]
        try:
            yield self.policy
        finally:
            inner.language_model, model.lm_head = lm, head

    def _score(self, cot: CotRollout, image: ImageRollout) -> tuple[torch.Tensor, torch.Tensor]:
        s = score_rollout(self.policy, cot, image, self.cot_cfg, self.image_cfg, self.image_logp)
        return concat_segments(s["cot_logp"], s["image_logp"]), concat_segments(s["cot_mask"], s["image_mask"])

    def _cot_and_image(self, prompts: list[str], metas: list[dict], sampling: SamplingConfig, G: int,
                       index: torch.Tensor | None = None) -> tuple[CotRollout, ImageRollout, dict[str, Any]]:
        cfg, eos, policy = self.length_cfg, self.policy.eos_token_id, self.policy
        cot = rollout_cot(policy, prompts, sampling, self.template, self.max_prompt_length)
        stage = None
        if cfg.mode == "cap":  # the cut CoT is what enters the image prompt
            stage = apply_length_mode(cfg, cot.ids, cot.mask, cot.texts, eos, decode=policy.decode_text)
        texts = cot.texts if stage is None else stage["texts"]
        image = rollout_image(policy, prompts, texts, self.image_cfg, self.template, decode=self.needs_images,
                              max_prompt_length=self.max_prompt_length)
        quality, active = score_all(self.rewards, prompts, metas, image.tokens, image.images)
        if stage is None:
            override = self._easiness_override(metas, index, quality, active, G)
            stage = apply_length_mode(cfg, cot.ids, cot.mask, cot.texts, eos, G=G, quality=quality,
                                      active=active, easiness_override=override)
        cot = dataclasses.replace(cot, mask=stage["mask"].to(cot.mask.device).bool(), texts=list(stage["texts"]))
        return cot, image, {"quality": quality, "active": active, **stage}

    def _easiness_override(self, metas, index, quality, active, G) -> torch.Tensor | None:
        cfg = self.length_cfg
        if cfg.mode != "adaptive" or cfg.difficulty_source == "group":
            return None
        if cfg.difficulty_source == "offline":
            missing = [i for i, m in enumerate(metas) if "easiness" not in m]
            if missing:
                raise ValueError("length.difficulty_source 'offline' needs an 'easiness' field in every prompt record; "
                                 f"rows {missing[:5]} have none")
            return torch.tensor([float(m["easiness"]) for m in metas], dtype=torch.float64)
        from ctrlgen.lightning_modules.shortcoti.length import easiness

        current = easiness(quality, G, cfg.ranges, active)[::G]
        keys = [int(i) for i in index.tolist()] if index is not None else list(range(current.numel()))
        values = []
        for k, e in zip(keys, current):
            prev = self._easiness.get(k)
            new = ema_easiness(None if prev is None else torch.tensor(prev), e, cfg.momentum)
            self._easiness[k] = float(new)
            values.append(float(new))
        return torch.tensor(values, dtype=torch.float64).repeat_interleave(G)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], metas: Sequence[dict], index: torch.Tensor | None = None) -> GroupRollout:
        """G rollouts per prompt, rewards, length stage and advantages (module docstring), without gradient."""
        G = self.G
        prompts_g, metas_g = repeat_for_groups(list(prompts), G), repeat_for_groups(list(metas), G)
        cot, image, stage = self._cot_and_image(prompts_g, metas_g, self.cot_cfg, G, index)
        quality = stage["quality"]
        total = weighted_sum(quality, self.reward_weights) + stage["reward"]
        adv = group_advantages(total, G, self.adv_scale, self.adv_eps)
        ref = old = None
        if self.ref is not None:
            with self.reference():
                ref = self._score(cot, image)[0]
        if self.loss_cfg.num_iterations > 1:
            old = self._score(cot, image)[0]
        m = {**group_stats(total, G), "reward_length": stage["reward"].mean(),
             "reward_quality": weighted_sum(quality, self.reward_weights).mean(),
             **{f"reward/{k}": v.mean() for k, v in quality.items()},
             **_quantiles(stage["words"], "cot_words"), **_quantiles(stage["tokens"], "cot_tokens"),
             "cot_empty_frac": (stage["words"] == 0).to(torch.float64).mean(),
             "cot_capped_frac": stage["capped"].to(torch.float64).mean()}
        if "weight" in stage:
            m["length_weight"] = stage["weight"].mean()
            m["easiness"] = stage["easiness"].mean()
        return GroupRollout(cot, image, adv.to(self.device), ref, old, m)

    def grpo_loss(self, roll: GroupRollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GRPO loss of a rollout under the current weights (with gradient)."""
        logp, mask = self._score(roll.cot, roll.image)
        return grpo_loss(logp, mask, roll.advantages.to(logp.dtype), self.loss_cfg, roll.old, roll.ref)

    # ---------------------------------------------------------------------------------------------------- steps
    def train_iteration(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        roll = self.rollout(batch["prompt"], batch["meta"], batch.get("index"))
        stats: dict[str, torch.Tensor] = {}
        loss = None
        for _ in range(self.loss_cfg.num_iterations):
            def closure():
                value, st = self.grpo_loss(roll)
                stats.update(st)
                return value
            loss = self.update("policy", closure)
        n = len(batch["prompt"]) * self.G
        for k, v in {**roll.metrics, **stats}.items():
            self.log(f"train/{k}", float(v), on_step=True, on_epoch=False, batch_size=n,
                     prog_bar=k in ("reward", "cot_words"))
        return loss

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str], metas: Sequence[dict], G: int | None = None) -> dict[str, Any]:
        """``G`` (default ``eval_G``) rollouts per prompt with the eval CoT budget: per-row quality rewards
        (``quality`` {name: (N·G,)}, ``reward`` weighted sum), ``words``/``tokens`` of the CoTs that entered the image
        prompts, ``texts``; rows grouped contiguously per prompt."""
        G = G or self.eval_G
        prompts_g, metas_g = repeat_for_groups(list(prompts), G), repeat_for_groups(list(metas), G)
        saved, self.length_cfg = self.length_cfg, (self.length_cfg if self.length_cfg.mode == "cap"
                                                   else dataclasses.replace(self.length_cfg, mode="none"))
        try:
            cot, _, stage = self._cot_and_image(prompts_g, metas_g, self.eval_cot_cfg, G)
        finally:
            self.length_cfg = saved
        return {"quality": stage["quality"], "reward": weighted_sum(stage["quality"], self.reward_weights),
                "words": stage["words"], "tokens": stage["tokens"], "texts": cot.texts}

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        out = self.evaluate(batch["prompt"], batch["meta"])
        valid = torch.as_tensor(batch.get("valid", [True] * len(batch["prompt"])), dtype=torch.bool).cpu()
        keep = valid.repeat_interleave(self.eval_G)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return x[keep].to(torch.float32).mean().to(self.device)

        metrics = {"loss": -mean(out["reward"]), "reward": mean(out["reward"]), "cot_words": mean(out["words"]),
                   "cot_tokens": mean(out["tokens"])}
        metrics.update({f"reward/{k}": mean(v) for k, v in out["quality"].items()})
        return metrics

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._easiness:
            checkpoint["shortcoti_easiness"] = dict(self._easiness)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._easiness = {int(k): float(v) for k, v in checkpoint.get("shortcoti_easiness", {}).items()}
