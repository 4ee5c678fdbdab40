"""Multi-scale residual VQVAE of VAR (spec §3.2), state-dict compatible with ``vae_ch160v4096z32.pth``.

Keys/shapes equal the spec's manifest (``tests/fixtures/vae_ch160v4096z32_state_dict.tsv``) for the default config
(checked in tests/ecm/test_vqvae.py). LDM conv ``Encoder``/``Decoder`` (GroupNorm(32, eps 1e-6) + SiLU, single-head
attention with fused 1×1 ``qkv`` + ``proj_out`` via SDPA); quantiser maths in :class:`MultiScaleQuantizer`;
pure loss helpers :func:`vq_scale_loss`, :func:`straight_through`, :func:`codebook_usage`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from .scales import DEFAULT_PATCH_NUMS, TINY_PATCH_NUMS, phi_table

VQVAE_PRESETS: dict[str, dict] = {
    # FoundationVision/VAR ``vae_ch160v4096z32`` (108,948,355 params), 256 px → 16×16.
    "vae_ch160v4096z32": {"ch": 160, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "z_channels": 32,
                          "vocab_size": 4096, "patch_nums": DEFAULT_PATCH_NUMS},
    # CPU demo: 64 px → ×8 → 8×8 finest scale.
    "tiny": {"ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1, "z_channels": 16, "vocab_size": 512,
             "patch_nums": TINY_PATCH_NUMS},
    # CPU proof-of-life (`ctrlgen demo ecm`): 32 px → ×4 → 8×8, same tokens as "tiny", ~4× cheaper per image.
    "demo32": {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "z_channels": 16, "vocab_size": 512,
               "patch_nums": TINY_PATCH_NUMS},
    # `ctrlgen demo ecm` on 2 CPU cores: "demo32" with 32 channels at 16 px too: 36 % fewer FLOPs, same tokens and
    # about the same reconstruction after a few hundred steps on the shapes world.
    "demo32_lite": {"ch": 32, "ch_mult": (1, 1, 2), "num_res_blocks": 1, "z_channels": 16, "vocab_size": 512,
                    "patch_nums": TINY_PATCH_NUMS},
}


# ----------------------------------------------------------------------------- conv blocks (LDM style)
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, fused 1×1 ``qkv`` conv, softmax scale C^-½ (SDPA default)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1, 1, 0)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, self.C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, self.C, H, W))


def _attn_or_id(c: int, on: bool) -> nn.Module:
    return AttnBlock(c) if on else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, in_channels: int,
                 z_channels: int, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult, self.down = (1,) + tuple(ch_mult), nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _attn_or_id(block_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j, blk in enumerate(down.block):
                h = blk(h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, in_channels: int,
                 z_channels: int, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _attn_or_id(block_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j, blk in enumerate(up.block):
                h = blk(h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- pure loss helpers
def vq_scale_loss(f_hat: Tensor, f: Tensor, beta: float) -> Tensor:
    """VAR's per-scale VQ loss: β·‖sg(f̂) − f‖² (commitment, to the encoder) + ‖f̂ − sg(f)‖² (codebook/φ)."""
    return F.mse_loss(f_hat.detach(), f).mul(beta) + F.mse_loss(f_hat, f.detach())


def straight_through(f_hat: Tensor, f: Tensor) -> Tensor:
    """Straight-through estimator: value of f̂, gradient of f (identity to the encoder)."""
    return (f_hat.detach() - f.detach()) + f


def codebook_usage(ema_hits_SV: Tensor, tokens_per_scale: Sequence[int], world_size: int = 1,
                   frac: float = 0.08) -> list[float]:
    """% of codes whose EMA hit count ≥ ``frac`` × uniform expectation, per scale.

    (VAR uses the finest-scale token count for every scale; ctrlgen uses each scale's own count.)
    """
    V = ema_hits_SV.shape[1]
    return [float((ema_hits_SV[si] >= world_size * n / V * frac).float().mean()) * 100
            for si, n in enumerate(tokens_per_scale)]


# ----------------------------------------------------------------------------- quantiser
def _fp32(fn):
    """Run a quantiser method with autocast disabled: token maths is always fp32 (indices and teacher-forcing
    inputs do not depend on the caller's mixed-precision context)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with torch.autocast(device_type=self.embedding.weight.device.type, enabled=False):
            return fn(self, *args, **kwargs)

    return wrapper


class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·Conv3×3(h), r = |quant_resi| (0.5)."""

    def __init__(self, dim: int, quant_resi: float) -> None:
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:  # type: ignore[override]
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """Holds ``qresi_ls`` (K φ convs); scale → φ via :func:`scales.phi_table`."""

    def __init__(self, dim: int, quant_resi: float, num_phi: int, patch_nums: Sequence[int]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(dim, quant_resi) for _ in range(num_phi)])
        self.table = phi_table(patch_nums, num_phi)

    def forward(self, si: int, h: Tensor) -> Tensor:
        return self.qresi_ls[self.table[si]](h)


