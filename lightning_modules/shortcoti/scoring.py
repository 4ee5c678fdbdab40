"""Teacher-forced per-token log-probs of a two-level rollout, for the GRPO loss (spec §2.3, §3.1, §4).

Two batched forwards, with gradient when called under grad:

- :func:`score_cot`: the policy over [CoT prompt; CoT tokens] (left-padded prompt, positions from the mask as in
  generation), ``lm_head`` on the positions that predict the CoT tokens, then the CoT's sampling warpers
  (temperature, top-k, top-p) and log-softmax at the sampled ids.
- :func:`score_image`: the language model over [image prompt + BOI; image-token embeddings] with ``image_logp``
  ``"guided"`` (default): [cond; uncond] rows as the sampler built them, ``generation_head`` on hidden states
  P − 1 … P + N − 2, CFG mix, the image warpers, log-softmax at the tokens — the distribution the policy sampled
  from; ``"cond"`` (T2I-R1): the cond rows only, log-softmax(cond / temperature).

On the same rollout and weights these equal the log-probs the samplers recorded, up to float rounding.
"""

from __future__ import annotations

import torch
from ctrlgen.lightning_modules.shortcoti.grpo import token_logprobs
from ctrlgen.lightning_modules.shortcoti.rollout import (
    CotRollout,
    ImageRollout,
    ImageSamplingConfig,
    SamplingConfig,
    cfg_inputs,
    double_rows,
    mix_cfg,
    position_ids,
    split_rows,
    warp_logits,
)

IMAGE_LOGP = ("guided", "cond")


def score_cot(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cot_ids: torch.Tensor,
              sampling: SamplingConfig) -> torch.Tensor:
    """Per-token log-probs (B, C) of ``cot_ids`` after the left-padded prompt under the CoT's sampling distribution
    (float32; float64 for a float64 model). Tokens after the first EOS get values too: mask them with the rollout's
    mask."""
    C = cot_ids.shape[1]
    ids = torch.cat([prompt_ids, cot_ids], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(cot_ids)], dim=1)
    logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                          logits_to_keep=C + 1).logits[:, :-1]
    scores = logits
    if sampling.do_sample:
        scores = warp_logits(scores, sampling.temperature, sampling.top_k, sampling.top_p)
    return token_logprobs(scores, cot_ids)


def score_image(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                sampling: ImageSamplingConfig, image_logp: str = "guided") -> torch.Tensor:
    """Per-token log-probs (B, N) of image ``tokens`` after the image prompt (ending in BOI); float32 (float64 for a
    float64 model)."""
    if image_logp not in IMAGE_LOGP:
        raise ValueError(f"image_logp must be one of {IMAGE_LOGP}, got {image_logp!r}")
    if tokens.shape[1] != policy.num_image_tokens:
        raise ValueError(f"image rollouts have exactly {policy.num_image_tokens} tokens, got {tokens.shape[1]}")
    P = prompt_ids.shape[1]
    N, layout = tokens.shape[1], sampling.layout
    if image_logp == "guided":
        ids, mask = cfg_inputs(prompt_ids, prompt_mask, policy.bos_token_id, policy.boi_token_id,
                               policy.pad_token_id, layout)
        toks = double_rows(tokens, tokens, layout)
    else:
        ids, mask, toks = prompt_ids, prompt_mask, tokens
    embeds = torch.cat([policy.embed_text(ids), policy.embed_image(toks)], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], N)], dim=1)
    hidden = policy.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                   position_ids=position_ids(full_mask), use_cache=False).last_hidden_state
    logits = policy.generation_head(hidden[:, P - 1:P + N - 1])
    if image_logp == "cond":
        return token_logprobs(logits, tokens, sampling.temperature)
    cond, uncond = split_rows(logits, layout)
    scores = mix_cfg(cond, uncond, sampling.cfg)
    if sampling.do_sample:
        scores = warp_logits(scores, sampling.temperature, sampling.top_k, sampling.top_p)
    return token_logprobs(scores, tokens)


def score_rollout(policy, cot: CotRollout, image: ImageRollout, cot_sampling: SamplingConfig,
                  image_sampling: ImageSamplingConfig, image_logp: str = "guided") -> dict[str, torch.Tensor]:
    """Both segments of a two-level rollout: ``cot_logp`` (B, C) zeroed under the CoT mask's zeros, ``cot_mask``,
    ``image_logp`` (B, N), ``image_mask`` (B, N) ones — ready for ``grpo.t2i_r1_loss``."""
    cot_logp = score_cot(policy, cot.prompt_ids, cot.prompt_mask, cot.ids, cot_sampling)
    img_logp = score_image(policy, image.prompt_ids, image.prompt_mask, image.tokens, image_sampling, image_logp)
    mask = cot.mask.bool()
    return {"cot_logp": torch.where(mask, cot_logp, torch.zeros_like(cot_logp)), "cot_mask": mask,
            "image_logp": img_logp, "image_mask": torch.ones_like(image.tokens, dtype=torch.bool)}
