"""ECM control net (spec §2.1–§2.2): ViT condition encoder → per-scale control tokens r (B, L, C), adapters
after chosen frozen-VAR blocks (own AdaLN + own VAR attention + one shared FFN), tanh gates (init 0 → exactly
the frozen VAR), input injection x_0 += G_in ⊙ r. Plugs into :class:`~ctrlgen.lightning_modules.ecm.var.VAR` through
its hook protocol, so the frozen VAR is never a submodule (checkpoints of this net exclude the base).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ctrlgen.lightning_modules.common.frozen import freeze

from .fastpath import raise_recompile_limit
from .layers import FFN, SelfAttention, ada_modulate
from .var import VAR, VARHook, drop_labels

CONTROL_PRESETS: dict[str, dict] = {
    "default": {"patch": 16, "width": 384, "vit_depth": 4, "vit_heads": 6},  # 256 px → 16×16 grid (spec §2.1)
    "tiny": {"patch": 8, "width": 64, "vit_depth": 2, "vit_heads": 2},  # 64 px → 8×8 grid (tiny VAR preset)
}


# ----------------------------------------------------------------------------- condition encoder
class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = round(width * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTEncoder(nn.Module):
    """Plain ViT from scratch (spec §2.1): patch conv, learned 2-D pos-emb (grid² tokens, no cls), pre-LN
    blocks, final LN, Linear(width → C). Output grid (B, C, grid, grid); grid = image side / patch."""

    def __init__(self, out_dim: int, grid: int, in_chans: int = 3, patch: int = 16, width: int = 384,
                 depth: int = 4, heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.grid, self.patch = grid, patch
        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.blocks = nn.ModuleList([ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, out_dim)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def forward(self, img: Tensor) -> Tensor:
        side = self.grid * self.patch
        if img.shape[-2:] != (side, side):
            raise ValueError(f"condition image must be {side}×{side} (grid {self.grid} × patch {self.patch}), "
                             f"got {tuple(img.shape[-2:])}")
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(self.norm(x))  # (B, grid², C)
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


def per_scale_tokens(grid_BCgg: Tensor, patch_nums: Sequence[int], interp: str = "area") -> list[Tensor]:
    """r_k = interpolate(grid → pn_k × pn_k), each (B, pn_k², C). ``area`` (VAR's own downsampling; scale 0 =
    global mean) or ``bilinear``/``bicubic`` (antialiased)."""
    out = []
    for pn in patch_nums:
        if grid_BCgg.shape[-1] == pn:
            t = grid_BCgg
        elif interp == "area":
            t = F.interpolate(grid_BCgg, size=(pn, pn), mode="area")
        elif interp in ("bilinear", "bicubic"):
            t = F.interpolate(grid_BCgg, size=(pn, pn), mode=interp, align_corners=False, antialias=True)
        else:
            raise ValueError(f"unknown interp {interp!r} (area|bilinear|bicubic)")
        out.append(t.flatten(2).transpose(1, 2))
    return out


# ----------------------------------------------------------------------------- adapters
class Adapter(nn.Module):
    """u = h + c; a = c + γ1 ⊙ Attn(LN(u)(1+s1)+β1); c' = a + γ2 ⊙ FFN(LN(a)(1+s2)+β2)  (spec §2.2)."""

    def __init__(self, C: int, num_heads: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = C
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))
        self.attn = SelfAttention(C, num_heads)
        self.ln = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)

    def forward(self, h: Tensor, c: Tensor, cond_BD: Tensor, attn_bias: Tensor | None, ffn: FFN) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        a = c + self.attn(ada_modulate(self.ln, h + c, s1, b1), attn_bias) * g1
        return a + ffn(ada_modulate(self.ln, a, s2, b2)) * g2


def adapter_positions(depth: int, every: int = 4, offset: int = 3, after_blocks: Sequence[int] | None = None) -> list[int]:
    """Backbone block indices followed by an adapter: explicit ``after_blocks`` or offset, offset+every, …"""
    pos = sorted(int(b) for b in after_blocks) if after_blocks is not None else list(range(offset, depth, every))
    if not pos or len(set(pos)) != len(pos) or not all(0 <= b < depth for b in pos):
        raise ValueError(f"invalid adapter positions {pos} for depth {depth}")
    return pos


