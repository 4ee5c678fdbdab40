"""Frozen components: one way to freeze a pretrained base (VAR, VQVAE, a diffusers UNet/VAE, text encoders, Janus).

``freeze(module, source=...)`` marks ``module`` as a frozen component of whatever model holds it:

- ``requires_grad=False`` on the base's own parameters; adapter parameters inside it (peft LoRA ``lora_A``/``lora_B``/
  ``lora_embedding_*``/DoRA magnitudes, i.e. a tuner layer's ``adapter_layer_names``) keep theirs, so a LoRA injected
  before or after freezing trains;
- eval mode on every submodule of the base, except the parts of *trainable* adapters (a peft adapter whose weights
  require grad: its ``lora_dropout`` and weights; any submodule whose parameters all require grad), which follow the
  enclosing model's mode. :func:`keep_frozen_modes` re-applies this after ``model.train()`` (``BaseGenModule.train``
  calls it), so dropout and batch-statistics of the base never switch on while LoRA dropout does;
- provenance ``{"path", "sha256"}`` of the files it was loaded from (:func:`provenance`: a file's sha256, or for a
  ``save_pretrained`` directory one sha256 over its weight files and ``config.json``), or None for random weights.

``BaseGenModule`` finds frozen components by walking its modules (:func:`frozen_components`): their parameters stay
out of the optimizer, their state-dict keys out of checkpoints (trainable adapters inside them stay in), and their
provenance goes into ``checkpoint["ctrlgen_bases"]``, checked on load (:func:`provenance_mismatches`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from torch import nn

FROZEN_ATTR = "_ctrlgen_frozen"  # plain attributes on the frozen module (they pickle and deep-copy with it)
SOURCE_ATTR = "_ctrlgen_source"
CONFIG_KEY_ATTR = "_ctrlgen_config_key"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
CONFIG_NAMES = ("config.json", "model_index.json")


# ------------------------------------------------------------------------------------------------------- provenance
def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The files that define a ``save_pretrained`` directory's weights, sorted by relative path: every
    ``*.safetensors`` / ``*.bin`` / ``*.pth`` / ``*.pt`` / ``*.ckpt`` and every ``config.json`` /
    ``model_index.json``, in subfolders too."""
    root = Path(directory)
    files = [p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_NAMES)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


_DIR_CACHE: dict[tuple, str] = {}  # (dir, (relpath, size, mtime_ns), ...) -> digest: hash a multi-GB base once


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a weights file, or of a directory: sha256 over ``relative path NUL file sha256 LF`` of its
    :func:`weight_files` (a renamed, added, removed or changed weight/config file changes it)."""
    path = Path(path).expanduser()
    if path.is_file():
        return sha256_of(path)
    if not path.is_dir():
        raise FileNotFoundError(f"frozen base source {str(path)!r} does not exist (give the local weights file or "
                                "save_pretrained directory the base was loaded from)")
    files = weight_files(path)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise ValueError(f"frozen base source {str(path)!r} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}); "
                         "point it at the directory written by save_pretrained")
    key = (str(path.resolve()), *((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                                  for f in files))
    if key not in _DIR_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256_of(f)}\n".encode())
        _DIR_CACHE[key] = h.hexdigest()
    return _DIR_CACHE[key]


def provenance(source: str | os.PathLike | dict | None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of a file or directory; a dict that already has both is taken as is (e.g. what a loader
    recorded when it read the file); None: random weights (no file)."""
    if source is None:
        return None
    if isinstance(source, dict):
        if not {"path", "sha256"} <= set(source):
            raise ValueError(f"a frozen base source dict needs 'path' and 'sha256', got keys {sorted(source)}")
        return {"path": str(source["path"]), "sha256": str(source["sha256"])}
    path = Path(source).expanduser()
    return {"path": str(path), "sha256": fingerprint(path)}


def describe(info: dict | None) -> str:
    return "random weights (no file)" if info is None else f"{info['path']} (sha256 {info['sha256'][:12]}…)"


