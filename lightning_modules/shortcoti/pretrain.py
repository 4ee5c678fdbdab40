"""Supervised warm-start of a tiny Janus on the synthetic world (the demo's stage 1; spec §4: a generation head at
random init leaves tiny-model image rewards untrainable, so the policy first learns the world).

Each step draws prompts, a verbose CoT (:func:`~.world.make_cot`) and a rendered scene (:func:`~.world.render`) per
prompt and minimises the teacher-forced negative log-likelihood of both levels, with the rollout's own prompt
formats and scoring code: −mean log p(CoT + EOS | CoT prompt) (:func:`~.scoring.score_cot`) − mean log p(image
tokens | "{prompt}. {CoT}" + BOI) (:func:`~.scoring.score_image`, cond stream). A fraction ``uncond_prob`` of image
rows has its text replaced by pads (BOS and BOI kept: the uncond rows of CFG), so guidance has an unconditional
stream to push against. The generation embeddings/aligner/head train here (GRPO keeps them frozen); they are
frozen again on return.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
from ctrlgen.lightning_modules.shortcoti.policy import JanusPolicy
from ctrlgen.lightning_modules.shortcoti.rollout import (
    PromptTemplate,
    encode_left_padded,
)
from ctrlgen.lightning_modules.shortcoti.rollout_types import (
    ImageSamplingConfig,
    SamplingConfig,
)
from ctrlgen.lightning_modules.shortcoti.scoring import (
    completion_mask,
    score_cot,
    score_image,
)
from ctrlgen.lightning_modules.shortcoti.world import make_cot, render

GENERATION_PARTS = ("generation_embeddings", "generation_aligner", "generation_head")


def cot_targets(policy: JanusPolicy, cots: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CoT token ids + EOS, right-padded with pad → ids, mask (tokens up to and including the EOS)."""
    rows = [[*ids, policy.eos_token_id] for ids in policy.tokenizer(list(cots), add_special_tokens=False)["input_ids"]]
    C = max(len(r) for r in rows)
    ids = torch.full((len(rows), C), policy.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, completion_mask(ids, policy.eos_token_id)


def world_nll(policy: JanusPolicy, prompts: Sequence[str], cots: Sequence[str], scenes: Sequence[Sequence[int]],
              template: PromptTemplate, uncond_prob: float = 0.1,
              generator: random.Random | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The two-level NLL of one batch (module docstring) and its parts."""
    rng = generator or random.Random(0)
    cot_ids, cot_mask = cot_targets(policy, cots)
    p_ids, p_mask = encode_left_padded(policy.tokenizer, [template.cot_text(p) for p in prompts], policy.bos_token_id,
                                       policy.pad_token_id)
    cot_logp = score_cot(policy, p_ids, p_mask, cot_ids, SamplingConfig(do_sample=False))
    cot_nll = -(cot_logp * cot_mask).sum() / cot_mask.sum()
    i_ids, i_mask = encode_left_padded(policy.tokenizer, [template.image_text(p, c) for p, c in zip(prompts, cots)],
                                       policy.bos_token_id, policy.pad_token_id, append_id=policy.boi_token_id)
    drop = torch.tensor([rng.random() < uncond_prob for _ in prompts]).unsqueeze(1)
    keep = (i_ids == policy.bos_token_id) | (i_ids == policy.boi_token_id)
    i_ids = torch.where(drop & ~keep, torch.full_like(i_ids, policy.pad_token_id), i_ids)
    tokens = torch.tensor([list(s) for s in scenes], dtype=torch.long)
    img_nll = -score_image(policy, i_ids, i_mask, tokens, ImageSamplingConfig(do_sample=False), "cond").mean()
    return cot_nll + img_nll, {"cot_nll": float(cot_nll.detach()), "image_nll": float(img_nll.detach())}


def pretrain_on_world(policy: JanusPolicy, prompts: Sequence[str], steps: int = 600, batch_size: int = 32,
                      lr: float = 3e-3, seed: int = 0, max_filler: int = 4, n_background: int = 4,
                      uncond_prob: float = 0.1, template: PromptTemplate | None = None,
                      log_every: int = 100) -> list[dict[str, float]]:
    """Fit ``policy`` in place on (prompt, verbose CoT, scene) triples from ``prompts``; returns the logged history.
    AdamW with a cosine decay to 0; the generation modules train too and are frozen again at the end."""
    template = template or PromptTemplate()
    inner = policy.model.model
    for name in GENERATION_PARTS:
        getattr(inner, name).requires_grad_(True)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = random.Random(seed)
    n_tokens = policy.num_image_tokens
    history: list[dict[str, float]] = []
    policy.train()
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            batch = [rng.choice(prompts) for _ in range(batch_size)]
            cots = [make_cot(p, rng, max_filler) for p in batch]
            scenes = [render(p, rng, n_tokens, n_background) for p in batch]
            loss, parts = world_nll(policy, batch, cots, scenes, template, uncond_prob, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % log_every == 0 or step == steps - 1:
                history.append({"step": step, "loss": float(loss.detach()), **parts, "s": time.perf_counter() - t0})
    finally:
        policy.freeze_fixed_parts()
        policy.eval()
    return history
