"""KV-cached CFG sampling loops of the VAR, as functions of (model, hook): ``eager``, ``static`` and ``graph``.

The VAR contributes its per-scale step only (:meth:`VAR.sampling_prologue`, :meth:`VAR.sample_scale`); this file runs
the scales: :func:`sample_cfg` (what :meth:`VAR.autoregressive_infer_cfg` and ``ECMControlNet.sample`` call) resolves
labels, generator and temperatures, then

* ``eager`` — :func:`sample_eager`: ``torch.multinomial`` per scale;
* ``static`` — :class:`StaticCFGSampler`: preallocated buffers, the draw as argmax(p/q) with Exp(1) noise q from the
  same generator (the same tokens as ``eager``), no host syncs;
* ``graph`` — a :class:`StaticCFGSampler` with one CUDA graph per scale, captured on the first call of a
  configuration and cached by :func:`static_sampler` (see there for the cache key).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .fastpath import raise_recompile_limit
from .hooks import HookFn, hook_cache_modules
from .layers import SelfAttention
from .sampling import (
    exponential_noise,
    resolve_temperatures,
    sample_smooth,
    sample_top_k_top_p,
    sample_with_noise,
    uniform_labels,
)

SAMPLERS = ("eager", "static", "graph")  # sample_cfg(sampler=...)
GRAPH_ATTR = "_sampler_graphs"  # model.__dict__ entry holding the captured samplers (not a state, not copied)


# ----------------------------------------------------------------------------- shared pieces
def resolve_labels(model: nn.Module, B: int, labels: Tensor | int | None, g_seed: int | None,
                   generator: torch.Generator | None) -> tuple[Tensor, torch.Generator | None]:
    """Labels (B,) int64 on the model's device and the generator (``g_seed`` → a fresh one on the device).
    Random labels (``labels=None``) are the first draw from the generator, as the official sampler draws them
    (:func:`uniform_labels`); an int < 0 is the null class."""
    dev = model.lvl_1L.device
    if g_seed is not None and generator is not None:
        raise ValueError("pass either g_seed or generator, not both")
    rng = generator if generator is not None else (
        torch.Generator(device=dev).manual_seed(g_seed) if g_seed is not None else None)
    if labels is None:
        labels = uniform_labels(B, model.num_classes, rng, dev)
    elif isinstance(labels, int):
        labels = torch.full((B,), model.num_classes if labels < 0 else labels, device=dev, dtype=torch.long)
    return labels.to(dev).long(), rng


def set_kv_caching(model: nn.Module, enable: bool, hook: object | None) -> None:
    """Growing KV caches of every VAR block (and of the hook, if it caches) on or off."""
    for b in model.blocks:
        b.attn.kv_caching(enable, model.L if enable else None)
    kv = getattr(hook, "kv_caching", None)
    if kv is not None:
        kv(enable, model.L if enable else None)


# ----------------------------------------------------------------------------- eager
def sample_eager(model: nn.Module, vqvae: nn.Module, labels: Tensor, rng: torch.Generator | None, *, cfg: float,
                 top_k: int, top_p: float, temperatures: Sequence[float], hook: HookFn | None = None,
                 return_logits: bool = False, more_smooth: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``torch.multinomial`` per scale → (f̂, tokens per scale, raw logits per scale if ``return_logits`` else []).
    ``more_smooth``: f̂ accumulates a Gumbel-softmax mixture of codebook vectors of the filtered logits instead of
    the drawn tokens' vectors (:func:`~ctrlgen.lightning_modules.ecm.sampling.sample_smooth`; the same tokens)."""
    B = labels.shape[0]
    cond_BD, lvl_pos, x = model.sampling_prologue(labels)
    H = model.patch_nums[-1]
    f_hat = cond_BD.new_zeros(B, model.Cvae, H, H, dtype=torch.float32)
    idx_list, logits_list = [], []

    def pick(si: int, mixed: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if more_smooth:
            return sample_smooth(mixed, vqvae.quantize.embedding.weight, si, len(temperatures), top_k, top_p,
                                 generator=rng, temperature=temperatures[si])
        return sample_top_k_top_p(mixed, top_k, top_p, generator=rng, temperature=temperatures[si])

    set_kv_caching(model, True, hook)
    try:
        for si in range(len(model.patch_nums)):
            logits, idx, x = model.sample_scale(si, x, cond_BD, lvl_pos, f_hat, vqvae, cfg, pick, hook)
            idx_list.append(idx)
            if return_logits:
                logits_list.append(logits)
    finally:
        set_kv_caching(model, False, hook)
    return f_hat, idx_list, logits_list


# ----------------------------------------------------------------------------- static / graph
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

    def __init__(self, var: nn.Module, vqvae: nn.Module, B: int, *, cfg: float, top_k: int, top_p: float,
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
        own, hook_mods = [b.attn for b in var.blocks], hook_cache_modules(self.hook)
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


# ----------------------------------------------------------------------------- the CUDA-graph cache
def _address(t: Tensor) -> tuple | int:
    """Where a tensor's data lives: (storage pointer, offset, storage bytes); ``id`` for tensors without storage."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), t.storage_offset(), st.nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        return id(t)


def hook_modules(hook: object | None) -> list[nn.Module]:
    """Modules whose tensors a hook's steps read: its KV-caching modules and every ``nn.Module`` attribute
    (ECMHook: the control net)."""
    if hook is None:
        return []
    found = hook_cache_modules(hook) + [v for v in vars(hook).values() if isinstance(v, nn.Module)]
    return list({id(m): m for m in found}.values())


def weights_key(*modules: nn.Module | None) -> tuple:
    """Identity of every parameter and buffer the captured graphs read by address: per tensor its owner module, name,
    tensor type, device, dtype, shape and storage address. ``.to()`` (new tensors), loading with ``assign=True``,
    replacing a parameter and FSDP wrapping (flat or DTensor parameters) change it; in-place updates (optimizer
    steps, ``load_state_dict`` copies) do not, and the graphs read their new values at replay."""
    out = []
    for m in modules:
        if m is None:
            continue
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            out.append((id(m), name, type(t).__name__, str(t.device), t.dtype, tuple(t.shape), _address(t)))
    return tuple(out)


def sharded_reason(modules: Sequence[nn.Module | None]) -> str | None:
    """The first FSDP-wrapped (or parameter-freed) module among ``modules`` and their children, else None."""
    for root in modules:
        if root is None:
            continue
        for name, m in root.named_modules():
            if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for c in type(m).__mro__):
                return f"{type(root).__name__}.{name or '<root>'} is FSDP-wrapped"
        for name, p in root.named_parameters():
            addr = _address(p)
            if isinstance(addr, tuple) and addr[2] == 0 and p.numel() > 0:
                return f"{type(root).__name__}.{name} has no storage (sharded or freed)"
    return None


class _GraphStore(dict):
    """``config key → (weights key, sampler)`` of one model; copies and pickles of the model start empty."""

    def __deepcopy__(self, memo: dict) -> _GraphStore:
        return _GraphStore()

    def __reduce__(self):
        return _GraphStore, ()


def graph_store(model: nn.Module) -> _GraphStore:
    """The captured samplers of ``model`` (created on first use)."""
    store = model.__dict__.get(GRAPH_ATTR)
    if store is None:
        store = model.__dict__[GRAPH_ATTR] = _GraphStore()
    return store


def cached_sampler(model: nn.Module, config: tuple, weights: tuple,
                   build: Callable[[], StaticCFGSampler]) -> StaticCFGSampler:
    """The sampler cached under ``config`` if it was built for the same ``weights`` key, else a new one from
    ``build`` (replacing a stale one, so its graphs and memory pool are released)."""
    store = graph_store(model)
    hit = store.get(config)
    if hit is not None and hit[0] == weights:
        return hit[1]
    store.pop(config, None)
    smp = build()
    store[config] = (weights, smp)
    return smp


def clear_graphs(model: nn.Module) -> None:
    """Drop the captured samplers of ``model`` (their graphs and memory pools)."""
    model.__dict__.pop(GRAPH_ATTR, None)


def static_sampler(model: nn.Module, B: int, vqvae: nn.Module, *, cfg: float, top_k: int, top_p: float,
                   temperatures: Sequence[float], hook: HookFn | None = None, return_logits: bool = False,
                   sampler: str = "static", compile_kw: dict | None = None) -> StaticCFGSampler:
    """A :class:`StaticCFGSampler` for this configuration: a fresh one (``static``), or for ``graph`` the one cached
    on ``model`` under (batch, settings, autocast, device, hook key, VQVAE, compile kwargs) whose
    :func:`weights_key` of the model, the VQVAE and the hook's modules is unchanged; FSDP-wrapped modules are
    refused (their parameters move between calls)."""
    if sampler not in SAMPLERS[1:]:
        raise ValueError(f"sampler must be {'|'.join(SAMPLERS)}, got {sampler!r}")
    kw = {"cfg": cfg, "top_k": top_k, "top_p": top_p, "temperatures": tuple(temperatures), "hook": hook,
          "return_logits": return_logits, "compile_kw": compile_kw}
    if sampler == "static":
        return StaticCFGSampler(model, vqvae, B, **kw)
    dev = model.lvl_1L.device
    if dev.type != "cuda":
        raise ValueError(f"sampler='graph' needs the model on a CUDA device, not {dev}")
    if hook is not None and not callable(getattr(hook, "static_key", None)):
        raise ValueError("sampler='graph' needs a hook with static_key/static_clone/load_inputs_ (see VARHook)")
    mods = [model, vqvae, *hook_modules(hook)]
    why = sharded_reason(mods)
    if why is not None:
        raise ValueError(f"sampler='graph' cannot capture sharded weights ({why}); use sampler='static' or "
                         "sample with unsharded modules")
    ac = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
    config = (B, id(vqvae), cfg, top_k, top_p, tuple(temperatures), return_logits, ac, str(dev),
              None if hook is None else hook.static_key(), repr(sorted((compile_kw or {}).items())))
    return cached_sampler(model, config, weights_key(*mods),
                          lambda: StaticCFGSampler(model, vqvae, B, cuda_graph=True, **kw))


# ----------------------------------------------------------------------------- entry
@torch.no_grad()
def sample_cfg(model: nn.Module, B: int, labels: Tensor | int | None = None, *, vqvae: nn.Module,
               g_seed: int | None = None, generator: torch.Generator | None = None, cfg: float = 1.5,
               top_k: int = 900, top_p: float = 0.96, temperature_schedule: float | Sequence[float] | None = None,
               hook: HookFn | None = None, return_logits: bool = False, decode: bool = True, sampler: str = "eager",
               sampler_compile: dict | None = None, more_smooth: bool = False):
    """KV-cached CFG sampling (spec §3.7 + ECM temperature §2.4). Rows [0, B) use ``labels``, rows [B, 2B) the null
    class. Per scale: raw logits → (1+t)·cond − t·uncond, t = cfg·si/(K−1) → ÷ T_si → top-k/top-p → a draw with
    ``generator`` (or a fresh one seeded by ``g_seed``).

    ``sampler``: ``eager`` | ``static`` | ``graph`` (module docstring); all three give the same tokens from the same
    generator. ``sampler_compile``: ``torch.compile`` kwargs for the per-scale step of ``static``/``graph`` (one graph
    per scale; inductor's fusions change float rounding, so tokens may then differ from ``eager``).
    ``more_smooth`` (eager only; the official option, for visualisation, not FID): see :func:`sample_eager`.

    Returns images in [0, 1] (or f̂ if ``decode=False``); with ``return_logits`` a tuple
    ``(img, idx_list[(B, pn²)], raw_logits_list[(2B, pn², V) fp32, before CFG])``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be {'|'.join(SAMPLERS)}, got {sampler!r}")
    if more_smooth and sampler != "eager":
        raise ValueError(f"more_smooth=True needs sampler='eager', got sampler={sampler!r}")
    labels, rng = resolve_labels(model, B, labels, g_seed, generator)
    temps = resolve_temperatures(temperature_schedule, len(model.patch_nums))
    if sampler == "eager":
        f_hat, idx_list, logits_list = sample_eager(model, vqvae, labels, rng, cfg=cfg, top_k=top_k, top_p=top_p,
                                                    temperatures=temps, hook=hook, return_logits=return_logits,
                                                    more_smooth=more_smooth)
    else:
        run = static_sampler(model, B, vqvae, cfg=cfg, top_k=top_k, top_p=top_p, temperatures=temps, hook=hook,
                             return_logits=return_logits, sampler=sampler, compile_kw=sampler_compile)
        f_hat, idx_list, logits_list = run(labels, rng, hook)
    out = vqvae.fhat_to_img(f_hat).float().add_(1).mul_(0.5) if decode else f_hat
    return (out, idx_list, logits_list) if return_logits else out
