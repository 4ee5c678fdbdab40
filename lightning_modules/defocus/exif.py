"""EXIF camera settings for defocus control (spec shared/specs/defocus.md §5): parsing from the original file bytes,
the shallow/deep depth-of-field split and the encoding the networks consume.

Parsing (:func:`read_exif`) happens at shard-build time on the bytes as they came from the camera, since decoding
drops EXIF. Pillow gives IFD0 (Orientation) and the Exif sub-IFD (FNumber, FocalLength, FocalLengthIn35mmFilm,
ApertureValue, PixelXDimension, FocalPlaneXResolution and its unit). Odd values never raise: each field is a float or
``None``, and a ``None`` comes with a reason in ``exif_missing`` (absent tag, zero denominator — Pillow reads it as a
NaN rational —, out-of-range value, unusable crop-factor fallback).

The resolution order, valid ranges, split rule and encoding are ctrlgen's choices [design] (the paper's are not
public); each is a knob named in the function that applies it.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor, nn

from . import optics

TAG_ORIENTATION = 0x0112
TAG_FNUMBER = 0x829D
TAG_APERTURE_VALUE = 0x9202  # APEX: N = 2^(Av / 2)
TAG_FOCAL_LENGTH = 0x920A
TAG_PIXEL_X_DIMENSION = 0xA002
TAG_FOCAL35 = 0xA405  # short, 0 = unknown
TAG_FOCAL_PLANE_X_RES = 0xA20E
TAG_FOCAL_PLANE_UNIT = 0xA210  # 2 = inch, 3 = cm, 4 = mm

FNUMBER_RANGE = (0.95, 32.0)  # [design] exif valid range for N, else dropped
FOCAL35_RANGE = (8.0, 800.0)  # [design] valid range for the 35 mm-equivalent focal length (mm), else dropped
FOCAL_RANGE = (1.0, 2000.0)  # [design] plausible true focal lengths (mm)
SENSOR_WIDTH_RANGE = (2.0, 80.0)  # [design] plausible sensor widths (mm) for the crop-factor fallback
MISSING_MODES = ("drop", "assume_full_frame")  # exif.missing
SHALLOW_MAX_N, DEEP_MIN_N, SHALLOW_MIN_F35 = 2.8, 8.0, 35.0  # data.shallow_max_n, data.deep_min_n, data.shallow_min_f35
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


# ----------------------------------------------------------------------------- value parsing
def rational(value: Any) -> tuple[float | None, str | None]:
    """An EXIF number as a float, or ``(None, reason)``: Pillow ``IFDRational`` (a zero denominator reads as NaN and
    means missing), a (numerator, denominator) pair, an int or a float; NaN, inf and non-numbers are missing."""
    if value is None:
        return None, "tag absent"
    if isinstance(value, tuple | list) and len(value) == 2:
        num, den = value
        if den == 0:
            return None, "zero denominator"
        value = num / den
    elif getattr(value, "denominator", 1) == 0:
        return None, "zero denominator"
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None, f"not a number ({value!r})"
    if not math.isfinite(out):
        return None, f"not finite ({out})"
    return out, None


def _in_range(value: float | None, lo_hi: tuple[float, float], what: str) -> tuple[float | None, str | None]:
    lo, hi = lo_hi
    if value is None or lo <= value <= hi:
        return value, None
    return None, f"{what} {value:g} outside the valid range [{lo:g}, {hi:g}]"


def _tag(ifd0, sub, tag: int):
    return sub.get(tag, ifd0.get(tag))


def fnumber_from_tags(fnumber: Any, aperture_value: Any) -> tuple[float | None, str, str | None]:
    """N from FNumber, else from ApertureValue (APEX, N = 2^(Av/2)); returns (N or None, source, reason)."""
    n, why = rational(fnumber)
    if n is not None and n > 0:
        got, bad = _in_range(n, FNUMBER_RANGE, "FNumber")
        return got, "FNumber", bad
    av, why_av = rational(aperture_value)
    if av is not None:
        n = 2.0 ** (av / 2.0)
        got, bad = _in_range(n, FNUMBER_RANGE, "N from ApertureValue")
        return got, "ApertureValue", bad
    return None, "none", f"FNumber: {why or 'not positive'}; ApertureValue: {why_av}"


def focal35_from_tags(focal_mm: float | None, focal35: Any, pixel_x_dimension: Any, fp_x_res: Any, fp_unit: Any,
                      raw_width: int, missing: str = "drop") -> tuple[float | None, str, str | None]:
    """35 mm-equivalent focal length (mm) by the spec's order [design]: (1) FocalLengthIn35mmFilm (0 = unknown);
    (2) FocalLength × 36 / sensor width, sensor width = PixelXDimension / FocalPlaneXResolution × unit (inch, cm or
    mm) — only when PixelXDimension equals the file's stored (pre-rotation) width ``raw_width``, because a resized
    file keeps the camera's FocalPlaneXResolution; (3) ``missing``: ``drop`` or ``assume_full_frame`` (f35 = f).
    Returns (f35 or None, source, reason for the fallbacks taken)."""
    if missing not in MISSING_MODES:
        raise ValueError(f"exif.missing: expected one of {list(MISSING_MODES)}, found {missing!r}")
    reasons = []
    f35, why = rational(focal35)
    if f35 is not None and f35 > 0:
        got, bad = _in_range(f35, FOCAL35_RANGE, "FocalLengthIn35mmFilm")
        return got, "FocalLengthIn35mmFilm", bad
    reasons.append(f"FocalLengthIn35mmFilm: {why or '0 (unknown)'}")
    if focal_mm is None:
        reasons.append("FocalLength missing")
        return None, "none", "; ".join(reasons)
    px, why_px = rational(pixel_x_dimension)
    res, why_res = rational(fp_x_res)
    unit, _ = rational(fp_unit)
    if px is None or res is None or unit is None:
        reasons.append("crop-factor fallback: " + ", ".join(
            f"{name} {w}" for name, v, w in (("PixelXDimension", px, why_px), ("FocalPlaneXResolution", res, why_res),
                                             ("FocalPlaneResolutionUnit", unit, "tag absent or invalid"))
            if v is None))
    elif int(px) != int(raw_width):
        reasons.append(f"crop-factor fallback: PixelXDimension {int(px)} != stored width {raw_width} (resized or "
                       f"cropped file: FocalPlaneXResolution refers to the camera's width)")
    elif int(unit) not in optics.FOCAL_PLANE_UNIT_MM or res <= 0 or px <= 0:
        reasons.append(f"crop-factor fallback: FocalPlaneResolutionUnit {unit:g} / FocalPlaneXResolution {res:g} "
                       f"unusable (units 2 = inch, 3 = cm, 4 = mm)")
    else:
        width_mm = optics.sensor_width_from_focal_plane(px, res, int(unit))
        if SENSOR_WIDTH_RANGE[0] <= width_mm <= SENSOR_WIDTH_RANGE[1]:
            got, bad = _in_range(float(optics.focal35_from_focal(focal_mm, width_mm)), FOCAL35_RANGE,
                                 "f35 from the crop factor")
            return got, "crop_factor", "; ".join(reasons + ([bad] if bad else []))
        reasons.append(f"crop-factor fallback: sensor width {width_mm:.3g} mm outside {list(SENSOR_WIDTH_RANGE)}")
    if missing == "assume_full_frame":
        got, bad = _in_range(focal_mm, FOCAL35_RANGE, "FocalLength assumed full frame")
        return got, "assume_full_frame", "; ".join(reasons + ([bad] if bad else []))
    return None, "none", "; ".join(reasons)


# ----------------------------------------------------------------------------- records
def read_exif(data: bytes, missing: str = "drop") -> dict[str, Any]:
    """The camera record of one image file's bytes, JSON-able:

    ``fnumber``, ``focal_mm``, ``focal35_mm`` (floats or None), ``dof`` (:func:`dof_split`: ``shallow``, ``deep`` or
    None), ``width`` and ``height`` of the upright image (after EXIF orientation), ``orientation`` (1–8, 1 when
    absent), ``exif_source`` {field: tag used} and ``exif_missing`` {field: reason} for every None or fallback. A file
    without EXIF gives Nones with the reason ``no EXIF``. Raises only when the bytes are not an image.
    """
    broken = None
    with Image.open(io.BytesIO(data)) as im:
        raw_w, raw_h = im.size
        try:
            exif = im.getexif()
            sub = exif.get_ifd(ExifTags.IFD.Exif)
        except Exception as e:  # noqa: BLE001 - a corrupt EXIF block means no camera record, not an unreadable image
            exif, sub, broken = Image.Exif(), {}, f"unreadable EXIF ({type(e).__name__}: {e})"
    rec: dict[str, Any] = {"exif_source": {}, "exif_missing": {}}
    orient, _ = rational(exif.get(TAG_ORIENTATION))
    orient = int(orient) if orient is not None and 1 <= orient <= 8 else 1
    rec["orientation"] = orient
    rec["width"], rec["height"] = (raw_h, raw_w) if orient in TRANSPOSED else (raw_w, raw_h)
    if not len(exif) and not len(sub):
        rec.update(fnumber=None, focal_mm=None, focal35_mm=None, dof=None)
        rec["exif_missing"] = {k: broken or "no EXIF" for k in ("fnumber", "focal_mm", "focal35_mm")}
        return rec
    n, src, why = fnumber_from_tags(_tag(exif, sub, TAG_FNUMBER), _tag(exif, sub, TAG_APERTURE_VALUE))
    rec["fnumber"] = n
    if n is not None:
        rec["exif_source"]["fnumber"] = src
    if why:
        rec["exif_missing"]["fnumber"] = why
    f, why_f = rational(_tag(exif, sub, TAG_FOCAL_LENGTH))
    if f is not None:
        f, why_f = _in_range(f, FOCAL_RANGE, "FocalLength")
    rec["focal_mm"] = f
    if why_f:
        rec["exif_missing"]["focal_mm"] = why_f
    f35, src35, why35 = focal35_from_tags(f, _tag(exif, sub, TAG_FOCAL35), _tag(exif, sub, TAG_PIXEL_X_DIMENSION),
                                          _tag(exif, sub, TAG_FOCAL_PLANE_X_RES), _tag(exif, sub, TAG_FOCAL_PLANE_UNIT),
                                          raw_w, missing)
    rec["focal35_mm"] = f35
    if f35 is not None:
        rec["exif_source"]["focal35_mm"] = src35
    if why35:
        rec["exif_missing"]["focal35_mm"] = why35
    rec["dof"] = dof_split(n, f35)
    return rec


def upright(data: bytes) -> np.ndarray | None:
    """The image rotated/flipped by its EXIF orientation (``ImageOps.exif_transpose``) as uint8 RGB, or None when the
    orientation is 1, absent or invalid (the stored pixels are used as they are)."""
    with Image.open(io.BytesIO(data)) as im:
        try:
            orientation = im.getexif().get(TAG_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - corrupt EXIF: keep the stored pixels
            return None
        if orientation not in range(2, 9):
            return None
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def camera_record(data: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
    """``pack_folder(metadata=...)`` for ``ctrlgen data pack --exif``: the file's :func:`read_exif` record and its
    upright pixels (None when no rotation is needed)."""
    return read_exif(data), upright(data)


def after_crop(record: dict[str, Any], crop_width: int, crop_height: int) -> dict[str, Any]:
    """The record of an upright image cropped to ``crop_width`` × ``crop_height``: a crop narrows the field of view, so
    f35 becomes f35 · W_before / W_after (optics.focal35_after_crop) and the split is re-applied; resizing needs no
    correction. Crop after the orientation is applied (the record's width is the upright width). [design]"""
    if not 0 < crop_width <= record["width"] or not 0 < crop_height <= record["height"]:
        raise ValueError(f"exif crop: {crop_width}x{crop_height} does not fit the upright image "
                         f"{record['width']}x{record['height']}")
    out = {**record, "width": int(crop_width), "height": int(crop_height)}
    if record.get("focal35_mm") is not None:
        f35 = float(optics.focal35_after_crop(record["focal35_mm"], record["width"], crop_width))
        out["focal35_mm"] = f35
        out["dof"] = dof_split(record.get("fnumber"), f35)
    return out


def dof_split(fnumber: float | None, focal35_mm: float | None, shallow_max_n: float = SHALLOW_MAX_N,
              deep_min_n: float = DEEP_MIN_N, shallow_min_f35: float = SHALLOW_MIN_F35) -> str | None:
    """``shallow`` if N ≤ ``shallow_max_n`` and f35 ≥ ``shallow_min_f35``; ``deep`` if N ≥ ``deep_min_n``; otherwise
    None (excluded; also when N is unknown, or f35 is unknown for a wide aperture). [design] ``data.shallow_max_n``,
    ``data.deep_min_n``, ``data.shallow_min_f35``."""
    if fnumber is None:
        return None
    if fnumber >= deep_min_n:
        return "deep"
    if fnumber <= shallow_max_n and focal35_mm is not None and focal35_mm >= shallow_min_f35:
        return "shallow"
    return None


# ----------------------------------------------------------------------------- encoding for the networks
def exif_code(fnumber: float | Tensor, focal35_mm: float | Tensor) -> Tensor:
    """(…, 2) code e = (u_N, u_f), u_N = (log2 N − 2) / 2, u_f = (log2 f35 − log2 50) / 2: about [−1, 1] over common
    lenses (f/1.4 → −0.76, f/22 → 1.23; 24 mm → −0.53, 200 mm → 1). Differentiable. [design]"""
    n = torch.as_tensor(fnumber, dtype=torch.get_default_dtype()) if not isinstance(fnumber, Tensor) else fnumber
    f = torch.as_tensor(focal35_mm, dtype=n.dtype, device=n.device) if not isinstance(focal35_mm, Tensor) \
        else focal35_mm.to(n.dtype)
    n, f = torch.broadcast_tensors(n, f)
    return torch.stack([(torch.log2(n) - 2.0) / 2.0, (torch.log2(f) - math.log2(50.0)) / 2.0], dim=-1)


def fourier_features(code: Tensor, n_freq: int = 8) -> Tensor:
    """(…, D) → (…, D · (1 + 2 · n_freq)): the code and sin/cos(π 2^k u) for k < ``n_freq``. [design]"""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, dtype=code.dtype, device=code.device)
    ang = code[..., None] * freqs
    return torch.cat([code, ang.sin().flatten(-2), ang.cos().flatten(-2)], dim=-1)


class ExifEmbedding(nn.Module):
    """EXIF token: :func:`exif_code` → :func:`fourier_features` (8 frequencies) → 2-layer MLP → ``dim`` (256). The
    consumers are the discriminator and, optionally, the focus predictor; the generator is not EXIF-conditioned.
    [design]"""

    def __init__(self, dim: int = 256, n_freq: int = 8, hidden: int | None = None):
        super().__init__()
        self.n_freq = n_freq
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(2 * (1 + 2 * n_freq), hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, fnumber: float | Tensor, focal35_mm: float | Tensor) -> Tensor:
        code = exif_code(fnumber, focal35_mm).to(self.mlp[0].weight.dtype)
        return self.mlp(fourier_features(code, self.n_freq))