class MultiScaleQuantizer(nn.Module):
    """Residual multi-scale quantiser (VAR ``VectorQuantizer2``, plain L2, no z-norm), spec §3.2."""

    def __init__(self, vocab_size: int, cvae: int, patch_nums: Sequence[int], beta: float = 0.25,
                 quant_resi: float = 0.5, num_phi: int = 4) -> None:
        super().__init__()
        self.vocab_size, self.cvae, self.beta = vocab_size, cvae, beta
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.record_hit = 0
        self.quant_resi = PhiPartiallyShared(cvae, quant_resi, num_phi, self.patch_nums)
        self.embedding = nn.Embedding(vocab_size, cvae)

    def phi(self, si: int, h: Tensor) -> Tensor:
        return self.quant_resi(si, h)

    def nearest(self, z_NC: Tensor) -> Tensor:
        """argmin_v ‖z − e_v‖² for rows of ``z_NC`` (fp32)."""
        w = self.embedding.weight.detach().float()
        d = z_NC.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)
        d.addmm_(z_NC, w.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    def _embed_up(self, si: int, idx_Bhw: Tensor, H: int) -> Tensor:
        """φ_si(bicubic-up(embed(idx))) at H×H (no resampling at the finest scale)."""
        h = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
        if idx_Bhw.shape[-1] != H:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        return self.phi(si, h.contiguous())

    def _rest(self, f_rest: Tensor, pn: int) -> Tensor:
        if f_rest.shape[-1] != pn:
            f_rest = F.interpolate(f_rest, size=(pn, pn), mode="area")
        return f_rest.permute(0, 2, 3, 1).reshape(-1, self.cvae)

    def forward(self, f: Tensor, ret_usages: bool = False) -> tuple[Tensor, Tensor, list[float] | None]:
        """Training/eval quantisation → (f̂ with straight-through gradient, mean VQ loss, usages %)."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            B, _C, H, W = f.shape
            if H != self.patch_nums[-1] or W != H:
                raise ValueError(f"latent {H}×{W} does not match finest patch_num {self.patch_nums[-1]}")
            f_rest = f.detach().clone()
            f_hat = torch.zeros_like(f_rest)
            loss = f.new_zeros(())
            hits = []
            for si, pn in enumerate(self.patch_nums):
                idx = self.nearest(self._rest(f_rest, pn))
                hits.append(idx.bincount(minlength=self.vocab_size).float())
                h = self._embed_up(si, idx.view(B, pn, pn), H)
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                loss = loss + vq_scale_loss(f_hat, f, self.beta)
            loss = loss / len(self.patch_nums)
            if self.training:
                self._update_ema(torch.stack(hits))
            usages = codebook_usage(self.ema_vocab_hit_SV, [B * pn * pn for pn in self.patch_nums],
                                    tdist.get_world_size() if tdist.is_initialized() else 1) if ret_usages else None
            return straight_through(f_hat, f), loss, usages

    @torch.no_grad()
    def _update_ema(self, hits_SV: Tensor) -> None:
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hits_SV)
        if self.record_hit == 0:
            self.ema_vocab_hit_SV.copy_(hits_SV)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV.mul_(0.9).add_(hits_SV.mul(0.1))
        else:
            self.ema_vocab_hit_SV.mul_(0.99).add_(hits_SV.mul(0.01))
        self.record_hit += 1

    @torch.no_grad()
    @_fp32
    def f_to_idx(self, f: Tensor, last_si: int | None = None) -> list[Tensor]:
        """Token indices per scale (B, pn²) int64, optionally only through scale ``last_si``."""
        f = f.float()
        B, _C, H, _W = f.shape
        f_rest, out = f.clone(), []
        for si, pn in enumerate(self.patch_nums):
            if last_si is not None and 0 <= last_si < si:
                break
            idx = self.nearest(self._rest(f_rest, pn))
            out.append(idx.view(B, pn * pn))
            f_rest.sub_(self._embed_up(si, idx.view(B, pn, pn), H))
        return out

    @_fp32
    def idx_to_fhat(self, idx_list: Sequence[Tensor]) -> Tensor:
        """Σ_k φ_k(up(embed(idx_k))) over the given (possibly partial) list of scales."""
        B, H = idx_list[0].shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.cvae, H, H, dtype=torch.float32)
        for si, idx in enumerate(idx_list):
            pn = self.patch_nums[si]
            f_hat = f_hat + self._embed_up(si, idx.view(B, pn, pn), H).float()
        return f_hat

    @_fp32
    def idx_to_var_input(self, idx_list: Sequence[Tensor]) -> Tensor | None:
        """Teacher-forcing input (B, L − first_l, Cvae): for scales 0..K−2 accumulate φ(up(embed(idx)))
        into f̂ and emit area-down(f̂ → next pn) (VAR ``idxBl_to_var_input``, spec §3.2). Accepts a prefix
        of the scales (truncated training): emits inputs for scales 1..len(idx_list)−1."""
        B, H, nxt = idx_list[0].shape[0], self.patch_nums[-1], []
        f_hat = self.embedding.weight.new_zeros(B, self.cvae, H, H, dtype=torch.float32)
        for si in range(min(len(idx_list), len(self.patch_nums)) - 1):
            pn = self.patch_nums[si]
            f_hat = f_hat + self._embed_up(si, idx_list[si].view(B, pn, pn), H).float()
            pn_next = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(nxt, dim=1) if nxt else None

    @_fp32
    def next_autoregressive_input(self, si: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """Sampling step (VAR ``get_next_autoregressive_input``): f̂ += φ_si(up(h)); return (f̂, area-down
        of f̂ to the next scale's pn — or f̂ itself after the last scale). ``f_hat`` is updated in place."""
        H, last = self.patch_nums[-1], len(self.patch_nums) - 1
        if h_BChw.shape[-1] != H:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        f_hat.add_(self.phi(si, h_BChw))
        if si == last:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")


# ----------------------------------------------------------------------------- VQVAE
class VQVAE(nn.Module):
    """VAR's multi-scale VQVAE (spec §3.2). Decoder uses ``num_res_blocks + 1`` res-blocks per level."""

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, vocab_size: int = 4096, patch_nums: Sequence[int] = DEFAULT_PATCH_NUMS,
                 beta: float = 0.25, in_channels: int = 3, dropout: float = 0.0, quant_resi: float = 0.5,
                 num_phi: int = 4, quant_conv_ks: int = 3, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, z_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        cfg = {"ch": ch, "ch_mult": tuple(ch_mult), "num_res_blocks": num_res_blocks, "dropout": dropout,
               "in_channels": in_channels, "z_channels": z_channels, "using_sa": using_sa,
               "using_mid_sa": using_mid_sa}
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, self.patch_nums, beta, quant_resi, num_phi)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.init_weights()

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicit init (quirk Q1): PyTorch defaults for convs/norms, codebook U(−1/V, 1/V)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()
        self.quantize.embedding.weight.uniform_(-1.0 / self.vocab_size, 1.0 / self.vocab_size)
        self.quantize.ema_vocab_hit_SV.zero_()

    # ---- encode / decode
    def encode(self, img: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(img))

    def forward(self, img: Tensor, ret_usages: bool = False) -> tuple[Tensor, Tensor, list[float] | None]:
        """Training forward: (reconstruction, VQ loss, codebook usage % per scale or None)."""
        f_hat, vq_loss, usages = self.quantize(self.encode(img), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, usages

    @torch.no_grad()
    def img_to_idx(self, img: Tensor, last_si: int | None = None) -> list[Tensor]:
        """Image in [−1, 1] → list of (B, pn²) int64 token maps. The encoder runs in fp32 with autocast off, as the
        official trainer tokenises before its amp context: the codes do not depend on the caller's precision, and
        on-the-fly codes equal pre-tokenised ones (``ctrlgen data tokenize``)."""
        with torch.autocast(device_type=img.device.type, enabled=False):
            return self.quantize.f_to_idx(self.encode(img.float()), last_si)

    def idx_to_fhat(self, idx_list: Sequence[Tensor]) -> Tensor:
        return self.quantize.idx_to_fhat(idx_list)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """Decode f̂ → image clamped to [−1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def idx_to_img(self, idx_list: Sequence[Tensor]) -> Tensor:
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    def idx_to_var_input(self, idx_list: Sequence[Tensor]) -> Tensor | None:
        return self.quantize.idx_to_var_input(idx_list)

    def next_autoregressive_input(self, si: int, f_hat: Tensor, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        return self.quantize.next_autoregressive_input(si, f_hat, h_BChw)


def build_vqvae(preset: str | None = "vae_ch160v4096z32", **overrides) -> VQVAE:
    """Build a VQVAE from a named preset (``VQVAE_PRESETS``) with keyword overrides."""
    cfg = dict(VQVAE_PRESETS[preset]) if preset else {}
    cfg.update(overrides)
    return VQVAE(**cfg)
