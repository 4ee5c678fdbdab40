"""The ShortCoTI policy: transformers' ``JanusForConditionalGeneration`` plus its tokenizer (spec §3.1, §4).

Two ways to get one, both offline:

- :meth:`JanusPolicy.tiny` builds a small random Janus from a :class:`TinyJanusSpec` with a word-level tokenizer made
  by the ``tokenizers`` library (:func:`build_world_tokenizer`: the synthetic world's words plus Janus' special
  tokens). :meth:`JanusPolicy.save_pretrained` writes model and tokenizer into one directory.
- :meth:`JanusPolicy.from_pretrained` loads a local directory (a real Janus-Pro-1B/7B saved in transformers' format,
  or a tiny policy saved earlier) with ``local_files_only=True``; a missing directory fails naming it.

Only the language model trains (``model.model.language_model`` and ``lm_head``, tied to the input embeddings by
default); the vision encoder and its aligner, the VQ model and the generation embeddings/aligner/head are frozen
(:data:`FROZEN_PREFIXES`, frozen by :func:`freeze_module`, the one place that freezes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from ctrlgen.lightning_modules.common.local_files import require_pretrained_dir
from torch import nn

SPECIAL_TOKENS = {
    "pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "boi": "<begin_of_image>",
    "eoi": "<end_of_image>", "image": "<image_placeholder>", "user": "<|User|>", "assistant": "<|Assistant|>",
}
BOI_TOKEN = SPECIAL_TOKENS["boi"]  # Janus' begin-of-image tag, the same string in Janus-Pro's tokenizer

# The synthetic GenEval-style world (objects, colours, counts, positions), the reasoning template and CoT words.
WORLD_WORDS = (
    "a", "an", "the", "one", "two", "three", "four", "five", "six", "seven", "eight", "zero", "no", "some", "many",
    "several", "of", "and", "with", "in", "on", "at", "to", "is", "are", "red", "green", "blue", "yellow", "purple",
    "orange", "black", "white", "pink", "brown", "gray", "cyan", "cube", "cubes", "sphere", "spheres", "ball",
    "balls", "square", "squares", "circle", "circles", "triangle", "triangles", "star", "stars", "disk", "disks",
    "ring", "rings", "cross", "crosses", "heart", "hearts", "box", "boxes", "cone", "cones", "object", "objects",
    "shape", "shapes", "left", "right", "above", "below", "top", "bottom", "under", "over", "behind", "front",
    "next", "near", "beside", "middle", "center", "centre", "side", "small", "large", "big", "tiny", "bright",
    "dark", "plain", "background", "image", "picture", "scene", "canvas", "color", "colour", "colors", "placed",
    "you", "helpful", "assistant", "that", "receives", "prompt", "generate", "visualization", "give", "brief",
    "precise", "describe", "be", "concise", "words", "or", "less", "rules", "follow", "keep", "it", "count",
    "position", "only", "each", "exactly", "there", "sits", "lies", "stands", "this", "shows", "draw", "draws",
    "drawn", "drawing", "see", "visible", "clearly", "against", "simple", "flat", "smooth", "edges", "edge",
    "shaped", "first", "second", "then", "also", "while", "which", "where", "its", "their", "has", "have", "very",
    "quite", "nicely",
)
PUNCTUATION = (".", ",", ":", ";", "!", "?", "(", ")", "'", '"', "-")


def build_world_tokenizer(words: tuple[str, ...] = WORLD_WORDS, extra_words: tuple[str, ...] = ()):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, split on whitespace and punctuation) over ``words``,
    ``extra_words`` and punctuation, ids 0… for :data:`SPECIAL_TOKENS` first (pad 0, bos 1, eos 2, unk 3); left
    padding. Decoding joins words with spaces. Saved/loaded with ``save_pretrained``/``from_pretrained``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials, *PUNCTUATION, *words, *extra_words]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=SPECIAL_TOKENS["pad"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"], padding_side="left",
        additional_special_tokens=[SPECIAL_TOKENS[k] for k in ("boi", "eoi", "image", "user", "assistant")],
    )
    return tok


@dataclass
class TinyJanusSpec:
    """A small random Janus (spec §4's tiny config). ``vocab_size`` 0 → the tokenizer's size rounded up to 64;
    ``num_image_tokens`` = (image_size / patch_size)² (Janus decodes exactly that many); VQ channels are multiples
    of 32. ``init_std``: weight init std of every module (HF's default 0.02 leaves tiny distributions nearly flat)."""

    vocab_size: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    image_size: int = 32
    patch_size: int = 8
    codebook_size: int = 64
    code_dim: int = 8
    vq_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 2)
    init_std: float = 0.02
    attn_implementation: str = "sdpa"

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_config(self, tokenizer):
        """The ``JanusConfig`` with the tokenizer's special ids (image placeholder = ``<image_placeholder>``)."""
        from transformers import JanusConfig

        if self.image_size % self.patch_size:
            raise ValueError(f"tiny Janus: image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size} (Janus decodes exactly (image_size/patch_size)^2 tokens)")
        if self.vq_channels % 32:
            raise ValueError(f"tiny Janus: vq_channels must be a multiple of 32 (GroupNorm of 32 groups), got "
                             f"{self.vq_channels}")
        vocab = self.vocab_size or -(-len(tokenizer) // 64) * 64
        if vocab < len(tokenizer):
            raise ValueError(f"tiny Janus: vocab_size {vocab} < tokenizer size {len(tokenizer)}; raise vocab_size or "
                             "set it to 0 (the tokenizer's size rounded up)")
        text = {"vocab_size": vocab, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "max_position_embeddings": self.max_position_embeddings,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, "initializer_range": self.init_std}
        vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                  "image_size": self.image_size, "patch_size": self.patch_size,
                  "num_image_tokens": self.num_image_tokens, "projection_dim": self.hidden_size, "depth": 1,
                  "mlp_ratio": 2}
        vq = {"num_embeddings": self.codebook_size, "embed_dim": self.code_dim, "base_channels": self.vq_channels,
              "latent_channels": self.vq_channels, "channel_multiplier": list(self.channel_multiplier),
              "num_res_blocks": 1, "projection_dim": self.hidden_size, "image_token_embed_dim": self.hidden_size,
              "num_hidden_layers": 1}
        cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                          image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]))
        cfg._attn_implementation = self.attn_implementation
        return cfg


