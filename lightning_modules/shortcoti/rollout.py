"""Two-level rollout of the Janus policy (spec §2.1, §2.2, §4): CoT text, then image tokens with CFG.

Level 1, :func:`rollout_cot`: the reasoning template in Janus' chat format, left-padded, through HF ``generate`` in
text mode with **every sampling parameter explicit** (:class:`SamplingConfig`: transformers applies top-k 50 by default
unless ``top_k=0``). Returns the CoT ids, the completion mask (tokens up to and including the first EOS) and the
per-token log-probs of the distribution HF sampled from (its processed ``scores``).

Level 2, :func:`rollout_image`: the image prompt ``"{prompt}. {CoT}"`` in the chat format with BOI appended, left
padded, through this module's own KV-cache loop :func:`sample_image_tokens`: every step runs the language model on
[cond; uncond] rows (:func:`cfg_inputs`; uncond = every token but BOS and BOI replaced by pad, as transformers'
Janus does), ``generation_head`` on the last hidden state, guided = uncond + s·(cond − uncond), then temperature
/ top-k / top-p (transformers' own warpers, in HF's order) and a draw; the drawn token is fed back to both rows
through the generation embeddings and aligner. It records the log-prob of each drawn token under that guided,
warped distribution (and under the cond stream at the temperature, ``cond_logp``), always runs exactly
``num_image_tokens`` steps, and the tokens are decoded to images by the VQ model.

Position ids are the attention mask's cumulative sum (pads excluded), the same in the cached loop and in the
teacher-forced scoring of :mod:`ctrlgen.lightning_modules.shortcoti.scoring`, so the two agree to float rounding.
Draws use torch's global RNG unless a ``generator`` is given (HF ``generate`` always uses the global RNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ctrlgen.lightning_modules.shortcoti.grpo import token_logprobs
from ctrlgen.lightning_modules.shortcoti.rollout_types import (  # noqa: F401 - re-exported with the rollouts
    CotRollout,
    ImageRollout,
    ImageSamplingConfig,
    SamplingConfig,
)
from ctrlgen.lightning_modules.shortcoti.scoring import (
    cfg_inputs,
    completion_mask,
    double_rows,
    mix_cfg,
    position_ids,
    split_rows,
    warp_logits,
)

REASONING_TEMPLATE = ("Describe a brief , precise visualization of this image prompt : {prompt} . Say what each "
                      "object looks like , its colour , count and position . Be concise ( 50 words or less ) .")
COT_SYSTEM = "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt ."


@dataclass
class PromptTemplate:
    """Janus' chat format ``"{system}\\n\\n<|User|>: {text}\\n\\n<|Assistant|>:"`` (no system part when empty) for the
    CoT prompt (``reasoning`` with ``{prompt}``, system ``cot_system``) and the image prompt (``"{prompt}. {CoT}"``,
    the prompt alone for an empty CoT; system ``image_system``; BOI appended as a token id)."""

    reasoning: str = REASONING_TEMPLATE
    cot_system: str = COT_SYSTEM
    image_system: str = ""
    user_tag: str = "<|User|>"
    assistant_tag: str = "<|Assistant|>"

    def chat(self, text: str, system: str) -> str:
        body = f"{self.user_tag}: {text}\n\n{self.assistant_tag}:"
        return f"{system}\n\n{body}" if system else body

    def cot_text(self, prompt: str) -> str:
        return self.chat(self.reasoning.format(prompt=prompt), self.cot_system)

    def image_text(self, prompt: str, cot: str) -> str:
        return self.chat(f"{prompt}. {cot}" if cot.strip() else prompt, self.image_system)


# --------------------------------------------------------------------------------------------- shared helpers
def encode_left_padded(tokenizer, texts: Sequence[str], bos_id: int, pad_id: int, append_id: int | None = None,
                       max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS, tokens…, append_id] per text, left-padded with ``pad_id`` → ids, mask (B, P) long. ``max_length``
    keeps BOS and the last tokens (the tail holds the instruction end and BOI)."""
    rows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        row = [bos_id, *ids] + ([append_id] if append_id is not None else [])
        if max_length is not None and len(row) > max_length:
            row = [bos_id, *row[len(row) - max_length + 1:]]
        rows.append(row)
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------------- CoT


