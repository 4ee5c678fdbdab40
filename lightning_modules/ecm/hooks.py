"""The VAR hook protocol: how ECM's adapters (and any other steering network) plug into a frozen VAR.

``hook`` is any callable ``hook(block_idx, h, cond_BD, attn_bias) -> h`` called after every block (``attn_bias`` is
the sliced block-causal mask in teacher forcing, ``None`` in KV-cached sampling, where ``h`` holds only the current
scale's rows). Optional methods are called when present (see :class:`VARHook`): ``prepare(bg, ed) -> Tensor | None``
once per forward (bg = 0) or per sampled scale, returning an additive term for the input embeddings x_0 of positions
[bg, ed); ``kv_caching(enable, max_len)`` around sampling.

The static / CUDA-graph samplers (:mod:`ctrlgen.lightning_modules.ecm.samplers`) also need ``cache_modules()`` (the
hook's own :class:`~ctrlgen.lightning_modules.ecm.layers.SelfAttention` modules, with ``cache_rows(rows)`` if they
cache fewer rows than the VAR), and for graphs ``static_key()``, ``static_clone()`` and ``load_inputs_(hook)``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

HookFn = Callable[[int, Tensor, Tensor, "Tensor | None"], Tensor]


class VARHook:
    """Optional base class documenting the hook protocol; plain callables work too."""

    def prepare(self, bg: int, ed: int) -> Tensor | None:  # additive term for x_0[:, bg:ed]
        return None

    def kv_caching(self, enable: bool, max_len: int | None = None) -> None:
        pass

    # ---- static / CUDA-graph sampling (optional; without them only the eager sampler takes the hook)
    def cache_modules(self) -> list[nn.Module]:  # own KV-caching SelfAttention modules
        return []

    def cache_rows(self, rows: int) -> int:  # batch rows those modules cache when the VAR runs ``rows`` rows
        return rows

    def static_key(self) -> tuple:  # hashable: hooks with equal keys can share one captured sampler
        raise self._no_graph("static_key")

    def static_clone(self) -> VARHook:  # same hook on fresh tensor buffers (captured by address)
        raise self._no_graph("static_clone")

    def load_inputs_(self, other: VARHook) -> None:  # copy ``other``'s tensors into this clone's buffers
        raise self._no_graph("load_inputs_")

    def _no_graph(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} does not implement {method}(): it works with "
                                   "sampler='eager' or 'static'; sampler='graph' needs static_key, static_clone and "
                                   "load_inputs_ (see ECMHook)")

    def __call__(self, block_idx: int, h: Tensor, cond_BD: Tensor, attn_bias: Tensor | None) -> Tensor:
        return h


def hook_cache_modules(hook: object | None) -> list[nn.Module]:
    """The hook's KV-caching modules; a hook that caches (its own ``kv_caching``) must list them (``cache_modules``)."""
    if hook is None:
        return []
    mods = getattr(hook, "cache_modules", None)
    kv = getattr(type(hook), "kv_caching", None)
    own_kv = kv is not None and kv is not VARHook.kv_caching
    if own_kv and (mods is None or getattr(type(hook), "cache_modules", None) is VARHook.cache_modules):
        raise ValueError(f"{type(hook).__name__} has kv_caching() but no cache_modules(): the static sampler "
                         "needs the hook's KV-caching modules")
    return list(mods()) if mods is not None else []
