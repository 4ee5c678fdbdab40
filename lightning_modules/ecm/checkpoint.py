"""Strict checkpoint loading with readable errors (spec §3.1, §3.9, §8 check 1).

``load_state_dict_strict(module, path)`` loads ``.pth``/``.pt``/``.ckpt`` (``torch.load(weights_only=True,
map_location='cpu')``, memory-mapped when possible) or ``.safetensors``, unwraps a container (``state_dict``,
``model``, ``module``, …, DDP ``module.`` prefix) only when the top level does not already match, and raises a
``ValueError`` naming the file and the missing / unexpected / mis-shaped keys. Modules exposing
``verify_buffers()`` (VAR) are checked afterwards: the block-causal mask and ``lvl_1L`` must equal freshly
built ones, so a fake or corrupt file cannot silently overwrite them.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctrlgen.lightning_modules.common.frozen import sha256_of  # noqa: F401 (provenance lives in common)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
_CONTAINER_KEYS = ("state_dict", "model", "module", "net", "model_state_dict", "params", "ema")
_MAX_LISTED = 25


def read_state_dict_file(path: str | Path) -> Any:
    """Raw object stored in ``path`` (CPU tensors; no arbitrary unpickling). Every failure names the file: missing
    (``FileNotFoundError``), a directory, truncated or garbage bytes, or a pickle of Python objects that a safe load
    refuses (``ValueError``, with how to convert such a file into a plain state dict)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"weights file {str(path)!r} is a directory; give the weights file itself (.pth, .pt, .ckpt "
                         "or .safetensors) inside it")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist (set the config's *_weights to a local "
                                "file)")
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {str(path)!r} is empty (0 bytes): an interrupted download or copy; copy it "
                         "again")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "zip archive" in str(e) or "central directory" in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader's error becomes one message naming the file
        raise ValueError(unreadable_message(path, e)) from None


def unreadable_message(path: Path, exn: BaseException) -> str:
    """One message for a weights file torch/safetensors cannot read: what was found and how to fix it."""
    text = str(exn)
    found = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", text)
    if found:
        what = f" (it needs {found.group(1)})"
        return (f"weights file {str(path)!r} is not a plain state dict: it pickles Python objects{what} that a safe "
                "load (weights_only) refuses. If you trust the file, convert it once: `sd = torch.load(path, "
                "weights_only=False)`, then `torch.save(sd['state_dict'] if 'state_dict' in sd else sd.state_dict(), "
                "'plain.pth')` (or save it as .safetensors) and point the config at the converted file")
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)  # torch's reason, without its advice
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    first = (detail.group(1) if detail else lines[0] if lines else type(exn).__name__)[:200]
    if path.suffix == ".safetensors":
        kind = "a truncated or corrupt .safetensors file"
    elif zipfile.is_zipfile(path) or "zip" in text or "central directory" in text:
        kind = "a truncated or corrupt PyTorch (zip) file"
    else:
        kind = "not a PyTorch or safetensors weights file (garbage bytes, or an interrupted copy)"
    return (f"weights file {str(path)!r} cannot be read: {kind} ({type(exn).__name__}: {first}); copy or download "
            "it again, or check that the path names the weights file")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unwrap_state_dict(obj: Any, expected: set[str], prefix: str | None = None) -> tuple[dict[str, Tensor], str]:
    """Pick the tensor dict to load. Returns (state_dict, how) where ``how`` describes any unwrapping."""
    how = "top level"
    needs_unwrap = not _is_tensor_dict(obj) or not (set(obj) & expected)
    if needs_unwrap and isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj, how = obj[key], f"container key {key!r}"
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint does not hold a state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if prefix:
        sd, how = _strip(sd, prefix), f"{how}, prefix {prefix!r}"
    elif not (set(sd) & expected) and sd and all(k.startswith("module.") for k in sd):
        sd, how = _strip(sd, "module."), f"{how}, DDP prefix 'module.'"
    return sd, how


def diff_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> dict[str, list]:
    """missing / unexpected keys and (key, expected shape, found shape) for shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [(k, tuple(expected[k].shape), tuple(found[k].shape))
              for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    return {"missing": missing, "unexpected": unexpected, "shape": shapes}


def _fmt(items: list, render) -> str:
    lines = [f"    {render(x)}" for x in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    … and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def format_mismatch(path: str | Path, diff: dict[str, list], how: str = "top level") -> str:
    parts = [f"state dict in {path} ({how}) does not match the module:"]
    if diff["missing"]:
        parts.append(f"  missing keys ({len(diff['missing'])}):\n" + _fmt(diff["missing"], str))
    if diff["unexpected"]:
        parts.append(f"  unexpected keys ({len(diff['unexpected'])}):\n" + _fmt(diff["unexpected"], str))
    if diff["shape"]:
        parts.append(f"  shape mismatches ({len(diff['shape'])}):\n"
                     + _fmt(diff["shape"], lambda t: f"{t[0]}: expected {t[1]}, found {t[2]}"))
    return "\n".join(parts)


def load_state_dict_strict(module: nn.Module, path: str | Path, prefix: str | None = None) -> dict[str, Any]:
    """Load ``path`` into ``module`` with strict key/shape checking; returns a small report
    ``{'path', 'num_tensors', 'unwrapped'}``. Raises ``ValueError`` on any mismatch."""
    expected = module.state_dict()
    try:
        sd, how = unwrap_state_dict(read_state_dict_file(path), set(expected), prefix)
    except TypeError as e:  # a readable file that holds no state dict (a list, a whole pickled model, ...)
        raise ValueError(f"weights file {str(path)!r}: {e}; save the module's state_dict() instead") from None
    diff = diff_state_dict(expected, sd)
    if any(diff.values()):
        raise ValueError(format_mismatch(path, diff, how))
    module.load_state_dict(sd, strict=True)
    verify = getattr(module, "verify_buffers", None)
    if callable(verify):
        try:
            verify()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return {"path": str(path), "num_tensors": len(sd), "unwrapped": how}


# ----------------------------------------------------------------------------- manifests (spec §3.9)
def find_fixtures_dir() -> Path | None:
    """``$CTRLGEN_FIXTURES``, else ``<repo>/shared/fixtures``, else ``<repo>/../shared/fixtures``."""
    repo = Path(__file__).resolve().parents[2]
    env = os.environ.get("CTRLGEN_FIXTURES")
    for cand in ([Path(env)] if env else []) + [repo / "shared" / "fixtures", repo.parent / "shared" / "fixtures"]:
        if cand.is_dir():
            return cand
    return None


def read_manifest(path: str | Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Rows ``key<TAB>(shape)<TAB>dtype`` → [(key, shape, torch dtype)] in file order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, _DTYPES[dtype.strip()]))
    return rows


def fake_state_dict(manifest: list[tuple[str, tuple[int, ...], torch.dtype]],
                    buffers_from: Mapping[str, Tensor] | None = None, fill: float = 0.0) -> dict[str, Tensor]:
    """A checkpoint-shaped state dict: tensors filled with ``fill``, except keys present in ``buffers_from``
    (e.g. the model's own mask / ``lvl_1L``), which are copied (spec §8 check 1)."""
    buffers_from = buffers_from or {}
    def make(s: tuple[int, ...], d: torch.dtype) -> Tensor:
        return torch.zeros(s, dtype=d) if fill == 0 else torch.full(s, fill, dtype=d)

    return {k: buffers_from[k].detach().clone() if k in buffers_from else make(s, d) for k, s, d in manifest}
