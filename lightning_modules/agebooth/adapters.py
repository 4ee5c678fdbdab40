"""Age LoRAs on a model: load young/old LoRA files, materialise one fused adapter per α (agebooth.md §9).

- :func:`load_age_lora`: ``{module path: LoraFactors}`` from a diffusers ``save_lora_weights`` / :func:`export_lora`
  file or AgeBooth's released files (``unet.<path>.to_q.lora.down.weight`` / ``.lora.up.weight``, scale 1).
- :class:`AgeFusion`: holds the two LoRAs and the fusion settings; caches SVDMix's factor SVDs once per pair; ``apply``
  writes the fused factors for one α into one ordinary peft adapter (``age_mix``, weight 1; in place when the ranks
  allow, so repeated α's re-inject nothing) or adds ΔW(α) into the base weights from a kept copy (``merge=True``);
  the UNet then runs its ordinary forward — no SVD and no dense ΔW inside any UNet call. ``save`` writes the fused
  adapter in diffusers' LoRA format (``pipe.load_lora_weights(dir, weight_name=..., adapter_name=...)``).
- :func:`activate`: set the active adapters and assert they are active (``load_lora_weights`` activates only the
  adapter it just loaded, and IP-Adapter-FaceID loading switches every other adapter off).

Restoring merged weights copies the kept originals back (bit-exact); a fuse/unfuse cycle would leave rounding drift
(≈ 7e-7 per cycle measured on fp32 weights).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from ctrlgen.lightning_modules.agebooth import fusion
from ctrlgen.lightning_modules.common.lora import (
    LoraFactors,
    adapter_names,
    add_lora_factors,
    export_lora,
    model_lora_factors,
    read_lora_factors,
    set_adapter_weights,
    set_lora_factors,
    tuner_layers,
)
from torch import nn

MIX_ADAPTER = "age_mix"


def load_age_lora(source: str | os.PathLike | dict[str, torch.Tensor], prefix: str = "unet",
                  dtype: torch.dtype | None = torch.float32) -> dict[str, LoraFactors]:
    """One age LoRA as factors (``read_lora_factors`` on the UNet component; any supported key style)."""
    factors = read_lora_factors(source, prefix)
    if dtype is not None:
        factors = {p: LoraFactors(f.down.to(dtype), f.up.to(dtype), f.scale) for p, f in factors.items()}
    return factors


def activate(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate exactly ``weights`` (``{adapter: weight}``) and check that peft reports them active."""
    set_adapter_weights(model, weights)
    active = set()
    for _, layer in tuner_layers(model):
        active.update(layer.active_adapters)
    if not set(weights) <= active:
        raise RuntimeError(f"adapters {sorted(set(weights) - active)} are not active after activation "
                           f"(active: {sorted(active)})")


def _base_linear(model: nn.Module, path: str) -> nn.Linear:
    m = model.get_submodule(path)
    m = m.get_base_layer() if hasattr(m, "get_base_layer") else m
    if not isinstance(m, nn.Linear):
        raise KeyError(f"layer {path!r} of {type(model).__name__} is {type(m).__name__}, expected an nn.Linear")
    return m


def _padded(f: LoraFactors, rank: int) -> LoraFactors:
    """The same ΔW with zero rows/columns appended up to ``rank``."""
    k = rank - f.rank
    if k == 0:
        return f
    return LoraFactors(torch.cat([f.down, f.down.new_zeros(k, f.down.shape[1])]),
                       torch.cat([f.up, f.up.new_zeros(f.up.shape[0], k)], 1), f.scale)


def _delete_adapter(model: nn.Module, name: str) -> None:
    with warnings.catch_warnings():  # the caller activates the replacement adapter next
        warnings.filterwarnings("ignore", message=".*was active which is now deleted")
        for _, layer in tuner_layers(model):
            if name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(name)
    model.peft_config.pop(name, None)


