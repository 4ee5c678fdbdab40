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

Inject adapters in the LightningModule's ``__init__`` so checkpoints (which keep the LoRA keys of frozen bases, see
``BaseGenModule.on_save_checkpoint``) load into a module that already has them. A model that gets a trainable adapter
is a frozen component (``common/frozen.freeze``) whose adapter trains.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
