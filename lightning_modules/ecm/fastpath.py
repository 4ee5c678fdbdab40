"""GPU fast paths of the VAR / ECM networks, kept apart from the model definitions in ``var.py``.

* :class:`StaticCFGSampler` — shape-static KV-cached CFG sampling (``sampler="static"``), optionally one CUDA graph
  per scale (``sampler="graph"``); reached through :meth:`VAR.autoregressive_infer_cfg` / ``ECMControlNet.sample``.
* :func:`compile_blocks`, :func:`raise_recompile_limit`, :func:`uncompile` — regional ``torch.compile`` of the
  transformer blocks.
* :func:`fast_decoder` — the VQVAE decode (the sampler's last, eager step) in channels-last layout, optionally
  compiled.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import SelfAttention
from .sampling import exponential_noise, sample_with_noise
from .var import VAR, HookFn, VARHook


def _hook_cache_modules(hook: object | None) -> list[nn.Module]:
    """The hook's KV-caching modules; a hook that caches (``kv_caching``) must list them (``cache_modules``)."""
    if hook is None:
        return []
    mods = getattr(hook, "cache_modules", None)
    kv = getattr(type(hook), "kv_caching", None)
    own_kv = kv is not None and kv is not VARHook.kv_caching
    if own_kv and (mods is None or getattr(type(hook), "cache_modules", None) is VARHook.cache_modules):
        raise ValueError(f"{type(hook).__name__} has kv_caching() but no cache_modules(): the static sampler "
                         "needs the hook's KV-caching modules")
    return list(mods()) if mods is not None else []