class ECMHook(VARHook):
    """Stateful VAR hook of one forward / one sampling run, with control tokens ``r_BLC`` for the first B rows of
    the VAR's batch. ``rows_off`` more rows follow them that get no control at all (CFG ``cond_only``: the
    null-class half): the adapters never compute them (their KV caches hold B rows), their hidden states pass
    through unchanged — each row of the VAR is computed independently of the others, so the controlled rows are
    what they would be with control on every row."""

    def __init__(self, net: ECMControlNet, r_BLC: Tensor, rows_off: int = 0) -> None:
        self.net, self.r, self.rows_off = net, r_BLC, int(rows_off)
        self.bg, self.ed, self.c = 0, r_BLC.shape[1], None

    def _pad(self, t: Tensor) -> Tensor:  # zeros for the rows without control
        return t if not self.rows_off else torch.cat((t, t.new_zeros(self.rows_off, *t.shape[1:])))

    def prepare(self, bg: int, ed: int) -> Tensor | None:
        self.bg, self.ed, self.c = bg, ed, None
        if not self.net.inject_input:
            return None
        return self._pad(torch.tanh(self.net.gate_in) * self.r[:, bg:ed])

    def kv_caching(self, enable: bool, max_len: int | None = None) -> None:
        for a in self.net.adapters:
            a.attn.kv_caching(enable, max_len)

    # ---- static / CUDA-graph sampling (VARHook protocol)
    def cache_modules(self) -> list[nn.Module]:
        return [a.attn for a in self.net.adapters]

    def cache_rows(self, rows: int) -> int:
        return rows - self.rows_off

    def static_key(self) -> tuple:
        r = self.r
        return (id(self.net), tuple(r.shape), r.dtype, str(r.device), self.rows_off)

    def static_clone(self) -> ECMHook:
        return ECMHook(self.net, self.r.clone(), self.rows_off)

    def load_inputs_(self, other: ECMHook) -> None:
        if other.net is not self.net or other.static_key() != self.static_key():
            raise ValueError("load_inputs_: the hook differs in net, shapes or controlled rows")
        self.r.copy_(other.r)

    def __call__(self, block_idx: int, h: Tensor, cond_BD: Tensor, attn_bias: Tensor | None) -> Tensor:
        j = self.net.block_to_adapter.get(block_idx)
        if j is None:
            return h
        c = self.r[:, self.bg:self.ed] if j == 0 or self.c is None else self.c
        ffn = self.net.ffns[0 if self.net.share_ffn else j]
        n = h.shape[0] - self.rows_off
        hc = h[:n]
        args = (hc, c.to(h.dtype), cond_BD[:n], attn_bias, ffn)
        if self.net.grad_checkpointing and torch.is_grad_enabled():
            self.c = checkpoint(self.net.adapters[j], *args, use_reentrant=False)
        else:
            self.c = self.net.adapters[j](*args)
        out = (hc + torch.tanh(self.net.gates[j]) * self.c).to(h.dtype)
        return torch.cat((out, h[n:])) if self.rows_off else out


