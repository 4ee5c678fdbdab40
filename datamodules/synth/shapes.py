"""The ``shapes`` world: coloured geometric shapes (8-colour palette) on a black background, with geometry-exact
depth and normals.

Deterministic: sample ``i`` of split ``s`` depends only on ``(seed, split, i)``. Class label = shape type. Geometry: the
background is a plane tilted away from the camera (depth grows towards the top of the image); each shape is a solid in
front of it: a sphere (``circle``), a square plate, a triangular plate or a pyramid (``diamond``). Depth is written as
8-bit *inverse* depth (near = bright, the MiDaS/ControlNet convention); normals as RGB = (n + 1) / 2 · 255 with the camera
looking down −z. Canny edges are extracted from the stored (decoded) image by the shared edge extractor, so the condition
is computed on exactly the pixels the model sees.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import cv2
import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SHADED = ("circle", "diamond")  # lit solids: colour × shade, shade ∈ [SHADE_MIN, 1]
SHADE_MIN = 0.55
BACKGROUND = (0, 0, 0)
# 8 saturated colours with distinct hues; each keeps a grey level ≥ 64 above the black background even at
# SHADE_MIN (cv2.COLOR_RGB2GRAY weights), so a step edge clears cv2.Canny's 100/200 thresholds and every sample's
# canny condition holds the shape's outline. A small palette on one background keeps the world learnable by the
# CPU demo's tiny VQVAE/VAR in minutes (with random colours, 16 % of the canny maps were empty and the demo VQVAE
# reconstructed colourless blobs after as many steps).
PALETTE = ((255, 60, 60), (110, 160, 255), (255, 110, 200), (255, 150, 30), (60, 220, 60), (40, 230, 255),
           (255, 230, 40), (255, 255, 255))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, shape colour) as int arrays."""
    return np.array(BACKGROUND), np.array(PALETTE[int(rng.integers(len(PALETTE)))])


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def render(seed: int, split: str, index: int, size: int = 64) -> dict[str, Any]:
    """Render one sample: image (H,W,3) uint8, label, inverse depth (H,W) float in [0,1], normals (H,W,3) in [-1,1]."""
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])
    label = int(rng.integers(len(SHAPES)))
    bg, fg = _colours(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xx + 0.5) / size * 2 - 1, (yy + 0.5) / size * 2 - 1  # [-1, 1], v grows downwards
    tilt = rng.uniform(0.2, 0.6)
    depth = 3.0 - tilt * v  # metric depth: the plane recedes towards the top
    normal = np.zeros((size, size, 3))
    normal[..., 1], normal[..., 2] = -tilt / np.sqrt(1 + tilt**2), 1 / np.sqrt(1 + tilt**2)
    radius = rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(-0.9 + radius, 0.9 - radius, 2)
    theta = rng.uniform(0, 2 * np.pi)
    z0 = rng.uniform(1.6, 2.2)
    p = np.stack([u - cx, v - cy], -1) @ _rot(theta)  # shape-local coordinates
    r = np.hypot(p[..., 0], p[..., 1])
    name = SHAPES[label]
    shade = np.ones((size, size))
    if name == "circle":
        mask = r < radius
        h = np.sqrt(np.clip(radius**2 - r**2, 0, None))
        n = np.stack([u - cx, v - cy, h], -1)  # sphere normal in image axes
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-9
        obj_depth, obj_normal = z0 - h, n
        shade = SHADE_MIN + (1 - SHADE_MIN) * np.clip(n @ np.array([-0.4, -0.5, 0.77]), 0, 1)
    elif name == "square":
        mask = (np.abs(p[..., 0]) < radius * 0.8) & (np.abs(p[..., 1]) < radius * 0.8)
        obj_depth, obj_normal = np.full_like(u, z0), np.broadcast_to([0.0, 0.0, 1.0], (size, size, 3))
    elif name == "triangle":
        a = radius * 1.1
        mask = (p[..., 1] < a * 0.5) & (np.sqrt(3) * p[..., 0] - p[..., 1] < a) & (-np.sqrt(3) * p[..., 0] - p[..., 1] < a)
        obj_depth, obj_normal = np.full_like(u, z0), np.broadcast_to([0.0, 0.0, 1.0], (size, size, 3))
    else:  # diamond = square pyramid seen from above, rotated 45°: four faces with their own normals
        l1 = np.abs(p[..., 0]) + np.abs(p[..., 1])
        mask = l1 < radius
        slope = 0.8
        obj_depth = z0 - slope * (radius - l1)
        gx, gy = np.sign(p[..., 0]) * slope, np.sign(p[..., 1]) * slope
        g = np.stack([gx, gy], -1) @ _rot(theta).T  # back to image axes
        n = np.concatenate([g, np.ones_like(gx)[..., None]], -1)
        obj_normal = n / np.linalg.norm(n, axis=-1, keepdims=True)
        shade = SHADE_MIN + (1 - SHADE_MIN) * np.clip(obj_normal @ np.array([-0.4, -0.5, 0.77]), 0, 1)
    img = np.broadcast_to(bg, (size, size, 3)).astype(np.float64).copy()
    img[mask] = fg * shade[mask][:, None]
    depth = np.where(mask, obj_depth, depth)
    normal = np.where(mask[..., None], obj_normal, normal)
    inv = 1.0 / depth
    inv = (inv - 1 / 3.8) / (1 / 1.0 - 1 / 3.8)  # fixed range → comparable across samples
    return {
        "image": np.clip(img, 0, 255).astype(np.uint8),
        "label": label,
        "inv_depth": np.clip(inv, 0, 1),
        "normal": normal,
        "mask": mask,
        "meta": {"shape": name, "center": [float(cx), float(cy)], "radius": float(radius), "theta": float(theta)},
    }


