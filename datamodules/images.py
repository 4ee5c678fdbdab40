"""Image helpers every datamodule (and ``ctrlgen data tokenize``) shares: one resize + crop for an image and its maps,
the signed float range the networks read, and the key convention of extra stored crops.

- :func:`resize_crop`: shorter side → ``round(mid_reso · size)``, then a ``size``×``size`` crop (random with an rng,
  else the centre) applied to all arrays alike, so condition maps stay aligned with their image;
- :func:`check_mid_reso`: ``mid_reso`` must be ≥ 1 (resize, then crop);
- :func:`to_signed`: uint8 HW/HWC → float32 CHW in [-1, 1] (1-channel maps replicated to 3);
- :data:`CROP_KEY`, :func:`crop_prefix`, :func:`stored_crops`: pre-tokenised shards may hold extra crops of a sample
  under ``c<j>.`` keys (``c1.jpg``, ``c1.canny.png``, ``c1.vq.npy``); crop 0 is unprefixed;
- :func:`read_map_file`: a condition map given as a file (PNG or NPY, never lossy JPEG) → uint8 HW or HWC.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CROP_KEY = re.compile(r"^c\d+\.")  # keys of extra stored crops (c1.jpg, c1.canny.png, c1.vq.npy)


def check_mid_reso(mid_reso: float, what: str = "mid_reso") -> float:
    """``mid_reso`` as a float; ValueError naming ``what`` when it is below 1."""
    if mid_reso < 1.0:
        raise ValueError(f"{what} must be >= 1 (resize, then crop), got {mid_reso}")
    return float(mid_reso)


def resize_crop(arrays: list[np.ndarray], size: int, rng: random.Random | None,
                mid_reso: float = 1.0) -> list[np.ndarray]:
    """Resize the shorter side to ``round(mid_reso · size)`` (area when shrinking, Lanczos when enlarging; nearest for
    1-channel maps) and crop ``size``×``size`` from all alike: at random with ``rng``, else the centre. VAR's
    ImageNet recipe is ``mid_reso`` 1.125 (shorter side 288, crop 256)."""
    h, w = arrays[0].shape[:2]
    for a in arrays[1:]:
        if a.shape[:2] != (h, w):
            raise ValueError(f"condition map of shape {a.shape[:2]} does not match its image {(h, w)}")
    short = max(size, round(size * check_mid_reso(mid_reso)))
    scale = short / min(h, w)
    nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
    out = []
    for a in arrays:
        if (nh, nw) != (h, w):
            interp = cv2.INTER_NEAREST if a.ndim == 2 else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4)
            a = cv2.resize(a, (nw, nh), interpolation=interp)
        out.append(a)
    top = rng.randint(0, nh - size) if rng else (nh - size) // 2
    left = rng.randint(0, nw - size) if rng else (nw - size) // 2
    return [a[top : top + size, left : left + size] for a in out]


def to_signed(a: np.ndarray) -> np.ndarray:
    """uint8 HW or HWC → float32 CHW in [-1, 1], 1-channel maps replicated to 3."""
    x = a.astype(np.float32) / 127.5 - 1.0
    if x.ndim == 2:
        x = np.repeat(x[None], 3, 0)
    else:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x)


def crop_prefix(j: int) -> str:
    """Key prefix of stored crop ``j`` of a pre-tokenised sample (0 = the centre crop, unprefixed)."""
    return "" if j == 0 else f"c{j}."


def stored_crops(sample: Any) -> int:
    """Crops a pre-tokenised sample holds: 1 + the number of ``c<j>.vq.npy`` keys (no value is decoded)."""
    return 1 + sum(1 for k in sample if CROP_KEY.match(k) and k.endswith(".vq.npy"))


MAP_EXTS = (".png", ".npy")  # condition maps are lossless: JPEG blurs edge maps and quantises depth


def as_map(a: np.ndarray, what: str) -> np.ndarray:
    """A decoded condition map → uint8 HW or HW3: floats in [0, 1] are scaled by 255 (others must lie in 0..255),
    uint16 is rescaled to 0..255, bool becomes {0, 255}, a single channel is squeezed; ValueError naming ``what``."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"{what}: expected a condition map of shape (H,W) or (H,W,3), got {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: the map holds NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{what}: float map values must lie in [0, 1] (or 0..255), found [{lo:g}, {hi:g}]")
        return np.round(a * 255 if hi <= 1.0 else a).astype(np.uint8)
    if a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"{what}: integer map values must lie in 0..255, found [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
    return a


def read_map_file(path: str | Path) -> np.ndarray:
    """A condition-map file → uint8 HW (grey: edges, depth) or HW3 (RGB: normals); PNG (8/16-bit) or NPY. Any other
    suffix or an unreadable file is a ValueError naming the file."""
    from ctrlgen.datamodules.shards import decode_value, describe_error

    path = Path(path)
    if path.suffix.lower() not in MAP_EXTS:
        raise ValueError(f"{path}: condition maps must be {'/'.join(MAP_EXTS)} files, not {path.suffix or 'no suffix'!r}")
    try:
        value = decode_value(path.suffix.lower().lstrip("."), path.read_bytes())
    except Exception as e:  # noqa: BLE001 - one message naming the file
        raise ValueError(f"{path}: cannot read the condition map ({describe_error(e, str(path))[:200]})") from None
    return as_map(value, str(path))
