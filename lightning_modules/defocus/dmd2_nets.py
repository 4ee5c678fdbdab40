"""DMD2 networks (plain ``nn.Module``s and one functional UNet pass; spec shared/specs/defocus.md §8).

- :class:`GANHead`: the classifier on the **fake** score UNet's mid-block output ([ref-code] main/sd_guidance.py:
  SDXL 1280 ch at 32² → 3 × [Conv k4 s2 p1, GroupNorm(32), SiLU] to 4², [Conv k4 s4 → 1², GN, SiLU], 1×1 conv → one
  logit; SD1.5 8² → one stride-2 block). The number of stride-2 blocks is ``log2(mid_resolution / 4)``, so tiny UNets
  (mid 4² or 8²) get the same layout. Random init.
- :func:`unet_mid_features`: diffusers ``UNet2DConditionModel.forward`` up to and including the mid block (the
  reference's patched ``classify_forward``): the up blocks are not run.
- :func:`unet_eps`: the UNet's ε prediction for a conditioning dict ``{"encoder_hidden_states", "added_cond_kwargs"}``.
- Prompt encoders (frozen; ``encode(prompts) -> {"encoder_hidden_states", "text_embeds" or None}``):
  :class:`CLIPPromptEncoder` reads a local diffusers pipeline directory (SD1.5: ``tokenizer/`` + ``text_encoder/``,
  last hidden state; SDXL: also ``tokenizer_2/`` + ``text_encoder_2/``, penultimate hidden states of both concatenated,
  pooled ``text_embeds`` of the second) — nothing is downloaded; :class:`HashPromptEncoder` is a [design] stand-in
  for CPU tests and demos: words → sha256 ids → a fixed random embedding table (deterministic, no files).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
from torch import nn


class GANHead(nn.Module):
    """Mid-block features (B, C, r, r) → logits (B,) (module docstring)."""

    def __init__(self, in_channels: int = 1280, mid_resolution: int = 32, groups: int = 32):
        super().__init__()
        if mid_resolution < 4 or 2 ** round(math.log2(mid_resolution)) != mid_resolution:
            raise ValueError(f"GANHead: mid_resolution must be a power of two >= 4, got {mid_resolution}")
        g = math.gcd(groups, in_channels)
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(mid_resolution // 4))):
            layers += [nn.Conv2d(in_channels, in_channels, 4, 2, 1), nn.GroupNorm(g, in_channels), nn.SiLU()]
        layers += [nn.Conv2d(in_channels, in_channels, 4, 4, 0), nn.GroupNorm(g, in_channels), nn.SiLU(),
                   nn.Conv2d(in_channels, 1, 1, 1, 0)]
        self.net = nn.Sequential(*layers)
        self.mid_resolution = mid_resolution

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.mid_resolution:
            raise ValueError(f"GANHead built for {self.mid_resolution}² mid-block features, "
                             f"got {tuple(features.shape)}")
        return self.net(features).flatten(1).mean(1)


def mid_resolution_of(unet: nn.Module, latent_size: int) -> int:
    """The mid block's spatial size for a latent of ``latent_size``: one halving per down block but the last."""
    return latent_size // 2 ** (len(unet.config.down_block_types) - 1)


def unet_eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """ε prediction of ``unet`` (cast to its dtype, returned as float32)."""
    dtype = unet.dtype
    added = cond.get("added_cond_kwargs")
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    out = unet(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
               added_cond_kwargs=added, return_dict=False)[0]
    return out.float()


def unet_mid_features(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """Mid-block output of a diffusers ``UNet2DConditionModel`` (its forward without the up blocks)."""
    dtype = unet.dtype
    sample = x.to(dtype)
    ehs = cond["encoder_hidden_states"].to(dtype)
    added = cond.get("added_cond_kwargs")
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    t_emb = unet.get_time_embed(sample=sample, timestep=t)
    emb = unet.time_embedding(t_emb, None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
    sample = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
        else:
            sample, _ = block(hidden_states=sample, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(sample, emb, encoder_hidden_states=ehs)
    return unet.mid_block(sample, emb)


# ------------------------------------------------------------------------------------------------- prompt encoders
class HashPromptEncoder(nn.Module):
    """[design] CPU stand-in text encoder: lower-cased words → ``sha256(word) mod vocab`` → a fixed random
    embedding + position embedding (seeded), padded/truncated to ``length`` tokens; pooled = mean over the words."""

    def __init__(self, dim: int = 32, length: int = 8, vocab_size: int = 4096, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tokens = nn.Parameter(torch.randn(vocab_size, dim, generator=gen) / math.sqrt(dim), requires_grad=False)
        self.positions = nn.Parameter(torch.randn(length, dim, generator=gen) * 0.1, requires_grad=False)
        self.length, self.vocab_size = length, vocab_size

    def ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split()[: self.length]
        return [int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "big") % self.vocab_size for w in words]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        dev = self.tokens.device
        out = self.positions.expand(len(prompts), -1, -1).clone()
        mask = torch.zeros(len(prompts), self.length, 1, device=dev)
        for i, p in enumerate(prompts):
            ids = self.ids(p)
            if ids:
                out[i, : len(ids)] += self.tokens[torch.tensor(ids, device=dev)]
                mask[i, : len(ids)] = 1
        pooled = (out * mask).sum(1) / mask.sum(1).clamp_min(1)
        return {"encoder_hidden_states": out, "text_embeds": pooled}


class CLIPPromptEncoder(nn.Module):
    """Frozen CLIP text encoder(s) of a local SD1.5 (``sdxl=False``) or SDXL (``sdxl=True``) pipeline directory."""

    def __init__(self, path: str | os.PathLike, sdxl: bool = False):
        super().__init__()
        from ctrlgen.lightning_modules.common.pretrained import load_frozen

        key = "model.init_args.pretrained"
        self.sdxl = bool(sdxl)
        self.tokenizer = load_frozen("transformers.AutoTokenizer", path, subfolder="tokenizer", what="tokenizer")
        self.text_encoder = load_frozen("transformers.CLIPTextModel", path, subfolder="text_encoder",
                                        what="CLIP text encoder", config_key=key)
        if self.sdxl:
            self.tokenizer_2 = load_frozen("transformers.AutoTokenizer", path, subfolder="tokenizer_2",
                                           what="second tokenizer (SDXL)")
            self.text_encoder_2 = load_frozen("transformers.CLIPTextModelWithProjection", path,
                                              subfolder="text_encoder_2", what="second CLIP text encoder (SDXL)",
                                              config_key=key)

    def _ids(self, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        toks = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
        return toks.input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor | None]:
        if not self.sdxl:
            out = self.text_encoder(self._ids(self.tokenizer, prompts))
            return {"encoder_hidden_states": out.last_hidden_state.float(), "text_embeds": None}
        o1 = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
        o2 = self.text_encoder_2(self._ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden.float(), "text_embeds": o2.text_embeds.float()}