# Parameter-name prefixes (of JanusForConditionalGeneration) that never train: vision encoder and aligner, VQ model,
# generation embeddings/aligner/head. Everything else (model.language_model, lm_head) is the trainable policy.
FROZEN_PREFIXES = ("model.vision_model.", "model.aligner.", "model.vqmodel.", "model.generation_embeddings.",
                   "model.generation_aligner.", "model.generation_head.")
TRAINABLE_PREFIXES = ("model.language_model.", "lm_head.")


def freeze_module(module: nn.Module) -> nn.Module:
    """The one freezing step of the policy's fixed parts (eval mode, ``requires_grad=False``); switch to the shared
    frozen-component mechanism here."""
    return module.eval().requires_grad_(False)


class JanusPolicy(nn.Module):
    """A Janus model, its tokenizer and the special ids the rollout needs (``bos``/``eos``/``pad``/``boi`` ids,
    ``num_image_tokens``); frozen parts are frozen on construction."""

    def __init__(self, model, tokenizer, boi_token_id: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.bos_token_id = _first_id(tokenizer.bos_token_id, model.config.text_config.bos_token_id, "bos")
        self.eos_token_id = _first_id(tokenizer.eos_token_id, model.config.text_config.eos_token_id, "eos")
        self.pad_token_id = _first_id(tokenizer.pad_token_id, model.config.text_config.pad_token_id, "pad")
        gen_kwargs = getattr(model.generation_config, "generation_kwargs", None) or {}
        boi = boi_token_id if boi_token_id is not None else gen_kwargs.get("boi_token_id")
        if boi is None:
            boi = tokenizer.convert_tokens_to_ids(BOI_TOKEN)
            if boi is None or boi == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {BOI_TOKEN!r} token and generation_config.generation_kwargs "
                                 "has no boi_token_id; pass boi_token_id=")
        self.boi_token_id = int(boi)
        self.num_image_tokens = int(model.config.vision_config.num_image_tokens)
        self.freeze_fixed_parts()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, spec: TinyJanusSpec | None = None, tokenizer=None, seed: int = 0) -> JanusPolicy:
        """A random tiny Janus built from ``spec`` (default :class:`TinyJanusSpec`) with the world tokenizer."""
        from transformers import JanusForConditionalGeneration

        spec = spec or TinyJanusSpec()
        tokenizer = tokenizer or build_world_tokenizer()
        config = spec.to_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = JanusForConditionalGeneration(config)
        return cls(model, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None) -> JanusPolicy:
        """Model and tokenizer from one local ``save_pretrained`` directory (``local_files_only=True``)."""
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        where = require_pretrained_dir(path, "Janus policy", "deepseek-community/Janus-Pro-1B (or -7B) in "
                                       "transformers' format with its tokenizer")
        if not (where / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"Janus policy directory {str(where)!r} has no tokenizer_config.json: save the "
                                    "tokenizer there too (tokenizer.save_pretrained(dir))")
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = JanusForConditionalGeneration.from_pretrained(str(where), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        tokenizer.padding_side = "left"
        return cls(model, tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Model and tokenizer into ``path`` (loadable by :meth:`from_pretrained`)."""
        out = Path(path)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out

    # ---------------------------------------------------------------------------------------- trainable parts
    def freeze_fixed_parts(self) -> None:
        """Freeze every module under :data:`FROZEN_PREFIXES`; check that every parameter is either trainable
        (:data:`TRAINABLE_PREFIXES`) or frozen, so a renamed transformers module cannot slip through."""
        inner = self.model.model
        for name in ("vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner",
                     "generation_head"):
            freeze_module(getattr(inner, name))
        known = FROZEN_PREFIXES + TRAINABLE_PREFIXES
        unknown = [n for n, _ in self.model.named_parameters() if not n.startswith(known)]
        if unknown:
            raise RuntimeError(f"Janus parameters outside the known trainable/frozen parts: {unknown[:5]}; update "
                               "FROZEN_PREFIXES/TRAINABLE_PREFIXES in shortcoti/policy.py")

    def train(self, mode: bool = True) -> JanusPolicy:
        """Train mode for the language model only; frozen parts stay in eval mode."""
        super().train(mode)
        if mode:
            inner = self.model.model
            for name in ("vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner",
                         "generation_head"):
                getattr(inner, name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (the language model and lm_head), each once."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Copies of every frozen parameter and buffer, by name (for bitwise checks)."""
        state = self.model.state_dict()
        return {k: v.detach().clone() for k, v in state.items() if k.startswith(FROZEN_PREFIXES)}

    # ------------------------------------------------------------------------------------------ sub-modules
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def generation_head(self) -> nn.Module:
        return self.model.model.generation_head

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token embeddings (B, T) → (B, T, D)."""
        return self.model.get_input_embeddings()(ids)

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image-token embeddings as Janus feeds them back: generation embeddings → generation aligner."""
        return self.model.prepare_embeddings_for_image_generation(tokens)

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N) → uint8 images (B, H, W, 3) through the VQ decoder."""
        pixels = self.model.decode_image_tokens(tokens)
        return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def decode_text(self, ids: list[int]) -> str:
        """Token ids → text without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _first_id(a: int | None, b: int | None, what: str) -> int:
    if a is not None:
        return int(a)
    if b is not None:
        return int(b)
    raise ValueError(f"neither the tokenizer nor text_config defines a {what} token id; set {what}_token_id")