@torch.no_grad()
def generate_cot(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig):
    """HF ``generate`` (text mode) with explicit sampling fields → ids, mask, logp (B, C), C ≤ max_new_tokens."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        max_length=prompt_ids.shape[1] + sampling.max_new_tokens, num_beams=1, repetition_penalty=1.0,
        bos_token_id=policy.bos_token_id, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
        return_dict_in_generate=True, output_scores=True,
    )
    out = policy.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen,
                                generation_mode="text")
    ids = out.sequences[:, prompt_ids.shape[1]:]
    scores = torch.stack(out.scores, dim=1)  # (B, C, V) after HF's processors: the sampled distribution
    mask = completion_mask(ids, policy.eos_token_id)
    logp = token_logprobs(scores, ids)
    return ids, mask, torch.where(mask, logp, torch.zeros_like(logp))


def rollout_cot(policy, prompts: Sequence[str], sampling: SamplingConfig, template: PromptTemplate | None = None,
                max_prompt_length: int | None = None) -> CotRollout:
    """Level 1 for each prompt (repeat prompts G times beforehand for groups)."""
    template = template or PromptTemplate()
    ids, mask = encode_left_padded(policy.tokenizer, [template.cot_text(p) for p in prompts], policy.bos_token_id,
                                   policy.pad_token_id, max_length=max_prompt_length)
    ids, mask = ids.to(policy.model.device), mask.to(policy.model.device)
    cot, cot_mask, logp = generate_cot(policy, ids, mask, sampling)
    texts = [policy.decode_text([t for t, m in zip(r.tolist(), k.tolist()) if m and t != policy.eos_token_id])
             for r, k in zip(cot, cot_mask)]
    return CotRollout(ids, mask, cot, cot_mask, logp, texts)


# ----------------------------------------------------------------------------------------------------- image


@torch.no_grad()
def sample_image_tokens(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: ImageSamplingConfig,
                        generator: torch.Generator | None = None, cache=None, return_logits: bool = False,
                        forced_tokens: torch.Tensor | None = None, decode_step=None) -> dict[str, torch.Tensor]:
    """The KV-cache CFG loop (module docstring): exactly ``policy.num_image_tokens`` steps. ``cache``: a fresh
    transformers cache for 2B rows (default ``DynamicCache``; a ``StaticCache`` of length ≥ P + N gets the full
    attention mask every step, a fixed shape). ``forced_tokens`` (B, N) feeds given tokens instead of drawing (to
    compare logits against another sampler). ``decode_step`` replaces :func:`lm_step` after the prefill (e.g. a
    ``torch.compile``d one over a static cache)."""
    from transformers import DynamicCache

    B, P = prompt_ids.shape
    N, layout = policy.num_image_tokens, sampling.layout
    ids2, mask2 = cfg_inputs(prompt_ids, prompt_mask, policy.bos_token_id, policy.boi_token_id,
                             policy.pad_token_id, layout)
    full_mask = torch.cat([mask2, mask2.new_ones(2 * B, N)], dim=1)
    embeds = policy.embed_text(ids2)
    pos = position_ids(mask2)
    cache = DynamicCache(config=policy.model.config.text_config) if cache is None else cache
    static = bool(getattr(cache, "is_compileable", False))
    device = prompt_ids.device
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    logp = torch.empty(B, N, dtype=torch.float64 if embeds.dtype == torch.float64 else torch.float32, device=device)
    cond_logp = torch.empty_like(logp)
    raw: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(N):
        step = lm_step if i == 0 or decode_step is None else decode_step
        logits = step(policy, embeds, full_mask if static else full_mask[:, :P + i], pos, cache)
        cond, uncond = split_rows(logits, layout)
        scores = warp_logits(mix_cfg(cond, uncond, sampling.cfg), sampling.temperature, sampling.top_k,
                             sampling.top_p)
        if forced_tokens is not None:
            tok = forced_tokens[:, i]
        elif sampling.do_sample:
            tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(-1)
        else:
            tok = torch.argmax(scores, dim=-1)
        tokens[:, i] = tok
        logp[:, i] = token_logprobs(scores, tok)
        cond_logp[:, i] = token_logprobs(cond, tok, sampling.temperature)
        if return_logits:
            raw.append((cond, uncond))
        embeds = policy.embed_image(double_rows(tok, tok, layout).unsqueeze(-1))
        pos = pos[:, -1:] + 1
    out = {"tokens": tokens, "logp": logp, "cond_logp": cond_logp}
    if return_logits:
        out["cond_logits"] = torch.stack([c for c, _ in raw], dim=1)
        out["uncond_logits"] = torch.stack([u for _, u in raw], dim=1)
    return out


def lm_step(policy, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One cached language-model step on (2B, T, D) embeddings → generation-head logits of the last position."""
    hidden = policy.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache,
                                   use_cache=True).last_hidden_state[:, -1]
    return policy.generation_head(hidden)


