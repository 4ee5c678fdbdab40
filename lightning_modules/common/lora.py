"""LoRA adapters (peft) on any ``nn.Module``: diffusers UNets/transformers, transformers text encoders, plain torch.

- :func:`add_lora` injects a named adapter (several per model: AgeBooth's ``"young"``/``"old"``) into the modules
  whose names match ``targets`` (peft ``target_modules`` rules: a list matches name suffixes, a string is a regex),
  with rank/alpha/dropout/init from config; afterwards the new adapter is the active one and its LoRA parameters are
  the only trainable ones in the model. ``seed`` fixes the initial A (bands of one run start from the same A).
- :func:`lora_state_dict` / :func:`load_lora_state_dict`: one adapter's weights without the adapter name in the keys
  (peft ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, the format diffusers reads).
- :func:`export_lora` writes one safetensors file in diffusers' LoRA format (keys ``<component>.<module>.lora_A.weight``,
  the peft config per component in the ``lora_adapter_metadata`` header), loadable by a pipeline's
  ``load_lora_weights(dir, weight_name=...)`` or ``UNet2DConditionModel.load_lora_adapter(file, prefix="unet")``;
  :func:`load_lora_file` reads it back into any module.
- :func:`set_adapter_weights`: several adapters active at once, each scaled (diffusers ``set_adapters`` semantics:
  output = base + Σ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ·x), done with peft's layer API so it works on any module.
- :func:`merge_lora` / :func:`unmerge_lora`: fold active adapters into the base weights and back (peft ``merge``).
- :class:`LoraFactors`, :func:`read_lora_factors`, :func:`lora_factors_state_dict`, :func:`model_lora_factors`,
  :func:`add_lora_factors`, :func:`set_lora_factors`: per-layer ``(down, up, scale)`` factors read from any common
  LoRA key style (peft/diffusers, diffusers ≤ 0.24 ``lora.down``/``lora.up``, attention processors), written back in
  the peft or legacy style, and loaded onto exactly the named layers of a model (new adapter or in place).

Inject adapters in the LightningModule's ``__init__`` so checkpoints (which keep the LoRA keys of frozen bases, see
``BaseGenModule.on_save_checkpoint``) load into a module that already has them. A model that gets a trainable adapter
is a frozen component (``common/frozen.freeze``) whose adapter trains.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ctrlgen.lightning_modules.common.frozen import freeze

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name


def lora_config(targets: Sequence[str] | str, r: int = 4, alpha: float | None = None, dropout: float = 0.0,
                init: bool | str = "gaussian", **kwargs: Any):
    """A ``peft.LoraConfig``; ``alpha`` defaults to ``r`` (scale 1, the diffusers training scripts' choice)."""
    from peft import LoraConfig

    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(r=r, lora_alpha=r if alpha is None else alpha, lora_dropout=dropout, init_lora_weights=init,
                      target_modules=targets, **kwargs)


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft-wrapped layer in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return ((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}))


def is_lora_key(key: str, adapter: str | None = None) -> bool:
    """A state-dict/parameter name of a LoRA weight (of ``adapter`` when given)."""
    if ".lora_" not in key:
        return False
    return adapter is None or f".{adapter}." in key or key.endswith(f".{adapter}")


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if is_lora_key(n, adapter))