def canny(image_rgb: np.ndarray) -> np.ndarray:
    """The world's canny condition, from the shared edge extractor (same object as the metric)."""
    from ctrlgen.lightning_modules.metrics.edges import get_edge_extractor

    out = get_edge_extractor("cv2_canny_100_200")(image_rgb)
    return np.asarray(out).reshape(image_rgb.shape[:2]).astype(np.uint8) * (255 if np.asarray(out).max() <= 1 else 1)


def samples(seed: int, split: str, n: int, size: int = 64, start: int = 0) -> Iterator[dict[str, Any]]:
    """WebDataset samples: ``jpg`` (q95), ``cls``, ``canny.png`` (from the decoded jpg), ``depth.png``, ``normal.png``, ``json``."""
    from ctrlgen.datamodules.shards import decode_image, encode_jpg, encode_png

    for i in range(start, start + n):
        r = render(seed, split, i, size)
        jpg = encode_jpg(r["image"], quality=95)
        stored = decode_image(jpg)
        yield {
            "__key__": f"{split}_{i:07d}",
            "jpg": jpg,
            "cls": r["label"],
            "canny.png": encode_png(canny(stored)),
            "depth.png": encode_png((r["inv_depth"] * 255).round().astype(np.uint8)),
            "normal.png": encode_png(((r["normal"] + 1) / 2 * 255).round().astype(np.uint8)),
            "json": {**r["meta"], "label_name": r["meta"]["shape"], "world": "shapes", "seed": seed, "index": i},
        }


def preview(path: str, seed: int = 0, n: int = 8, size: int = 64) -> None:
    """Save a PNG strip: rows image / canny / depth / normal (for eyeballing the world)."""
    rows = []
    for s in samples(seed, "train", n, size):
        dec = [np.asarray(Image.open(io.BytesIO(s[k])).convert("RGB")) for k in ("jpg", "canny.png", "depth.png", "normal.png")]
        rows.append(np.concatenate(dec, 0))
    cv2.imwrite(path, cv2.cvtColor(np.concatenate(rows, 1), cv2.COLOR_RGB2BGR))