class StaticCFGSampler:
    """Shape-static KV-cached CFG sampler of one configuration; optionally one CUDA graph per scale.

    Everything is preallocated or allocated once (KV caches of the VAR blocks and of the hook, noise, label and
    hook inputs), every per-scale step has fixed shapes, and no step syncs with the host: the token draw is
    argmax(p / q) (:func:`~ctrlgen.lightning_modules.ecm.sampling.sample_with_noise`) with q ~ Exp(1) drawn **outside**
    the step, per scale, from the caller's generator into one buffer. That is exactly the Exp(1) draw that
    ``torch.multinomial(p, 1)`` makes, in the same order and shapes, so with the same generator this sampler
    gives the eager sampler's tokens and leaves the generator in the same state.

    With ``cuda_graph`` (CUDA only) the first call warms up on a side stream (noise = 1, generator untouched),
    then captures scale 0 (with the prologue: labels → cond, x_0, f̂ = 0) … scale K−1 into graphs sharing one
    memory pool; later calls copy labels and hook inputs into static buffers, draw the noise and replay the
    graphs in order. Autocast's cast cache is disabled inside the steps (cached casts would escape the
    graph's memory pool). The decode (VQVAE) runs eagerly afterwards.

    ``compile_kw``: the step is ``torch.compile``d with these kwargs (``dynamic=False`` by default; one graph
    per scale, the recompile limit is raised to allow it)."""

    def __init__(self, var: VAR, vqvae: nn.Module, B: int, *, cfg: float, top_k: int, top_p: float,
                 temperatures: Sequence[float], hook: HookFn | None = None, return_logits: bool = False,
                 cuda_graph: bool = False, compile_kw: dict | None = None) -> None:
        self.var, self.vqvae, self.B, self.cfg, self.top_k, self.top_p = var, vqvae, B, cfg, top_k, top_p
        self.temps, self.return_logits, self.cuda_graph = tuple(temperatures), return_logits, cuda_graph
        K, dev = len(var.patch_nums), var.lvl_1L.device
        if len(self.temps) != K:
            raise ValueError(f"{len(self.temps)} temperatures for {K} scales")
        self.dev = dev
        self.hook = hook
        if cuda_graph and hook is not None:
            self.hook = hook.static_clone()  # owns the input buffers the graphs read
        own, hook_mods = [b.attn for b in var.blocks], _hook_cache_modules(self.hook)
        self.modules = own + hook_mods
        amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        hook_rows = self.hook.cache_rows(2 * B) if hasattr(self.hook, "cache_rows") else 2 * B

        def kv_buffers(m: SelfAttention, rows: int) -> tuple[Tensor, Tensor]:  # in the dtype the blocks compute in
            kw = {"device": dev, "dtype": amp or m.mat_qkv.weight.dtype}
            shape = (rows, m.num_heads, var.L, m.head_dim)
            return torch.empty(shape, **kw), torch.empty(shape, **kw)

        self.kv = [kv_buffers(m, 2 * B) for m in own] + [kv_buffers(m, hook_rows) for m in hook_mods]
        self.labels = torch.zeros(B, dtype=torch.long, device=dev)
        self.rows = [B * pn * pn for pn in var.patch_nums]
        self.noise = torch.ones(max(self.rows) * var.V, dtype=torch.float32, device=dev)
        self.graphs: list | None = None
        self.step, self.warmups = self._step, 1
        if compile_kw is not None:  # a 2nd warm-up sees the state the capture sees (no recompile while capturing)
            self.warmups = 2
            raise_recompile_limit(4 * K)
            self.step = torch.compile(self._step, **{"dynamic": False, **compile_kw})
        self.outs: list[tuple[Tensor, Tensor]] = []  # (logits, idx) per scale, the graphs' outputs
        self.f_hat: Tensor | None = None

    # ---- pieces
    def _noise(self, si: int) -> Tensor:
        return self.noise[:self.rows[si] * self.var.V].view(self.rows[si], self.var.V)

    def _pick(self, si: int, mixed: Tensor) -> Tensor:
        return sample_with_noise(mixed, self._noise(si), self.top_k, self.top_p, self.temps[si])

    def _caches(self, on: bool) -> None:
        if on:
            for m, kv in zip(self.modules, self.kv):
                m.kv_caching(True, self.var.L, kv)
        else:
            self.kv = [(m.cached_k, m.cached_v) for m in self.modules]
            for m in self.modules:
                m.kv_caching(False)

    def _autocast(self):
        t = self.dev.type
        return torch.autocast(t, dtype=torch.get_autocast_dtype(t), enabled=torch.is_autocast_enabled(t),
                              cache_enabled=False)

    def _step(self, si: int, state: dict) -> None:
        """Scale ``si`` (with the prologue at si = 0), reading/writing ``state`` (x, cond, lvl_pos, f_hat)."""
        v = self.var
        with self._autocast():
            if si == 0:
                state["cond"], state["lvl_pos"], state["x"] = v.sampling_prologue(self.labels)
                H = v.patch_nums[-1]
                state["f_hat"] = state["cond"].new_zeros(self.B, v.Cvae, H, H, dtype=torch.float32)
            logits, idx, state["x"] = v.sample_scale(si, state["x"], state["cond"], state["lvl_pos"], state["f_hat"],
                                                     self.vqvae, self.cfg, self._pick, self.hook)
        state["out"] = (logits if self.return_logits else None, idx)

    def _draw(self, si: int, rng: torch.Generator | None) -> None:
        n = self.rows[si] * self.var.V
        exponential_noise((self.rows[si], self.var.V), rng, device=self.dev, out=self.noise[:n])

    def _eager(self, rng: torch.Generator | None, draw: bool = True) -> None:
        state: dict = {}
        self.outs = []
        self._caches(True)
        try:
            for si in range(len(self.var.patch_nums)):
                if draw:
                    self._draw(si, rng)
                self.step(si, state)
                self.outs.append(state["out"])
        finally:
            self._caches(False)
        self.f_hat = state["f_hat"]

    def _capture(self) -> None:
        s = torch.cuda.Stream(self.dev)
        s.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(s):  # warm-up: lazy inits, kernel choice, compilation; noise = 1, no draws
            self.noise.fill_(1.0)
            for _ in range(self.warmups):
                self._eager(None, draw=False)
        torch.cuda.current_stream(self.dev).wait_stream(s)
        graphs, outs, state, pool = [], [], {}, None
        self._caches(True)
        try:
            for si in range(len(self.var.patch_nums)):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.step(si, state)
                pool = g.pool() if pool is None else pool
                graphs.append(g)
                outs.append(state["out"])
        finally:
            self._caches(False)
        self.graphs, self.outs, self.f_hat = graphs, outs, state["f_hat"]

    # ---- run
    @torch.no_grad()
    def __call__(self, labels: Tensor, rng: torch.Generator | None,
                 hook: HookFn | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Sample with ``labels`` (B,) and ``hook``'s inputs → (f̂, tokens per scale, raw logits per scale
        if ``return_logits`` else [])."""
        self.labels.copy_(labels)
        if not self.cuda_graph:
            self.hook = hook
            self._eager(rng)
        else:
            if hook is not None:
                self.hook.load_inputs_(hook)
            if self.graphs is None:
                self._capture()
            for si, g in enumerate(self.graphs):
                self._draw(si, rng)
                g.replay()
        idx = [t.clone() for _, t in self.outs]
        logits = [t.clone() for t, _ in self.outs] if self.return_logits else []
        return self.f_hat.clone(), idx, logits


def raise_recompile_limit(n: int) -> None:
    """Let dynamo keep ≥ ``n`` graphs per code object (the default 8 would silently fall back to eager)."""
    dc = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), n))


def compile_blocks(var: VAR, **compile_kw) -> VAR:
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