@torch.no_grad()
def hf_image_generate(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: ImageSamplingConfig,
                      logits_processor=None) -> torch.Tensor:
    """transformers' own image-mode ``generate`` with the same explicit sampling fields (the cross-check and the
    benchmark baseline): [cond; uncond] halves, static cache, no per-step log-probs. A ``LogitsProcessor`` in
    ``logits_processor`` sees the raw [cond; uncond] logits before CFG. Returns tokens (B, N)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if sampling.layout != "halves":
        raise ValueError("HF image-mode generate only has the 'halves' layout")
    gen = GenerationConfig(
        do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        guidance_scale=sampling.cfg, num_beams=1, bos_token_id=policy.bos_token_id,
        pad_token_id=policy.pad_token_id, eos_token_id=policy.eos_token_id,
        generation_kwargs={"boi_token_id": policy.boi_token_id},
    )
    return policy.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen,
                                 generation_mode="image", logits_processor=LogitsProcessorList(logits_processor or []))


def rollout_image(policy, prompts: Sequence[str], cots: Sequence[str], sampling: ImageSamplingConfig,
                  template: PromptTemplate | None = None, decode: bool = True, max_prompt_length: int | None = None,
                  generator: torch.Generator | None = None, return_logits: bool = False) -> ImageRollout:
    """Level 2: one image per (prompt, CoT) row from ``"{prompt}. {CoT}"``; decoded to uint8 when ``decode``."""
    if len(prompts) != len(cots):
        raise ValueError(f"rollout_image: {len(prompts)} prompts but {len(cots)} CoTs (one CoT per row)")
    template = template or PromptTemplate()
    texts = [template.image_text(p, c) for p, c in zip(prompts, cots)]
    ids, mask = encode_left_padded(policy.tokenizer, texts, policy.bos_token_id, policy.pad_token_id,
                                   append_id=policy.boi_token_id, max_length=max_prompt_length)
    ids, mask = ids.to(policy.model.device), mask.to(policy.model.device)
    out = sample_image_tokens(policy, ids, mask, sampling, generator=generator, return_logits=return_logits)
    images = policy.decode_images(out["tokens"]) if decode else None
    return ImageRollout(ids, mask, out["tokens"], out["logp"], out["cond_logp"], images,
                        out.get("cond_logits"), out.get("uncond_logits"))


def two_level_rollout(policy, prompts: Sequence[str], cot_sampling: SamplingConfig,
                      image_sampling: ImageSamplingConfig, template: PromptTemplate | None = None,
                      cot_texts=None, decode: bool = True) -> tuple[CotRollout, ImageRollout]:
    """CoT then image for each row. ``cot_texts`` (optional callable CotRollout → list[str]) picks the CoT text that
    enters each image prompt (CapLength's cut); default: the decoded CoTs."""
    cot = rollout_cot(policy, prompts, cot_sampling, template)
    texts = cot.texts if cot_texts is None else list(cot_texts(cot))
    return cot, rollout_image(policy, prompts, texts, image_sampling, template, decode)
