"""Frozen pretrained bases from local ``save_pretrained`` directories (never a hub id, nothing is downloaded).

One function, :func:`load_frozen`, for every kind the methods need: diffusers models (``UNet2DConditionModel``,
``AutoencoderKL``, ...), diffusers schedulers, whole diffusers pipelines (``model_index.json``), transformers models
and tokenizers. The class decides the marker file that :func:`require_pretrained_dir` checks, so a wrong path fails
before loading with the directory, the missing file and what to save there::

    unet = load_frozen("UNet2DConditionModel", "/models/sdxl", subfolder="unet", dtype="fp16", device="cuda")
    te = load_frozen("transformers.CLIPTextModel", "/models/sdxl/text_encoder")
    pipe = load_frozen("StableDiffusionXLPipeline", "/models/sdxl", dtype="bf16")

Modules come back as frozen components (``common/frozen.freeze``: eval mode kept through ``train()``, no grads, out of
optimizer and checkpoints, provenance = path + sha256 of the directory's weight files; pipelines: every ``nn.Module``
component, each with its subfolder); schedulers and tokenizers have no weights and come back as loaded.
``local_files_only=True`` is always passed, so ``HF_HUB_OFFLINE`` and an offline machine behave alike.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrlgen.lightning_modules.common.frozen import freeze
from ctrlgen.lightning_modules.common.local_files import require_pretrained_dir

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (and long names) or a ``torch.dtype``; None stays None (the saved dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def resolve_class(cls: str | type) -> type:
    """A class, a dotted path (``transformers.CLIPTextModel``) or a bare name looked up in diffusers, then transformers."""
    if not isinstance(cls, str):
        return cls
    if "." in cls:
        mod, _, name = cls.rpartition(".")
        return getattr(importlib.import_module(mod), name)
    for lib in ("diffusers", "transformers"):
        try:
            return getattr(importlib.import_module(lib), cls)
        except AttributeError:
            continue
    raise ValueError(f"class {cls!r} is neither in diffusers nor in transformers; give its full import path")


def kind_of(cls: type) -> str:
    """``pipeline`` | ``scheduler`` | ``tokenizer`` | ``processor`` | ``model`` (decides the marker file)."""
    names = {c.__name__ for c in cls.__mro__}
    if "DiffusionPipeline" in names:
        return "pipeline"
    if "SchedulerMixin" in names:
        return "scheduler"
    if "PreTrainedTokenizerBase" in names or cls.__name__.endswith(("Tokenizer", "TokenizerFast")):
        return "tokenizer"
    if "ProcessorMixin" in names or "ImageProcessingMixin" in names:
        return "processor"
    return "model"


MARKERS = {"pipeline": "model_index.json", "scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
           "processor": "preprocessor_config.json", "model": "config.json"}


def load_frozen(cls: str | type, path: str | os.PathLike | None, *, subfolder: str | None = None,
                dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                frozen: bool = True, what: str | None = None, example: str | None = None, env: str | None = None,
                config_key: str | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on the local directory ``path[/subfolder]`` (or env ``env`` when ``path`` is None).

    ``dtype``: cast on load (models and pipelines); ``device``: moved after loading; ``frozen``: a frozen component
    (``freeze``, with the directory as its source). ``what``/``example`` word the error (defaults: the class name);
    ``config_key``: the config entry naming ``path``, worded when a checkpoint was made on other files; extra
    ``kwargs`` go to ``from_pretrained`` (e.g. ``variant="fp16"``)."""
    klass = resolve_class(cls)
    kind = kind_of(klass)
    if path is None and env is not None:
        path = os.environ.get(env)
    where = None if path is None else Path(path).expanduser() / (subfolder or "")
    lib = klass.__module__.split(".")[0]
    require_pretrained_dir(where, what or f"{klass.__name__} ({kind})",
                           example or f"a {lib} {klass.__name__}", env=env, marker=MARKERS[kind])
    kwargs["local_files_only"] = True
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None and kind in ("model", "pipeline"):
        kwargs["dtype"] = torch_dtype
    try:
        obj = klass.from_pretrained(str(where), **kwargs)
    except Exception as e:  # noqa: BLE001 - truncated/garbage weights or a config of another model: name the folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise OSError(f"{what or klass.__name__} directory {str(where)!r} could not be loaded by "
                      f"{klass.__name__}.from_pretrained ({type(e).__name__}: {first}); a file in it is truncated, "
                      "garbage or of another model: save it again with save_pretrained") from e
    if kind == "pipeline":
        if device is not None:
            obj.to(device)
        if frozen:
            for name, comp in obj.components.items():
                if isinstance(comp, nn.Module):
                    sub = where / name
                    freeze(comp, source=sub if sub.is_dir() else where, config_key=config_key)
        return obj
    if isinstance(obj, nn.Module):
        if device is not None:
            obj.to(device)
        if frozen:
            freeze(obj, source=where, config_key=config_key)
    return obj
