"""VAR transformer (FoundationVision/VAR ``models/var.py``/``basic_var.py``), spec §3.4–§3.8.

State-dict keys/shapes equal the spec's manifest (``tests/fixtures/var_d16_state_dict.tsv``) for depth 16.
Differences from the official code, by design: no global monkey-patching (Q1; every module initialised explicitly in
:meth:`VAR.init_weights`), class dropout only in training (Q2), the VQVAE is an argument of the sampler
rather than a hidden proxy, and an external *hook* can steer the forward (ECM adapters, §2.2).

The hook protocol (ECM adapters) is in :mod:`ctrlgen.lightning_modules.ecm.hooks`; the sampling loops (eager, static,
CUDA graph) are functions of (model, hook) in :mod:`ctrlgen.lightning_modules.ecm.samplers`: this class contributes the
per-scale step (:meth:`VAR.sampling_prologue`, :meth:`VAR.sample_scale`), and :meth:`VAR.autoregressive_infer_cfg` is
:func:`~ctrlgen.lightning_modules.ecm.samplers.sample_cfg` on it.

The layers (attention, FFN, AdaLN blocks, drop-path) live in :mod:`ctrlgen.lightning_modules.ecm.layers`.
Compilation: :func:`~ctrlgen.lightning_modules.ecm.fastpath.compile_blocks` compiles each block in place (regional
``torch.compile``); because :class:`~ctrlgen.lightning_modules.ecm.layers.DropPath` keeps its rate in a buffer, blocks with
different rates share one graph per shape.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .hooks import HookFn, VARHook
from .layers import AdaLNBeforeHead, AdaLNSelfAttn
from .samplers import SAMPLERS, sample_cfg
from .sampling import cfg_mix, cfg_ratio
from .scales import (
    DEFAULT_PATCH_NUMS,
    TINY_PATCH_NUMS,
    begin_ends,
    block_causal_bias,
    lvl_index,
)

VAR_PRESETS: dict[str, dict] = {
    "d16": {"depth": 16}, "d20": {"depth": 20}, "d24": {"depth": 24}, "d30": {"depth": 30},
    # CPU demo (pairs with VQVAE_PRESETS["tiny"]: Cvae 16, V 512, 64 px → 8×8).
    "tiny": {"depth": 4, "embed_dim": 256, "num_heads": 4, "vocab_size": 512, "cvae": 16, "num_classes": 10,
             "patch_nums": TINY_PATCH_NUMS},
    # `ctrlgen demo ecm` (pairs with VQVAE_PRESETS["demo32"]): ~1/4 of "tiny"'s width, ≈1.3M params, fits 2 CPU cores.
    "demo": {"depth": 4, "embed_dim": 128, "num_heads": 4, "vocab_size": 512, "cvae": 16, "num_classes": 10,
             "patch_nums": TINY_PATCH_NUMS},
}
__all__ = ["SAMPLERS", "VAR", "VAR_PRESETS", "HookFn", "VARHook", "build_var", "default_aln_gamma", "drop_labels"]


def default_aln_gamma(depth: int) -> float:
    """README: 1e-3 for d16/d20, 1e-4 for d24, 1e-5 for d30 (spec §3.5)."""
    return 1e-3 if depth <= 20 else (1e-4 if depth <= 24 else 1e-5)


def drop_labels(label_B: Tensor, rate: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability ``rate`` (class dropout, CFG training)."""
    if rate <= 0:
        return label_B
    kw = {} if generator is None else {"generator": generator}  # (no generator argument: traceable with dynamic shapes)
    u = torch.rand(label_B.shape, device=label_B.device, **kw)
    return torch.where(u < rate, torch.full_like(label_B, null_class), label_B)


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer (spec §3.4)."""

    def __init__(self, depth: int = 16, embed_dim: int | None = None, num_heads: int | None = None,
                 vocab_size: int = 4096, cvae: int = 32, num_classes: int = 1000,
                 patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS, mlp_ratio: float = 4.0,
                 drop_path_rate: float | None = None, cond_drop_rate: float = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, norm_eps: float = 1e-6, init_std: float = -1.0,
                 aln_gamma: float | None = None, init_adaln: float = 0.5, init_head: float = 0.02) -> None:
        super().__init__()
        C = embed_dim if embed_dim is not None else 64 * depth
        self.depth, self.C, self.D = depth, C, C
        self.num_heads = num_heads if num_heads is not None else depth
        self.V, self.Cvae, self.num_classes = vocab_size, cvae, num_classes
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.begin_ends = begin_ends(self.patch_nums)
        self.L, self.first_l = self.begin_ends[-1][1], self.patch_nums[0] ** 2
        self.drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.init_cfg = {"init_std": init_std, "aln_gamma": default_aln_gamma(depth) if aln_gamma is None else aln_gamma,
                             "init_adaln": init_adaln, "init_head": init_head}

        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        dpr = [self.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 → rate
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, self.num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_eps)
            for i in range(depth)])
        self.register_buffer("lvl_1L", lvl_index(self.patch_nums).view(1, self.L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums))
        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        # activation checkpointing of the blocks (not a state): each block keeps only its input for the backward and
        # recomputes its forward there (≈ 1/3 more compute; drop-path masks are replayed from the saved RNG state)
        self.grad_checkpointing = False
        self.init_weights(**self.init_cfg)

    # ------------------------------------------------------------------ init / buffers
    @torch.no_grad()
    def init_weights(self, init_std: float = -1.0, aln_gamma: float = 1e-3, init_adaln: float = 0.5,
                     init_head: float = 0.02) -> None:
        """Spec §3.5: trunc-normal(init_std = √(1/3C) if < 0) for Linear/Embedding/pos, zero biases; head ×
        init_head; head AdaLN ×init_adaln; per block proj/fc2 ÷ √(2·depth), ada_lin rows [2C:] ×init_adaln,
        rows [:2C] (γ) ×aln_gamma, zero bias. Also restores scale_mul = ln 4, q/v bias 0."""
        std = math.sqrt(1 / self.C / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        div = math.sqrt(2 * self.depth)
        for b in self.blocks:
            b.attn.proj.weight.div_(div)
            b.ffn.fc2.weight.div_(div)
            b.attn.scale_mul_1H11.fill_(math.log(4.0))
            b.attn.q_bias.zero_()
            b.attn.v_bias.zero_()
            w = b.ada_lin[-1].weight
            w[2 * self.C:].mul_(init_adaln)
            w[:2 * self.C].mul_(aln_gamma)

    def verify_buffers(self) -> None:
        """Raise ValueError unless ``attn_bias_for_masking``/``lvl_1L`` equal freshly built ones (spec §3.9)."""
        dev = self.lvl_1L.device
        if not torch.equal(self.lvl_1L, lvl_index(self.patch_nums, device=dev).view(1, self.L)):
            raise ValueError("VAR buffer lvl_1L differs from the one rebuilt from patch_nums")
        if not torch.equal(self.attn_bias_for_masking, block_causal_bias(self.patch_nums, device=dev)):
            raise ValueError("VAR buffer attn_bias_for_masking differs from the block-causal mask")

    # ------------------------------------------------------------------ forward pieces
    def end_of(self, prog_si: int | None) -> int:
        return self.L if prog_si is None or prog_si < 0 else self.begin_ends[prog_si][1]

    def embed_inputs(self, label_B: Tensor, x_BLCv: Tensor | None, ed: int) -> tuple[Tensor, Tensor]:
        """x_0 (B, ed, C) fp32 = [class_emb + pos_start ; word_embed(x)] + lvl_embed + pos, and cond_BD."""
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            cond_BD = self.class_emb(label_B)
            B = label_B.shape[0]
            x = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
            if ed > self.first_l:
                if x_BLCv is None or x_BLCv.shape[1] < ed - self.first_l:
                    got = None if x_BLCv is None else tuple(x_BLCv.shape)
                    raise ValueError(f"x_BLCv must hold ≥ {ed - self.first_l} positions for ed={ed}, got {got}")
                w = self.word_embed.weight  # bf16 under FSDP mixed precision: match its dtype, keep x in fp32
                x = torch.cat((x, self.word_embed(x_BLCv[:, :ed - self.first_l].to(w.dtype)).to(x.dtype)), dim=1)
            x = x + self.lvl_embed(self.lvl_1L[:, :ed]) + self.pos_1LC[:, :ed]
        return x, cond_BD

    def run_blocks(self, x: Tensor, cond_BD: Tensor, attn_bias: Tensor | None, hook: HookFn | None = None) -> Tensor:
        """Blocks in the autocast dtype (if any), calling ``hook`` after each block; with ``grad_checkpointing``
        (and grad enabled) each block is recomputed in the backward instead of keeping its activations."""
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x, cond = x.to(dt), cond_BD.to(dt)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, cond, attn_bias, use_reentrant=False) if ckpt else blk(x, cond, attn_bias)
            if hook is not None:
                x = hook(i, x, cond, attn_bias)
        return x

    def get_logits(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        return self.head(self.head_nm(h.float(), cond_BD.float()).float()).float()

    def forward(self, label_B: Tensor, x_BLCv: Tensor | None, prog_si: int | None = None,
                hook: HookFn | None = None) -> Tensor:
        """Teacher-forced logits (B, ed, V) fp32; ``x_BLCv`` (B, ≥ ed − first_l, Cvae), ed = end of scale
        ``prog_si`` (None/−1 → L). Class dropout (``cond_drop_rate``) only in training (quirk Q2)."""
        ed = self.end_of(prog_si)
        if self.training:
            label_B = drop_labels(label_B, self.cond_drop_rate, self.num_classes)
        x, cond_BD = self.embed_inputs(label_B, x_BLCv, ed)
        prepare = getattr(hook, "prepare", None)
        add = prepare(0, ed) if prepare is not None else None
        if add is not None:
            x = x + add
        h = self.run_blocks(x, cond_BD, self.attn_bias_for_masking[:, :, :ed, :ed], hook)
        return self.get_logits(h, cond_BD)

    # ------------------------------------------------------------------ sampling: the per-scale step
    def sampling_prologue(self, labels_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """CFG rows [labels; null class]: cond_BD (2B, D), lvl+pos embedding (1, L, C) and the scale-0 input
        x (2B, first_l, C)."""
        B = labels_B.shape[0]
        cond_BD = self.class_emb(torch.cat((labels_B, torch.full_like(labels_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = cond_BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start + lvl_pos[:, :self.first_l]
        return cond_BD, lvl_pos, x

    def sample_scale(self, si: int, x: Tensor, cond_BD: Tensor, lvl_pos: Tensor, f_hat: Tensor, vqvae: nn.Module,
                     cfg: float, pick: Callable[[int, Tensor], Tensor | tuple[Tensor, Tensor]],
                     hook: HookFn | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """One KV-cached sampling scale (caches must be on): blocks on the scale's 2B rows → raw logits
        (2B, pn², V) fp32 → CFG mix → ``pick(si, mixed)`` → tokens (B, pn²) → f̂ += φ(…) in place → the next
        scale's input (2B, pn_next², C), or None after the last scale. Every shape depends only on ``si``.
        ``pick`` may return (tokens, embedding (B, pn², Cvae)) to feed f̂ that embedding instead of the tokens'
        codebook vectors (``more_smooth``)."""
        K, pn = len(self.patch_nums), self.patch_nums[si]
        bg, ed = self.begin_ends[si]
        prepare = getattr(hook, "prepare", None)
        add = prepare(bg, ed) if prepare is not None else None
        h = self.run_blocks(x if add is None else x + add, cond_BD, None, hook)
        logits = self.get_logits(h, cond_BD)
        picked = pick(si, cfg_mix(logits, cfg_ratio(si, K, cfg)))
        idx, emb_BlC = picked if isinstance(picked, tuple) else (picked, vqvae.quantize.embedding(picked))
        B = idx.shape[0]
        emb = emb_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn).float()
        _, nxt = vqvae.next_autoregressive_input(si, f_hat, emb)
        if si == K - 1:
            return logits, idx, None
        ne = self.begin_ends[si + 1][1]
        x = self.word_embed(nxt.flatten(2).transpose(1, 2)) + lvl_pos[:, ed:ne]
        return logits, idx, x.repeat(2, 1, 1)

    def autoregressive_infer_cfg(self, B: int, labels: Tensor | int | None = None, *, vqvae: nn.Module, **kw):
        """KV-cached CFG sampling: :func:`~ctrlgen.lightning_modules.ecm.samplers.sample_cfg` on this model
        (keyword arguments, defaults and returns as documented there)."""
        return sample_cfg(self, B, labels, vqvae=vqvae, **kw)


def build_var(preset: str | None = "d16", **overrides) -> VAR:
    """Build a VAR from ``VAR_PRESETS`` with keyword overrides."""
    cfg = dict(VAR_PRESETS[preset]) if preset else {}
    cfg.update(overrides)
    return VAR(**cfg)
