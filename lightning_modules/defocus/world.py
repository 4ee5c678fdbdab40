"""The ``scenes`` world (defocus, spec shared/specs/defocus.md §5–§7): a textured subject in front of a ground plane,
distractor boxes and a far wall, with metric depth, the subject's mask, a camera (EXIF-like record) and the photo that
camera takes.

Deterministic: sample ``i`` of split ``s`` depends only on ``(seed, split, i)``. Per sample:

* ``jpg``: the all-in-focus (AIF) image (q95);
* ``depth.npy``: metric depth in metres, float32 (H, W);
* ``mask.png``: the salient object (the subject), 0/255, where it is visible;
* ``photo.jpg``: the AIF rendered through the sample's camera, focused on the subject, by the brute-force
  ``GatherReference`` renderer — a different blur implementation from the layered renderer that training uses, so
  tests comparing the two are not circular. Shallow-DoF cameras give a blurred background, deep ones an almost
  sharp photo;
* ``json``: the camera (``fnumber``, ``focal_mm``, ``focal35_mm``, ``focus_m``, ``dof`` by the EXIF split rule, a
  full-frame sensor), ``subject_depth_m`` (the median depth over the mask: the focus target), the renderer's knobs
  under ``lens``, and ``world``/``seed``/``split``/``index``.

Scene [design]: a far wall at 8–40 m (stripes), a ground plane from 0.9–2 m at the bottom row to the horizon
(perspective checkerboard), 1–2 distractor boxes between the subject and the wall, and the subject, a shaded, striped
ellipse bulging towards the camera at 0.8–2.5 m near the image centre. Cameras: f35 ∈ {35, 50, 85, 135} mm and half
the samples at a shallow aperture (f/1.4–2.8), half at a deep one (f/8–22). Small sizes (32–64 px) render in
milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
FOCALS_35 = (35.0, 50.0, 85.0, 135.0)  # [design] the world's lenses (full frame, so focal_mm = focal35_mm)
SHALLOW_N = (1.4, 1.8, 2.0, 2.8)  # [design] shallow apertures (the EXIF split's shallow set at f35 ≥ 35 mm)
DEEP_N = (8.0, 11.0, 16.0, 22.0)  # [design] deep apertures
LENS = {"renderer": "gather", "max_radius_px": 32.0, "ref_width_px": 1024, "gamma": 2.2, "scale": 1.0,
        "sensor_width_mm": 36.0}  # the spec's lens defaults: R = 32 px at 1024 px wide


def _colour(rng: np.random.Generator, lo: float = 0.15, hi: float = 0.95) -> np.ndarray:
    return rng.uniform(lo, hi, 3)


def _stripes(a: np.ndarray, period: float, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Soft stripes along the coordinate ``a`` (period in its units) between colours c1 and c2 → (H, W, 3)."""
    t = 0.5 + 0.5 * np.sin(2 * np.pi * a / period)
    return c1 * t[..., None] + c2 * (1 - t[..., None])


