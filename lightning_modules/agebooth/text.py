"""Prompt encoding for AgeBooth's UNets: SD 1.x/2.x (one CLIP encoder) and SDXL (two, plus pooled embeddings and
time ids), and the word-level tokenizer of the demo's tiny text encoder.

- :func:`word_tokenizer`: a transformers ``PreTrainedTokenizerFast`` over whole words (the ``faces`` world's caption
  vocabulary by default), with CLIP-like start/end/pad tokens; it saves and loads with ``save_pretrained`` /
  ``AutoTokenizer.from_pretrained`` like a real tokenizer.
- :class:`PromptEncoder`: ``encode(prompts) -> {"prompt_embeds", "pooled_prompt_embeds"?}``. SD: the last hidden
  state of the text encoder (B × L × D). SDXL (two encoders): the penultimate hidden states of both concatenated
  (B × 77 × 2048) and the second encoder's projected pooled output (B × 1280), as diffusers' SDXL pipeline does.
  :func:`sdxl_time_ids` builds the ``add_time_ids`` (original size, crop offset, target size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

SPECIAL = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")


def faces_vocabulary() -> list[str]:
    """Every word the ``faces`` world's captions use (identity tokens, age words, the template's words)."""
    from ctrlgen.lightning_modules.agebooth import world

    words = ["a", "portrait", "of", "person", ",", "in", "age", "at", "the", "white", "background", "."]
    words += list(world.IDENTITY_TOKENS) + [w for _, w in world.AGE_WORDS]
    return list(dict.fromkeys(words))


def word_tokenizer(words: Sequence[str] | None = None, max_length: int = 12):
    """A word-level fast tokenizer (whitespace + punctuation split, unknown words → ``<unk>``), padded to
    ``max_length`` with ``<pad>``, every text wrapped in start/end tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *(words if words is not None else faces_vocabulary())])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=max_length)


def sdxl_time_ids(resolution: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning (orig h, orig w, crop top, crop left, target h, target w) for square crops at
    ``resolution`` with no offset, as AgeBooth's training script passes (512, 512, 0, 0, 512, 512)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return ids.expand(batch, 6).clone()


class PromptEncoder(nn.Module):
    """Tokenizers + text encoders → the UNet's text conditioning. One encoder: SD; two: SDXL."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[nn.Module]):
        super().__init__()
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ValueError(f"PromptEncoder takes one (SD) or two (SDXL) tokenizer/encoder pairs, got "
                             f"{len(tokenizers)} tokenizers and {len(encoders)} encoders")
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList(encoders)

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    def _ids(self, tokenizer, prompts: list[str], device) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        device = next(self.encoders[0].parameters()).device
        if not self.sdxl:
            out = self.encoders[0](self._ids(self.tokenizers[0], prompts, device))
            return {"prompt_embeds": out[0]}
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            out = enc(self._ids(tok, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection) text_embeds
        return {"prompt_embeds": torch.cat(hidden, -1), "pooled_prompt_embeds": pooled}

    encode = forward
