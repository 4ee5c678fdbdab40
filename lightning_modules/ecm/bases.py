"""Building the VQVAE/VAR from a preset and loading their weights from a *local* file (never a hub).

A weights path may be an official file (``vae_ch160v4096z32.pth``, ``var_d16.pth``, ``.safetensors``), loaded strictly,
or a ctrlgen Lightning checkpoint of ``VQVAEModule``/``VARModule``/``ECMModule`` (``.ckpt``), whose ``vqvae.``/``var.``
entries are used. Mismatches raise with the file and the missing/unexpected/mis-shaped keys (``checkpoint.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ctrlgen.lightning_modules.common.frozen import sha256_of
from ctrlgen.lightning_modules.ecm.checkpoint import load_state_dict_strict
from ctrlgen.lightning_modules.ecm.var import VAR, build_var
from ctrlgen.lightning_modules.ecm.vqvae import VQVAE, build_vqvae


def load_weights(module: nn.Module, path: str | Path, prefix: str) -> dict[str, Any]:
    """Strict load from ``path``; Lightning ``.ckpt`` files are read under ``prefix`` (e.g. ``"vqvae."``). A missing
    or unreadable file fails naming it (``read_state_dict_file``)."""
    path = Path(path).expanduser()
    info = load_state_dict_strict(module, path, prefix=prefix if path.suffix == ".ckpt" else None)
    return {"path": str(path), "sha256": sha256_of(path), **(info or {})}


def make_vqvae(preset: str, overrides: dict | None, weights: str | None,
               net: VQVAE | None = None) -> tuple[VQVAE, dict | None]:
    """The VQVAE: ``net`` when injected (a module built from the config), else ``preset`` + ``overrides``; then
    ``weights`` loaded strictly into it."""
    vq = net if net is not None else build_vqvae(preset, **(overrides or {}))
    return vq, (load_weights(vq, weights, "vqvae.") if weights else None)


def make_var(preset: str, overrides: dict | None, weights: str | None,
             net: VAR | None = None) -> tuple[VAR, dict | None]:
    """The VAR: ``net`` when injected, else ``preset`` + ``overrides``; then ``weights`` loaded strictly into it."""
    var = net if net is not None else build_var(preset, **(overrides or {}))
    return var, (load_weights(var, weights, "var.") if weights else None)


def check_compatible(vq: VQVAE, var: VAR) -> None:
    if tuple(vq.patch_nums) != tuple(var.patch_nums) or vq.Cvae != var.Cvae or vq.vocab_size != var.V:
        raise ValueError(f"VQVAE (patch_nums {vq.patch_nums}, Cvae {vq.Cvae}, V {vq.vocab_size}) does not match VAR "
                         f"(patch_nums {var.patch_nums}, Cvae {var.Cvae}, V {var.V})")
