"""Teacher-forced per-token log-probs of a two-level rollout, for the GRPO loss (spec §2.3, §3.1, §4), and the
distribution maths the samplers of :mod:`ctrlgen.lightning_modules.shortcoti.rollout` share with it (positions from
the mask, [cond; uncond] rows, CFG mix, HF's warpers), so that sampling and scoring use one definition.

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
from ctrlgen.lightning_modules.shortcoti.rollout_types import (
    LAYOUTS,
    CotRollout,
    ImageRollout,
    ImageSamplingConfig,
    SamplingConfig,
)

IMAGE_LOGP = ("guided", "cond")


# ------------------------------------------------------------------ distribution maths shared with the samplers
def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (HF text mode's rule): cumsum(mask) − 1, pads at 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def completion_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Tokens up to and including the first EOS of each row: (B, C) → bool (B, C)."""
    is_eos = (ids == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's sampling warpers in HF's order (temperature, top-k, top-p) on (…, V) logits; off at 1.0 / 0 / 1.0."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = logits / temperature if temperature != 1.0 else logits
    if top_k or top_p < 1.0:
        flat = scores.reshape(-1, scores.shape[-1])
        if top_k:
            flat = TopKLogitsWarper(top_k)(None, flat)
        if top_p < 1.0:
            flat = TopPLogitsWarper(top_p)(None, flat)
        scores = flat.reshape(scores.shape)
    return scores


def cfg_inputs(ids: torch.Tensor, mask: torch.Tensor, bos_id: int, boi_id: int, pad_id: int,
               layout: str = "halves") -> tuple[torch.Tensor, torch.Tensor]:
    """[cond; uncond] rows (2B, P): uncond = ``ids`` with every token but BOS and BOI replaced by pad; the mask is
    shared (an uncond row attends its pads where the cond row attends its text)."""
    uncond = ids.masked_fill((ids != bos_id) & (ids != boi_id), pad_id)
    return double_rows(ids, uncond, layout), double_rows(mask, mask, layout)


def double_rows(cond: torch.Tensor, uncond: torch.Tensor, layout: str) -> torch.Tensor:
    """Join cond and uncond rows: ``halves`` [cond; uncond], ``interleaved`` cond₀, uncond₀, cond₁, …"""
    if layout == "halves":
        return torch.cat([cond, uncond], dim=0)
    if layout == "interleaved":
        return torch.stack([cond, uncond], dim=1).flatten(0, 1)
    raise ValueError(f"cfg layout must be one of {LAYOUTS}, got {layout!r}")


def split_rows(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`double_rows`: (2B, …) → cond (B, …), uncond (B, …)."""
    if layout == "halves":
        return x.chunk(2, dim=0)
    return x[0::2], x[1::2]


def mix_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale·(cond − uncond), in transformers' operation order."""
    return uncond + (cond - uncond) * scale


# --------------------------------------------------------------------------------------- teacher-forced scoring

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