def scene(seed: int, split: str, index: int, size: int = 64) -> dict[str, Any]:
    """The AIF image (H, W, 3) in [0, 1], depth (H, W) in m, subject mask (H, W) bool and the camera record."""
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xx + 0.5) / size * 2 - 1, (yy + 0.5) / size * 2 - 1  # [-1, 1], v grows downwards
    # far wall
    wall = rng.uniform(8.0, 40.0)
    angle = rng.uniform(0, np.pi)
    img = _stripes(u * np.cos(angle) + v * np.sin(angle), rng.uniform(0.15, 0.4), _colour(rng), _colour(rng))
    depth = np.full((size, size), wall)
    # ground plane: depth k / (v − v_h) below the horizon v_h, d_near at the bottom row
    horizon, near = rng.uniform(-0.25, 0.1), rng.uniform(0.9, 2.0)
    below = v > horizon + 1e-6
    ground = np.where(below, near * (1 - horizon) / np.maximum(v - horizon, 1e-6), np.inf)
    on_ground = below & (ground < depth)
    ground = np.where(on_ground, ground, 0.0)
    check = (np.floor(u * ground * 0.6 / 0.4) + np.floor(ground / 0.8)) % 2  # 0.4 m × 0.8 m tiles
    g1, g2 = _colour(rng, 0.2, 0.7), _colour(rng, 0.2, 0.7)
    img = np.where(on_ground[..., None], np.where(check[..., None] > 0, g1, g2), img)
    depth = np.where(on_ground, ground, depth)
    # subject depth first, so the distractors can sit behind it
    z0 = rng.uniform(0.8, 2.5)
    for _ in range(int(rng.integers(1, 3))):
        bx, by = rng.uniform(-0.9, 0.9, 2)
        hw, hh = rng.uniform(0.1, 0.3, 2)
        zd = rng.uniform(z0 + 0.5, max(z0 + 1.0, wall / 2))
        box = (np.abs(u - bx) < hw) & (np.abs(v - by) < hh) & (zd < depth)
        tex = _stripes(v, rng.uniform(0.08, 0.2), _colour(rng), _colour(rng))
        img, depth = np.where(box[..., None], tex, img), np.where(box, zd, depth)
    # subject: a shaded, striped ellipse bulging towards the camera
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    rx, ry = rng.uniform(0.25, 0.45, 2)
    q = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    bulge = 0.15 * min(rx, ry) * z0 * np.sqrt(np.clip(1 - q, 0, None))
    subj_depth = z0 - bulge
    mask = (q < 1) & (subj_depth < depth)
    tex = _stripes((u - cx) * np.cos(angle + 1.0) - (v - cy) * np.sin(angle + 1.0), rng.uniform(0.06, 0.15),
                   _colour(rng, 0.4, 1.0), _colour(rng, 0.0, 0.35))
    shade = 0.6 + 0.4 * np.sqrt(np.clip(1 - q, 0, None))
    img = np.where(mask[..., None], tex * shade[..., None], img)
    depth = np.where(mask, subj_depth, depth)
    f35 = float(FOCALS_35[int(rng.integers(len(FOCALS_35)))])
    shallow = bool(rng.integers(2))
    fnumber = float((SHALLOW_N if shallow else DEEP_N)[int(rng.integers(4))])
    subject_m = float(np.median(depth[mask])) if mask.any() else float(z0)
    camera = {"fnumber": fnumber, "focal_mm": f35, "focal35_mm": f35, "focus_m": subject_m,
              "subject_depth_m": subject_m, "dof": "shallow" if shallow else "deep"}
    return {"image": np.clip(img, 0, 1), "depth": depth, "mask": mask, "camera": camera}


def photo(image: np.ndarray, depth: np.ndarray, camera: dict[str, Any]) -> np.ndarray:
    """The AIF image (H, W, 3) in [0, 1] as the camera takes it, by the brute-force ``GatherReference`` renderer
    with the world's lens knobs (float64, deterministic). Returns (H, W, 3) in [0, 1]."""
    from ctrlgen.lightning_modules.defocus.render import GatherReference

    knobs = {k: LENS[k] for k in ("max_radius_px", "ref_width_px", "gamma", "sensor_width_mm")}
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    d = torch.from_numpy(np.ascontiguousarray(depth))[None, None]
    with torch.no_grad():
        out = GatherReference(**knobs).render(x, d, camera["fnumber"], camera["focal35_mm"], camera["focus_m"],
                                              LENS["scale"])
    return out[0].permute(1, 2, 0).numpy()


def render(seed: int, split: str, index: int, size: int = 64) -> dict[str, Any]:
    """:func:`scene` plus its ``photo`` and the JSON record."""
    s = scene(seed, split, index, size)
    s["photo"] = photo(s["image"], s["depth"], s["camera"])
    s["meta"] = {**s["camera"], "width": size, "height": size, "sensor_width_mm": LENS["sensor_width_mm"],
                 "lens": dict(LENS), "world": "scenes", "seed": seed, "split": split, "index": index}
    return s


def samples(seed: int, split: str, n: int, size: int = 64, start: int = 0) -> Iterator[dict[str, Any]]:
    """WebDataset samples: ``jpg`` (AIF), ``depth.npy`` (m, float32), ``mask.png``, ``photo.jpg``, ``json``."""
    from ctrlgen.datamodules.shards import encode_jpg, encode_png

    for i in range(start, start + n):
        r = render(seed, split, i, size)
        yield {
            "__key__": f"{split}_{i:07d}",
            "jpg": encode_jpg((r["image"] * 255).round().astype(np.uint8), quality=95),
            "depth.npy": r["depth"].astype(np.float32),
            "mask.png": encode_png(r["mask"].astype(np.uint8) * 255),
            "photo.jpg": encode_jpg((r["photo"] * 255).round().astype(np.uint8), quality=95),
            "json": r["meta"],
        }