# ----------------------------------------------------------------------------------------------------------- freeze
def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of the adapter parameters inside it: those under a peft tuner layer's
    ``adapter_layer_names`` (``lora_A``, ``lora_B``, ``lora_embedding_A``/``_B``, ``lora_magnitude_vector``)."""
    names: set[str] = set()
    for mname, m in module.named_modules():
        for attr in getattr(m, "adapter_layer_names", ()) or ():
            sub = getattr(m, attr, None)
            if isinstance(sub, nn.Module):
                prefix = f"{mname}.{attr}" if mname else attr
                names.update(f"{prefix}.{n}" for n, _ in sub.named_parameters())
    return names


def freeze(module: nn.Module, source: str | os.PathLike | dict | None = None,
           config_key: str | None = None) -> nn.Module:
    """Freeze ``module`` in place as a frozen component (see the module docstring) and return it. ``source``: the
    file or directory it was loaded from (recorded as path + sha256), or a ``{"path", "sha256"}`` dict, or None for
    random weights; ``config_key``: the config entry naming that source (worded in a mismatch error). Freezing an
    already frozen module again (e.g. after injecting an adapter) keeps its recorded source unless one is given."""
    adapters = adapter_parameter_names(module)
    for name, p in module.named_parameters():
        if name not in adapters:
            p.requires_grad_(False)
    if not is_frozen(module) or source is not None:
        setattr(module, SOURCE_ATTR, provenance(source))
    if not is_frozen(module) or config_key is not None:
        setattr(module, CONFIG_KEY_ATTR, config_key)
    setattr(module, FROZEN_ATTR, True)
    apply_frozen_mode(module, training=True)
    return module


def is_frozen(module: nn.Module) -> bool:
    return bool(getattr(module, FROZEN_ATTR, False))


def _trainable_adapter_parts(base: nn.Module) -> list[nn.Module]:
    """Submodules of ``base`` that belong to a trainable adapter (they follow the model's train/eval mode)."""
    parts: list[nn.Module] = []
    for m in base.modules():
        params = list(m.parameters(recurse=True))
        if m is not base and params and all(p.requires_grad for p in params):
            parts.append(m)
        weights = getattr(m, "adapter_layer_names", None)
        if not weights:
            continue
        attrs = [getattr(m, a, None) for a in (*weights, *(getattr(m, "other_param_names", ()) or ()))]
        dicts = [d for d in attrs if isinstance(d, (nn.ModuleDict, nn.ParameterDict))]
        for adapter in {k for d in dicts for k in d}:
            own = [d[adapter] for d in dicts if adapter in d and isinstance(d, nn.ModuleDict)]
            grads = [p.requires_grad for d in dicts if adapter in d
                     for p in (d[adapter].parameters() if isinstance(d[adapter], nn.Module) else [d[adapter]])]
            if grads and all(grads):
                parts.extend(own)
    return parts


def apply_frozen_mode(base: nn.Module, training: bool) -> None:
    """Eval mode on every submodule of the frozen ``base``; its trainable adapter parts get ``training``."""
    follow = {id(s) for part in _trainable_adapter_parts(base) for s in part.modules()}
    for m in base.modules():
        m.training = bool(training) and id(m) in follow


def frozen_components(root: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the outermost frozen components inside ``root`` (names as in ``named_modules``)."""
    found: dict[str, nn.Module] = {}
    for name, m in root.named_modules():
        if name and is_frozen(m) and not any(name.startswith(f"{f}.") for f in found):
            found[name] = m
    return found


def keep_frozen_modes(root: nn.Module, training: bool) -> None:
    """After ``root.train(training)``: every frozen component back in eval, its trainable adapters in ``training``."""
    for m in frozen_components(root).values():
        apply_frozen_mode(m, training)


def frozen_parameter_ids(root: nn.Module) -> set[int]:
    """ids of the parameters of frozen components that do not train (everything but trainable adapters)."""
    return {id(p) for m in frozen_components(root).values() for p in m.parameters() if not p.requires_grad}


def base_records(root: nn.Module) -> dict[str, dict | None]:
    """``{name: {"path", "sha256"} or None}`` of every frozen component: what a checkpoint records."""
    records = {name: getattr(m, SOURCE_ATTR, None) for name, m in frozen_components(root).items()}
    return {name: None if r is None else dict(r) for name, r in records.items()}


def provenance_mismatches(saved: dict[str, dict | None], root: nn.Module) -> list[str]:
    """One message per frozen component of ``root`` whose files differ (sha256) from those ``saved`` records; names
    in only one of the two are not compared."""
    live = frozen_components(root)
    out = []
    for name, was in (saved or {}).items():
        if name not in live:
            continue
        now = getattr(live[name], SOURCE_ATTR, None)
        if (was or {}).get("sha256") == (now or {}).get("sha256"):
            continue
        key = getattr(live[name], CONFIG_KEY_ATTR, None)
        fix = f"Point {key} at the original weights" if key else f"Load the {name} from its original weights"
        out.append(f"this checkpoint was made on the frozen {name} {describe(was)}, but this run loads "
                   f"{describe(now)}: the {name} is not in the checkpoint, so everything it computes would rest on "
                   f"another base. {fix}, or set model.init_args.base_mismatch=warn to go on anyway")
    return out
