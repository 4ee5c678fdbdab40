"""VAR's layers (FoundationVision/VAR ``models/basic_var.py``), spec §3.4: stochastic depth, the l2-normalised
self-attention with its optional KV cache, the FFN and the AdaLN blocks. The ECM adapters
(:mod:`ctrlgen.lightning_modules.ecm.control`) reuse :class:`SelfAttention`, :class:`FFN` and :func:`ada_modulate`.

State-dict keys are those of the official modules (the manifests in ``tests/fixtures``); :class:`DropPath` keeps
its rate in a non-persistent buffer, so ``torch.compile`` shares one graph between blocks with different rates.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's branch is zeroed with probability ``p`` and rescaled by
    1/(1 − p). The rate lives in a non-persistent 0-d buffer ``drop_prob`` (not in the state dict), so that
    ``torch.compile`` does not guard on a per-block float: blocks with different rates share one graph.
    ``p`` (float) reads and sets it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self._p = float(p)
        self.register_buffer("drop_prob", torch.tensor(self._p), persistent=False)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        with torch.no_grad():
            self.drop_prob.fill_(self._p)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # re-fill after e.g. meta → to_empty → load
        super()._load_from_state_dict(*args, **kwargs)
        if not self.drop_prob.is_meta:
            with torch.no_grad():
                self.drop_prob.fill_(self._p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep_p = 1 - self.drop_prob.float()  # mask maths in fp32 (also when x is bf16)
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device).bernoulli_(keep_p)
        return x * keep.div_(keep_p).to(x.dtype)


class SelfAttention(nn.Module):
    """VAR attention: fused ``mat_qkv`` (no bias) + ``q_bias``/``zero_k_bias``/``v_bias``, l2-normalised
    q/k, q × exp(min(scale_mul, ln 100)), softmax scale 1, SDPA; optional preallocated KV cache."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.kv_caching(False)

    def kv_caching(self, enable: bool, max_len: int | None = None,
                   buffers: tuple[Tensor | None, Tensor | None] | None = None) -> None:
        """Turn the cache on/off (position 0). ``buffers``: reuse preallocated (k, v) of shape (B, H, max_len, c)
        (the static sampler keeps them across runs; None → allocated on first use)."""
        self.caching, self.cache_max_len, self.cache_len = enable, max_len, 0
        self.cached_k: Tensor | None = buffers[0] if buffers is not None else None
        self.cached_v: Tensor | None = buffers[1] if buffers is not None else None

    def _append_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n, l = self.cache_len, k.shape[2]
        if self.cache_max_len is None:  # growing cache (concatenation)
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), 2), torch.cat((self.cached_v, v), 2)
            self.cached_k, self.cached_v, self.cache_len = k, v, n + l
            return k, v
        if self.cached_k is None:  # preallocate once per sampling run
            shape = (k.shape[0], k.shape[1], self.cache_max_len, k.shape[3])
            self.cached_k, self.cached_v = k.new_empty(shape), v.new_empty(shape)
        elif self.cached_k.dtype != k.dtype or self.cached_k.shape[0] != k.shape[0]:
            raise RuntimeError(f"KV cache buffers {self.cached_k.dtype} {tuple(self.cached_k.shape)} do not fit "
                               f"keys {k.dtype} {tuple(k.shape)}")
        self.cached_k[:, :, n:n + l] = k
        self.cached_v[:, :, n:n + l] = v
        self.cache_len = n + l
        return self.cached_k[:, :, :n + l], self.cached_v[:, :, :n + l]

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B H L c
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1).mul(scale_mul.to(q.dtype))
        k = F.normalize(k, dim=-1)
        if self.caching:
            k, v = self._append_kv(k, v)
        mask = attn_bias.to(q.dtype) if attn_bias is not None else None
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def ada_modulate(ln: nn.Module, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return ln(x).mul(scale.add(1)).add_(shift)


class AdaLNSelfAttn(nn.Module):
    """x += DropPath(Attn(LN(x)(1+s1)+β1)·γ1); x += DropPath(FFN(LN(x)(1+s2)+β2)·γ2) (spec §3.4)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = embed_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop, drop)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x: Tensor, cond_BD: Tensor, attn_bias: Tensor | None) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(ada_modulate(self.ln_wo_grad, x, s1, b1), attn_bias).mul_(g1))
        return x + self.drop_path(self.ffn(ada_modulate(self.ln_wo_grad, x, s2, b2)).mul(g2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_modulate(self.ln_wo_grad, x, scale, shift)
