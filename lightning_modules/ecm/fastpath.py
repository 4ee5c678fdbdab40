"""GPU fast paths of the VAR / ECM networks, kept apart from the model definitions in ``var.py``.

* :func:`compile_blocks`, :func:`raise_recompile_limit`, :func:`uncompile` — regional ``torch.compile`` of the
  transformer blocks.
* :func:`fast_decoder` — the VQVAE decode (the samplers' last, eager step) in channels-last layout, optionally
  compiled.

The static and CUDA-graph samplers are in :mod:`ctrlgen.lightning_modules.ecm.samplers`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def raise_recompile_limit(n: int) -> None:
    """Let dynamo keep ≥ ``n`` graphs per code object (the default 8 would silently fall back to eager)."""
    dc = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), n))


def compile_blocks(var: nn.Module, **compile_kw) -> nn.Module:
    """Regional compilation: ``nn.Module.compile`` on every block, in place (state-dict keys unchanged). The
    blocks share their code and (DropPath rate in a buffer) their graphs: one per (drop-path kind, sequence
    length, train/eval, grad mode). The dynamo recompile limit is raised to 64, since these graphs and those of
    other regionally compiled modules share the code object of ``nn.Module._call_impl``. Returns ``var``."""
    raise_recompile_limit(64)
    for blk in var.blocks:
        blk.compile(**compile_kw)
    return var


def fast_decoder(vqvae: nn.Module, channels_last: bool = True, compile_kw: dict | None = None) -> nn.Module:
    """Speed up ``vqvae.fhat_to_img`` in place (the decode that follows every sampler): the decoder's convolutions
    and ``post_quant_conv`` in channels-last layout (tensor-core convolution kernels take NHWC; NCHW inputs are
    transposed on every call), and with ``compile_kw`` the decoder ``nn.Module.compile``d (GroupNorm + SiLU + casts
    fused). Same maths, same state-dict; undo with :func:`plain_decoder`. Returns ``vqvae``."""
    if channels_last:
        for m in (vqvae.decoder, vqvae.post_quant_conv):
            m.to(memory_format=torch.channels_last)
    if compile_kw is not None:
        vqvae.decoder.compile(**{"dynamic": False, **compile_kw})
    return vqvae


def plain_decoder(vqvae: nn.Module) -> nn.Module:
    """Undo :func:`fast_decoder`: contiguous (NCHW) weights, eager decoder. Returns ``vqvae``."""
    for m in (vqvae.decoder, vqvae.post_quant_conv):
        m.to(memory_format=torch.contiguous_format)
    uncompile([vqvae.decoder])
    return vqvae


def uncompile(modules: Sequence[nn.Module]) -> None:
    """Undo ``nn.Module.compile`` (each module runs its eager forward again; torch has no public call for it)."""
    for m in modules:
        m._compiled_call_impl = None