class AgeFusion:
    """Fusion of a young and an old LoRA (same layers) for any α; the state lives on this object, never in a global.

    ``mode``: ``linear`` | ``svdmix`` | ``peft_svd`` (see :mod:`.fusion`); ``svd_dtype``/``svd_device``/``sign_fix``:
    SVDMix's SVD settings; ``adapter``: name of the materialised adapter.
    """

    def __init__(self, young: dict[str, LoraFactors], old: dict[str, LoraFactors], mode: str = "linear",
                 svd_dtype: torch.dtype = torch.float64, svd_device: str | torch.device = "cpu",
                 sign_fix: str = "none", adapter: str = MIX_ADAPTER):
        if mode not in fusion.MODES:
            raise ValueError(f"fusion mode {mode!r} unknown; expected one of {fusion.MODES}")
        fusion.linear_fusion(young, old, 1.0)  # validates the pair once
        self.young, self.old, self.mode, self.adapter = young, old, mode, adapter
        self.svd_kwargs = {"svd_dtype": svd_dtype, "svd_device": svd_device, "sign_fix": sign_fix}
        self._svds: tuple[dict, dict] | None = None
        self._kept: dict[str, torch.Tensor] = {}
        self._disabled: list[nn.Module] = []

    @classmethod
    def from_files(cls, young: str | os.PathLike, old: str | os.PathLike, prefix: str = "unet", **kwargs) -> AgeFusion:
        return cls(load_age_lora(young, prefix), load_age_lora(old, prefix), **kwargs)

    def factors(self, alpha: float, mode: str | None = None) -> dict[str, LoraFactors]:
        """The fused factors for ``alpha`` (scale 1); SVDMix reuses the SVDs computed on its first call."""
        mode = mode or self.mode
        if mode != "svdmix":
            return fusion.fuse(self.young, self.old, alpha, mode)
        if self._svds is None:
            self._svds = (fusion.factor_svds(self.young, **self.svd_kwargs),
                          fusion.factor_svds(self.old, **self.svd_kwargs))
        return fusion.svdmix(self.young, self.old, alpha, svds=self._svds)

    def apply(self, model: nn.Module, alpha: float, mode: str | None = None, merge: bool = False) -> None:
        """Materialise the fusion for ``alpha`` on ``model`` once: as adapter ``self.adapter`` with weight 1 (other
        adapters deactivated), or with ``merge`` as ΔW(α) added to the base weights (all adapters disabled). A
        previous merged ``apply`` is restored first."""
        self.restore(model)
        factors = {p: f.folded() for p, f in self.factors(alpha, mode).items()}
        if merge:
            self._merge(model, factors)
            return
        if self.adapter in adapter_names(model):
            have = {p: f.rank for p, f in model_lora_factors(model, self.adapter).items()}
            if set(have) == set(factors) and all(f.rank <= have[p] for p, f in factors.items()):
                set_lora_factors(model, {p: _padded(f, have[p]) for p, f in factors.items()}, self.adapter)
                activate(model, {self.adapter: 1.0})
                return
            _delete_adapter(model, self.adapter)
        add_lora_factors(model, factors, self.adapter, trainable=False)
        activate(model, {self.adapter: 1.0})

    def _merge(self, model: nn.Module, factors: dict[str, LoraFactors]) -> None:
        self._disabled = [layer for _, layer in tuner_layers(model) if not layer.disable_adapters]
        for layer in self._disabled:
            layer.enable_adapters(False)
        with torch.no_grad():
            for path, f in factors.items():
                w = _base_linear(model, path).weight
                self._kept[path] = w.detach().clone()
                w.copy_((w.float() + f.delta().to(device=w.device, dtype=torch.float32)).to(w.dtype))

    def restore(self, model: nn.Module) -> None:
        """Undo a merged ``apply``: copy the kept base weights back (bit-exact) and re-enable the adapters."""
        with torch.no_grad():
            for path, w in self._kept.items():
                _base_linear(model, path).weight.copy_(w)
        for layer in self._disabled:
            layer.enable_adapters(True)
        self._kept, self._disabled = {}, []

    def save(self, path: str | os.PathLike, model: nn.Module, prefix: str = "unet",
             dtype: torch.dtype | None = None) -> Path:
        """Write the materialised adapter of ``model`` (after a non-merged ``apply``) in diffusers' LoRA format;
        ``path``: a ``.safetensors`` file or a directory. Returns the file."""
        if self.adapter not in adapter_names(model):
            raise KeyError(f"no materialised adapter {self.adapter!r} in {type(model).__name__}; call "
                           f"apply(model, alpha) without merge first")
        return export_lora(path, {prefix: model}, self.adapter, dtype=dtype)