class ECMControlNet(nn.Module):
    """Trainable ECM part; ``var`` is used at construction (sizes, ``copy_backbone``) and passed at call time."""

    def __init__(self, var: VAR, in_chans: int = 3, patch: int = 16, width: int = 384, vit_depth: int = 4,
                 vit_heads: int = 6, vit_mlp_ratio: float = 4.0, num_condition_types: int = 1,
                 type_embedding: bool | str = "auto", interp: str = "area", every: int = 4, offset: int = 3,
                 after_blocks: Sequence[int] | None = None, share_ffn: bool = True, gate_kind: str = "channel",
                 gate_init: float = 0.0, inject_input: bool = True, init: str = "copy_backbone",
                 control_drop_rate: float = 0.0, cond_drop_rate: float | None = None) -> None:
        super().__init__()
        C, self.C, self.patch_nums, self.L = var.C, var.C, var.patch_nums, var.L
        self.num_classes, self.interp, self.share_ffn, self.inject_input = var.num_classes, interp, share_ffn, inject_input
        self.control_drop_rate = control_drop_rate
        self.cond_drop_rate = var.cond_drop_rate if cond_drop_rate is None else cond_drop_rate
        self.cond_encoder = ViTEncoder(C, var.patch_nums[-1], in_chans, patch, width, vit_depth, vit_heads, vit_mlp_ratio)
        use_type = num_condition_types > 1 if type_embedding == "auto" else bool(type_embedding)
        self.type_embed = nn.Embedding(num_condition_types, C) if use_type else None
        self.after_blocks = adapter_positions(var.depth, every, offset, after_blocks)
        self.block_to_adapter = {b: j for j, b in enumerate(self.after_blocks)}
        n = len(self.after_blocks)
        self.adapters = nn.ModuleList([Adapter(C, var.num_heads) for _ in range(n)])
        self.ffns = nn.ModuleList([FFN(C, var.blocks[0].ffn.fc1.out_features) for _ in range(1 if share_ffn else n)])
        if gate_kind not in ("channel", "scalar"):
            raise ValueError(f"gate_kind must be channel|scalar, got {gate_kind!r}")
        gdim = C if gate_kind == "channel" else 1
        self.gate_init = gate_init
        self.gates = nn.Parameter(torch.full((n, gdim), float(gate_init)))
        self.gate_in = nn.Parameter(torch.full((gdim,), float(gate_init))) if inject_input else None
        self.grad_checkpointing = False  # adapters recomputed in the backward (set with the VAR's, by ECMModule)
        self.init_weights(var, init)

    @torch.no_grad()
    def init_weights(self, var: VAR, mode: str = "copy_backbone") -> None:
        """Explicit init (Q1). ``copy_backbone``: Attn_j/AdaLN_j from block p_j, shared FFN from p_0 (one FFN
        per adapter: from p_j); ``var_init``: VAR's rule (§3.5). ViT: trunc-normal 0.02. Gates = gate_init."""
        self.cond_encoder.init_weights()
        if self.type_embed is not None:
            nn.init.trunc_normal_(self.type_embed.weight, std=0.02)
        if mode == "copy_backbone":
            for j, b in enumerate(self.after_blocks):
                self.adapters[j].attn.load_state_dict(var.blocks[b].attn.state_dict())
                self.adapters[j].ada_lin.load_state_dict(var.blocks[b].ada_lin.state_dict())
            for j, f in enumerate(self.ffns):
                f.load_state_dict(var.blocks[self.after_blocks[j]].ffn.state_dict())
        elif mode == "var_init":
            std, div, gam = math.sqrt(1 / self.C / 3), math.sqrt(2 * var.depth), var.init_cfg["aln_gamma"]
            for m in list(self.adapters.modules()) + list(self.ffns.modules()):
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=std)
                    if m.bias is not None:
                        m.bias.zero_()
            for a in self.adapters:
                a.attn.proj.weight.div_(div)
                a.attn.scale_mul_1H11.fill_(math.log(4.0))
                a.attn.q_bias.zero_()
                a.attn.v_bias.zero_()
                a.ada_lin[-1].weight[2 * self.C:].mul_(0.5)
                a.ada_lin[-1].weight[:2 * self.C].mul_(gam)
            for f in self.ffns:
                f.fc2.weight.div_(div)
        else:
            raise ValueError(f"unknown init {mode!r} (copy_backbone|var_init)")
        self.gates.fill_(self.gate_init)
        if self.gate_in is not None:
            self.gate_in.fill_(self.gate_init)

    # ------------------------------------------------------------------ control tokens / hooks
    def control_tokens(self, cond_img: Tensor, type_idx: Tensor | None = None) -> Tensor:
        """Condition image (B, in_chans, S, S) in [−1, 1] → r (B, L, C) in VAR's token order."""
        r = torch.cat(per_scale_tokens(self.cond_encoder(cond_img), self.patch_nums, self.interp), dim=1)
        if self.type_embed is not None:
            if type_idx is None:
                raise ValueError("type_idx is required with a type embedding")
            r = r + self.type_embed(type_idx).unsqueeze(1)
        return r

    def make_hook(self, r_BLC: Tensor, rows_off: int = 0) -> ECMHook:
        return ECMHook(self, r_BLC, rows_off)

    def gate_values(self) -> Tensor:
        """mean |tanh(g_j)| per adapter (+ input gate last, if any) — for logging."""
        g = [torch.tanh(self.gates).abs().mean(-1)]
        if self.gate_in is not None:
            g.append(torch.tanh(self.gate_in).abs().mean().view(1))
        return torch.cat(g).detach()

    # ------------------------------------------------------------------ helpers running VAR + control
    def forward(self, var: VAR, label_B: Tensor, x_BLCv: Tensor | None, cond_img: Tensor | None = None,
                prog_si: int | None = None, r: Tensor | None = None, type_idx: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, ed, V) of frozen ``var`` + control. Class dropout (``cond_drop_rate``)
        and control dropout are applied here, only when this net is training (the frozen VAR stays eval)."""
        if r is None:
            r = self.control_tokens(cond_img, type_idx)
        if self.training:
            label_B = drop_labels(label_B, self.cond_drop_rate, self.num_classes)
            if self.control_drop_rate > 0:
                keep = torch.rand(r.shape[0], 1, 1, device=r.device) >= self.control_drop_rate
                r = r * keep.to(r.dtype)
        return var(label_B, x_BLCv, prog_si=prog_si, hook=self.make_hook(r))

    def sampling_hook(self, B: int, cond_img: Tensor | None = None, r: Tensor | None = None,
                      type_idx: Tensor | None = None, cfg_control: str = "both") -> ECMHook:
        """The hook of one CFG sampling run of B images (rows [cond; null]). ``cfg_control``: ``both`` (control
        tokens r on the cond and the null rows) or ``cond_only`` (the null rows are the plain VAR's; the adapters
        run on the B cond rows only, half their cost)."""
        if cfg_control not in ("both", "cond_only"):
            raise ValueError(f"cfg_control must be both|cond_only, got {cfg_control!r}")
        if r is None:
            r = self.control_tokens(cond_img, type_idx)
        if r.shape[0] != B:
            raise ValueError(f"control tokens for {r.shape[0]} images, expected B={B}")
        if cfg_control == "cond_only":
            return self.make_hook(r, rows_off=B)
        return self.make_hook(torch.cat((r, r), dim=0))

    @torch.no_grad()
    def sample(self, var: VAR, vqvae: nn.Module, B: int, labels: Tensor | int | None, cond_img: Tensor | None = None,
               r: Tensor | None = None, type_idx: Tensor | None = None, cfg_control: str = "both", **kw):
        """KV-cached CFG sampling with control (kwargs → :meth:`VAR.autoregressive_infer_cfg`, e.g.
        ``sampler="static"|"graph"``). ``cfg_control``: ``both`` (control on cond and null rows) or ``cond_only``."""
        hook = self.sampling_hook(B, cond_img, r, type_idx, cfg_control)
        return var.autoregressive_infer_cfg(B, labels, vqvae=vqvae, hook=hook, **kw)


def compile_control(net: ECMControlNet, **compile_kw) -> ECMControlNet:
    """Regional compilation, in place (state-dict keys unchanged): ``nn.Module.compile`` on every adapter and
    every ViT block (pair with :func:`~ctrlgen.lightning_modules.ecm.fastpath.compile_blocks` for the VAR; raises the dynamo
    recompile limit to 64 like it). Returns ``net``."""
    raise_recompile_limit(64)
    for m in [*net.adapters, *net.cond_encoder.blocks]:
        m.compile(**compile_kw)
    return net


def freeze_backbone(var: VAR, source: str | dict | None = None) -> VAR:
    """The VAR as a frozen component (spec §2.2, ``common/frozen.freeze``): no grads, eval mode kept through
    ``train()`` of the module holding it, left out of optimizer and checkpoints; ``source``: its weights file."""
    return freeze(var, source=source, config_key="model.init_args.var_weights")