def set_trainable_adapters(model: nn.Module, adapters: str | Sequence[str] | None) -> int:
    """``requires_grad`` True exactly on the LoRA parameters of ``adapters`` (None: none), False on everything else in
    ``model``, whose base becomes a frozen component (``common/frozen.freeze``: eval mode but for the trainable
    adapters' dropout, out of optimizer and checkpoints; a recorded source is kept); returns the number of trainable
    elements."""
    names = [adapters] if isinstance(adapters, str) else list(adapters or [])
    for key, p in lora_parameters(model):
        p.requires_grad_(any(is_lora_key(key, a) for a in names))
    freeze(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _activate(model: nn.Module, names: list[str]) -> None:
    grads = {id(p): p.requires_grad for p in model.parameters()}  # peft's set_adapter also flips requires_grad
    for _, layer in tuner_layers(model):
        layer.set_adapter(names)
    for p in model.parameters():
        p.requires_grad_(grads[id(p)])


def add_lora(model: nn.Module, targets: Sequence[str] | str, adapter: str = "default", r: int = 4,
             alpha: float | None = None, dropout: float = 0.0, init: bool | str = "gaussian", seed: int | None = None,
             dtype: torch.dtype | None = torch.float32, trainable: bool = True, **config: Any) -> nn.Module:
    """Inject adapter ``adapter`` into ``model`` in place and make it the active one; with ``trainable`` its LoRA
    parameters become the only trainable ones (other adapters and the base are frozen). ``dtype``: the LoRA weights'
    dtype (fp32 by default, also over an fp16/bf16 base); ``config``: more ``LoraConfig`` fields. Returns ``model``."""
    from peft import inject_adapter_in_model

    if adapter in adapter_names(model):
        raise ValueError(f"adapter {adapter!r} already exists in {type(model).__name__}; pick another name")
    cfg = lora_config(targets, r, alpha, dropout, init, **config)
    with torch.random.fork_rng(devices=[]):  # the seed fixes A without touching the run's RNG stream
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():  # several named adapters per model are intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(cfg, model, adapter_name=adapter)
    if not any(True for _ in lora_parameters(model, adapter)):
        raise ValueError(f"LoRA targets {targets!r} match no module of {type(model).__name__}")
    if any(c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers") for c in type(model).__mro__):
        model._hf_peft_config_loaded = True  # diffusers' own set_adapters / fuse_lora / save_lora_adapter then work
    if dtype is not None:
        for _, p in lora_parameters(model, adapter):
            p.data = p.data.to(dtype)
    _activate(model, [adapter])
    if trainable:
        set_trainable_adapters(model, adapter)
    else:
        for _, p in lora_parameters(model, adapter):
            p.requires_grad_(False)
    return model


def lora_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, keys without the adapter name (``...to_q.lora_A.weight``), detached copies."""
    from peft.utils import get_peft_model_state_dict

    if adapter not in adapter_names(model):
        raise KeyError(f"no adapter {adapter!r} in {type(model).__name__} (has {adapter_names(model)})")
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Load :func:`lora_state_dict` output into the existing adapter ``adapter``; every LoRA weight of the adapter must
    be given and every given key must be used (else ``KeyError`` with the keys)."""
    from peft.utils import set_peft_model_state_dict

    if adapter not in adapter_names(model):
        raise KeyError(f"no adapter {adapter!r} in {type(model).__name__} (has {adapter_names(model)})")
    res = set_peft_model_state_dict(model, state_dict, adapter_name=adapter)
    missing = [k for k in res.missing_keys if is_lora_key(k, adapter)]
    if missing or res.unexpected_keys:
        raise KeyError(f"LoRA state dict for adapter {adapter!r} does not match {type(model).__name__}: "
                       f"missing {missing[:5]} ({len(missing)}), unexpected {list(res.unexpected_keys)[:5]} "
                       f"({len(res.unexpected_keys)})")


def _config_dict(model: nn.Module, adapter: str) -> dict[str, Any]:
    d = model.peft_config[adapter].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def export_lora(path: str | os.PathLike, modules: dict[str, nn.Module], adapter: str = "default",
                dtype: torch.dtype | None = None) -> Path:
    """Write adapter ``adapter`` of each ``{component: module}`` (``{"unet": unet, "text_encoder": te}``) to one
    safetensors file in diffusers' format; ``path`` is the file (``.safetensors``) or a directory (then
    ``pytorch_lora_weights.safetensors`` inside). Returns the file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for prefix, module in modules.items():
        for k, v in lora_state_dict(module, adapter).items():
            tensors[f"{prefix}.{k}"] = (v if dtype is None else v.to(dtype)).contiguous()
        meta.update({f"{prefix}.{k}": v for k, v in _config_dict(module, adapter).items()})
    save_file(tensors, str(path), metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def load_lora_file(path: str | os.PathLike, modules: dict[str, nn.Module], adapter: str = "default",
                   trainable: bool = False) -> None:
    """Inverse of :func:`export_lora`: inject ``adapter`` (config from the file's header) into each module and load
    its weights. A module whose prefix has no keys in the file is an error."""
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} not found (write it with export_lora)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY) or "{}")
    tensors = load_file(str(path))
    for prefix, module in modules.items():
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        cfg = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        if not sd or not cfg:
            raise KeyError(f"{str(path)!r} has no LoRA weights or config for component {prefix!r}")
        known = LoraConfig.__dataclass_fields__
        cfg = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k not in ("peft_type", "task_type")})
        add_lora(module, cfg.target_modules, adapter, cfg.r, cfg.lora_alpha, cfg.lora_dropout, False,
                 trainable=trainable, **{k: getattr(cfg, k) for k in ("rank_pattern", "alpha_pattern", "use_rslora")})
        load_lora_state_dict(module, sd, adapter)


def set_adapter_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in ``weights``, each scaled by its weight (1.0 = as trained); ``requires_grad``
    is left as it was. AgeBooth's linear fusion: ``{"young": a, "old": 1 - a}``."""
    names = list(weights)
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise KeyError(f"unknown adapters {unknown} in {type(model).__name__} (has {adapter_names(model)})")
    _activate(model, names)
    for _, layer in tuner_layers(model):
        for name, w in weights.items():
            layer.set_scale(name, float(w))


def merge_lora(model: nn.Module, adapters: Sequence[str] | None = None, safe: bool = True) -> None:
    """Fold ``adapters`` (default: the active ones, at their current scales) into the base weights; the LoRA path is
    then skipped. ``safe`` checks the merged weights for NaNs first."""
    for _, layer in tuner_layers(model):
        layer.merge(safe_merge=safe, adapter_names=None if adapters is None else list(adapters))


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (exact up to float rounding)."""
    for _, layer in tuner_layers(model):
        layer.unmerge()


def lora_param_count(model: nn.Module, adapter: str | None = None) -> int:
    return sum(p.numel() for _, p in lora_parameters(model, adapter))


# ----------------------------------------------------------------------------------- LoRA factors and key formats
# A LoRA file names each adapted linear by its module path under a component prefix (``unet.``, ``text_encoder.``).
# Key styles read here (all describe ΔW = scale · up @ down, down (r, in), up (out, r)):
#   peft / diffusers ≥ 0.25   <prefix>.<path>.lora_A.weight, <prefix>.<path>.lora_B.weight
#                             (``save_lora_weights``, :func:`export_lora`; lora_alpha from the metadata header, else r)
#   diffusers ≤ 0.24          <prefix>.<path>.lora.down.weight, <prefix>.<path>.lora.up.weight
#                             (``LoRACompatibleLinear``, the format AgeBooth's released LoRAs use; no alpha: scale 1)
#   attention processors      <prefix>.<block>.processor.to_q_lora.down.weight (``to_out_lora`` → ``to_out.0``)
#   optional network alpha    <prefix>.<path>.alpha (scale = alpha / r)
_FACTOR_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                    ".lora.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up"}


class LoraFactors(NamedTuple):
    """One adapted linear: ``ΔW = scale · up @ down`` with ``down`` (r, in) and ``up`` (out, r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense ``(out, in)`` ΔW."""
        return self.scale * (self.up @ self.down)

    def folded(self) -> LoraFactors:
        """The same ΔW with ``scale`` folded into ``down`` (scale 1)."""
        return self if self.scale == 1.0 else LoraFactors(self.down * self.scale, self.up, 1.0)


def _layer_path(key: str) -> tuple[str, str] | None:
    """``(module path, "down" | "up" | "alpha")`` of a LoRA key without its component prefix, else None."""
    for suffix, kind in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            break
    else:
        if not key.endswith(".alpha"):
            return None
        path, kind = key[: -len(".alpha")], "alpha"
    if ".processor." in path:  # <block>.processor.to_q_lora → <block>.to_q
        block, proc = path.split(".processor.", 1)
        path = f"{block}.{'to_out.0' if proc == 'to_out' else proc}"
    return path, kind


def read_lora_factors(source: str | os.PathLike | dict[str, torch.Tensor], prefix: str | None = "unet",
                      metadata: dict[str, Any] | None = None) -> dict[str, LoraFactors]:
    """``{module path: LoraFactors}`` of component ``prefix`` from a LoRA safetensors file (or a directory holding
    ``pytorch_lora_weights.safetensors``) or a state dict, in any key style listed above. ``prefix=None``: keys carry
    no component prefix (a peft ``get_peft_model_state_dict`` dict). Scales: a ``.alpha`` key, else ``lora_alpha`` /
    ``alpha_pattern`` from the diffusers metadata header (or ``metadata``), else 1. Keys of other components are
    skipped; an unknown key under ``prefix``, a factor without its partner or mismatched ranks raise ``KeyError``."""
    where = "state dict"
    if not isinstance(source, dict):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(source)
        path = path / LORA_WEIGHT_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {str(path)!r} not found (a .safetensors file or a directory holding "
                                    f"{LORA_WEIGHT_NAME})")
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY) or "{}")
        metadata = metadata if metadata is not None else header
        source, where = load_file(str(path)), repr(str(path))
    pre = f"{prefix}." if prefix else ""
    meta = {k[len(pre):]: v for k, v in (metadata or {}).items() if k.startswith(pre)}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        if not key.startswith(pre):
            continue
        parsed = _layer_path(key[len(pre):])
        if parsed is None:
            raise KeyError(f"{where}: key {key!r} is not a LoRA factor (expected <path>.lora_A/lora_B.weight or "
                           f"<path>.lora.down/up.weight under {pre or 'no prefix'!r}); drop it or pick another prefix")
        parts.setdefault(parsed[0], {})[parsed[1]] = value
    if not parts:
        prefixes = sorted({k.split(".", 1)[0] for k in source})
        raise KeyError(f"{where}: no LoRA keys under prefix {prefix!r} (top-level names found: {prefixes[:8]}); "
                       f"pass prefix= one of them, or prefix=None for keys without a component prefix")
    out = {}
    for path, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise KeyError(f"{where}: layer {pre}{path} has {sorted(p)} but needs both a down/lora_A and an "
                           f"up/lora_B weight")
        down, up = p["down"], p["up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise KeyError(f"{where}: layer {pre}{path}: down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                           f"(r, in) and (out, r) with one r (conv LoRAs are not supported)")
        r = down.shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else float(meta.get("lora_alpha", r))
        if "alpha" not in p:
            for pattern, a in (meta.get("alpha_pattern") or {}).items():  # peft's rule: a regex on the path's tail
                if re.match(rf"(.*\.)?({pattern})$", path):
                    alpha = float(a)
        out[path] = LoraFactors(down, up, alpha / (math.sqrt(r) if meta.get("use_rslora") else r))
    return out


def lora_factors_state_dict(factors: dict[str, LoraFactors], prefix: str | None = "unet",
                            style: str = "peft") -> dict[str, torch.Tensor]:
    """Inverse of :func:`read_lora_factors` with each scale folded into ``down`` (so every reader sees scale 1).
    ``style``: ``"peft"`` (``lora_A``/``lora_B``, what ``load_lora_weights`` and :func:`load_lora_file` read) or
    ``"legacy"`` (diffusers ≤ 0.24 ``lora.down``/``lora.up``, AgeBooth's released format)."""
    names = {"peft": (".lora_A.weight", ".lora_B.weight"), "legacy": (".lora.down.weight", ".lora.up.weight")}
    if style not in names:
        raise ValueError(f"style {style!r} unknown; expected one of {sorted(names)}")
    pre = f"{prefix}." if prefix else ""
    sd = {}
    for path, f in factors.items():
        f = f.folded()
        sd[pre + path + names[style][0]] = f.down.contiguous()
        sd[pre + path + names[style][1]] = f.up.contiguous()
    return sd


def model_lora_factors(model: nn.Module, adapter: str = "default") -> dict[str, LoraFactors]:
    """``{module path: LoraFactors}`` of adapter ``adapter`` as injected in ``model`` (scale = peft's scaling)."""
    out = {}
    for name, layer in tuner_layers(model):
        if adapter in getattr(layer, "lora_A", {}):
            out[name] = LoraFactors(layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                                    float(layer.scaling[adapter]))
    if not out:
        raise KeyError(f"no adapter {adapter!r} in {type(model).__name__} (has {adapter_names(model)})")
    return out


def add_lora_factors(model: nn.Module, factors: dict[str, LoraFactors], adapter: str, trainable: bool = False,
                     dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Inject adapter ``adapter`` on exactly the linears named in ``factors`` (full module paths) and load the factors
    (rank and scale per layer, through peft ``rank_pattern``/``alpha_pattern``); the adapter becomes the active one.
    A path that is not a linear of ``model`` or a shape mismatch raises ``KeyError`` naming the layer."""
    modules = dict(model.named_modules())
    for path, f in factors.items():
        m = modules.get(path)
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        if not isinstance(base, nn.Linear):
            raise KeyError(f"LoRA layer {path!r} is {'missing' if m is None else type(base).__name__} in "
                           f"{type(model).__name__}, expected an nn.Linear; check the file's component prefix")
        want = (base.out_features, base.in_features)
        if (f.up.shape[0], f.down.shape[1]) != want:
            raise KeyError(f"LoRA layer {path!r}: factors give ΔW {(f.up.shape[0], f.down.shape[1])}, the model's "
                           f"linear is {want}; the LoRA was trained for another model")
    if any(adapter in path for path in factors):
        raise ValueError(f"adapter name {adapter!r} is a substring of a LoRA layer's module path; peft then "
                         f"misreads its keys (false missing keys); pick a name such as 'young', 'old', 'age_mix'")
    ranks = {p: f.rank for p, f in factors.items()}
    r = max(ranks.values())
    alphas = {p: f.scale * f.rank for p, f in factors.items()}
    add_lora(model, sorted(factors), adapter, r=r, alpha=float(r), init=False, trainable=trainable, dtype=dtype,
             rank_pattern={p: k for p, k in ranks.items() if k != r},
             alpha_pattern={p: a for p, a in alphas.items() if a != float(r)})
    set_lora_factors(model, factors, adapter)
    return model


def set_lora_factors(model: nn.Module, factors: dict[str, LoraFactors], adapter: str) -> None:
    """Copy ``factors`` in place into the existing adapter ``adapter`` (no re-injection): same layers, same ranks;
    each factor's scale must equal the adapter's scaling on that layer (fold scales first for an adapter made with
    scale 1). Mismatches raise ``KeyError``/``ValueError`` naming the layer."""
    layers = {n: m for n, m in tuner_layers(model) if adapter in getattr(m, "lora_A", {})}
    if set(layers) != set(factors):
        extra, missing = sorted(set(factors) - set(layers)), sorted(set(layers) - set(factors))
        raise KeyError(f"adapter {adapter!r}: factors for {extra[:3]} ({len(extra)}) have no layer, layers "
                       f"{missing[:3]} ({len(missing)}) have no factors; inject the adapter for these layers first")
    with torch.no_grad():
        for path, f in factors.items():
            a, b = layers[path].lora_A[adapter].weight, layers[path].lora_B[adapter].weight
            if a.shape != f.down.shape or b.shape != f.up.shape:
                raise ValueError(f"adapter {adapter!r} layer {path!r}: has A {tuple(a.shape)}, B {tuple(b.shape)}, "
                                 f"got down {tuple(f.down.shape)}, up {tuple(f.up.shape)}; re-inject for a new rank")
            scaling = float(layers[path].scaling[adapter])
            if abs(scaling - f.scale) > 1e-12 * max(1.0, abs(f.scale)):
                raise ValueError(f"adapter {adapter!r} layer {path!r}: scaling {scaling} != factor scale {f.scale}")
            a.copy_(f.down)
            b.copy_(f.up)
