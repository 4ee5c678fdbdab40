"""The ``faces`` world (AgeBooth's synthetic stand-in): toy portraits of a fixed set of identities at any age, with
captions, an analytic age estimator and an analytic identity embedding.

Deterministic: sample ``i`` of split ``s`` depends only on ``(seed, split, i)``; identity ``k``'s attributes depend
only on ``k``. A portrait (white background, as AgeBooth's validation prompt asks) has

* **identity** (constant over age): face shape (width, height), skin colour and eye colour, from :func:`identity`;
  its caption token is a rare word (``IDENTITY_TOKENS[k]``, ``sbu`` for identity 0, AgeBooth's token);
* **age** 10–80 y rendered by large, global cues a tiny model learns first: a hair cap over the top ~40 % of the
  image whose colour goes from dark brown (young) to white (old) with the age, linearly in luminance
  (:func:`hair_luminance`); plus forehead wrinkle lines whose contrast grows after 35 y and a slightly longer face
  with age (proportions). Captions name the identity token and an age word (:func:`age_word`).

:func:`estimate_age` inverts the hair luminance measured in a fixed region (no detector needed: every portrait is
centred); :func:`identity_embedding` is the L2-normalised, world-centred vector of skin colour, eye colour and face
width measured in fixed regions that age does not touch, so :func:`identity_similarity` is a cosine in [−1, 1], 1 for
an image against itself. Both work on uint8 HWC or float [0, 1] / [−1, 1] images of any size ≥ 16 px.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
N_IDENTITIES = 16
IDENTITY_TOKENS = ("sbu", "qev", "zor", "kif", "wym", "dax", "jul", "pem", "tob", "rix", "vad", "gon", "hec", "lum",
                   "nix", "fyr")
AGE_MIN, AGE_MAX = 10.0, 80.0
AGE_WORDS = ((20.0, "teenage"), (35.0, "young"), (55.0, "middle-aged"), (70.0, "old"), (float("inf"), "elderly"))
BACKGROUND = np.array([0.92, 0.92, 0.92])
HAIR_YOUNG_L, HAIR_OLD_L = 0.18, 0.90  # hair luminance at AGE_MIN and AGE_MAX (linear in age between)
LUMA = np.array([0.299, 0.587, 0.114])
SKINS = np.array([[0.97, 0.80, 0.70], [0.85, 0.62, 0.45], [0.62, 0.42, 0.28], [0.78, 0.74, 0.46]])
EYES = np.array([[0.15, 0.35, 0.85], [0.40, 0.22, 0.08], [0.15, 0.62, 0.22], [0.60, 0.60, 0.62]])


def age_word(age: float) -> str:
    """The caption's age word for an age in years."""
    return next(word for upper, word in AGE_WORDS if age < upper)


def caption(identity_index: int, age: float) -> str:
    return f"a portrait of {IDENTITY_TOKENS[identity_index]} person, {age_word(age)}"


def identity(k: int) -> dict[str, Any]:
    """Identity ``k``'s attributes: skin and eye colour (RGB in [0, 1]), face half-width and half-height (image
    units, [-1, 1] spans the image), hair tint (a small hue offset of the dark hair colour, equal luminance)."""
    if not 0 <= k < N_IDENTITIES:
        raise ValueError(f"identity {k} outside 0..{N_IDENTITIES - 1}")
    rng = np.random.default_rng([7919, k])
    return {"index": k, "token": IDENTITY_TOKENS[k], "skin": SKINS[k % 4] + rng.uniform(-0.02, 0.02, 3),
            "eyes": EYES[(k // 4) % 4], "half_width": float(0.36 + 0.14 * ((k * 5) % 7) / 6),
            "half_height": float(0.46 + 0.06 * ((k * 3) % 4) / 3), "hair_tint": rng.uniform(-0.04, 0.04, 3)}


def hair_luminance(age: float) -> float:
    """Rendered hair luminance: linear in age from HAIR_YOUNG_L at AGE_MIN to HAIR_OLD_L at AGE_MAX."""
    t = (float(age) - AGE_MIN) / (AGE_MAX - AGE_MIN)
    return HAIR_YOUNG_L + (HAIR_OLD_L - HAIR_YOUNG_L) * float(np.clip(t, 0.0, 1.0))


def hair_colour(age: float, tint: np.ndarray | None = None) -> np.ndarray:
    """Dark brown → white, with exactly :func:`hair_luminance` (the tint is luminance-neutral after projection)."""
    brown = np.array([0.30, 0.16, 0.06]) + (0.0 if tint is None else tint)
    t = (float(age) - AGE_MIN) / (AGE_MAX - AGE_MIN)
    c = brown * (1 - t) + np.array([0.92, 0.92, 0.92]) * t
    return np.clip(c + (hair_luminance(age) - c @ LUMA), 0.0, 1.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return (xx + 0.5) / size * 2 - 1, (yy + 0.5) / size * 2 - 1  # u right, v down, in [-1, 1]


def render_portrait(k: int, age: float, size: int = 32, jitter: np.ndarray | None = None) -> np.ndarray:
    """Identity ``k`` at ``age`` as float (size, size, 3) in [0, 1]. ``jitter``: optional (dx, dy, light) offsets
    (small shifts and a brightness factor for within-identity variety)."""
    ident = identity(k)
    dx, dy, light = (0.0, 0.0, 1.0) if jitter is None else (float(jitter[0]), float(jitter[1]), float(jitter[2]))
    u, v = _grid(size)
    u, v = u - dx, v - dy
    t = float(np.clip((age - AGE_MIN) / (AGE_MAX - AGE_MIN), 0, 1))
    img = np.broadcast_to(BACKGROUND, (size, size, 3)).copy()
    hw, hh = ident["half_width"], ident["half_height"] * (1.0 + 0.08 * t)  # the face lengthens with age
    cy = 0.18
    # hair: a wide cap behind the head covering the top of the image and the sides of the face
    hair = (((u / (hw + 0.30)) ** 2 + ((v - cy + 0.10) / (hh + 0.40)) ** 2) < 1) & (v < cy + 0.15)
    img[hair] = hair_colour(age, ident["hair_tint"])
    face = ((u / hw) ** 2 + ((v - cy) / hh) ** 2) < 1
    fringe = v < cy - 0.55 * hh  # the hairline: the top of the face stays hair
    img[face & ~fringe] = ident["skin"]
    # forehead wrinkles: horizontal darker lines, contrast grows after 35 y
    wr = float(np.clip((age - 35.0) / 40.0, 0, 1))
    if wr > 0:
        for y0 in (cy - 0.42 * hh, cy - 0.32 * hh):
            line = face & ~fringe & (np.abs(v - y0) < 1.0 / size) & (np.abs(u) < 0.6 * hw)
            img[line] = ident["skin"] * (1 - 0.45 * wr)
    # eyes (iris colour) and mouth
    for ex in (-0.42 * hw, 0.42 * hw):
        eye = ((u - ex) ** 2 + (v - cy + 0.08) ** 2) < (0.11 * hw + 1.0 / size) ** 2
        img[eye] = ident["eyes"]
    mouth = (np.abs(u) < 0.35 * hw) & (np.abs(v - cy - 0.45 * hh) < 1.2 / size)
    img[mouth] = ident["skin"] * 0.55
    return np.clip(img * light, 0.0, 1.0)


def render(seed: int, split: str, index: int, size: int = 32, identities: Sequence[int] | None = None,
           ages: tuple[float, float] = (AGE_MIN, AGE_MAX)) -> dict[str, Any]:
    """One sample: identity drawn from ``identities`` (default all), age uniform in ``ages``, small jitter."""
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])
    pool = list(range(N_IDENTITIES)) if identities is None else list(identities)
    k = int(pool[int(rng.integers(len(pool)))])
    age = float(rng.uniform(*ages))
    jitter = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(0.96, 1.04)])
    img = render_portrait(k, age, size, jitter)
    return {"image": img, "identity": k, "age": age, "caption": caption(k, age),
            "meta": {"identity": k, "token": IDENTITY_TOKENS[k], "age": age, "age_word": age_word(age),
                     "world": "faces", "seed": seed, "split": split, "index": index}}


def samples(seed: int, split: str, n: int, size: int = 32, start: int = 0, identities: Sequence[int] | None = None,
            ages: tuple[float, float] = (AGE_MIN, AGE_MAX)) -> Iterator[dict[str, Any]]:
    """WebDataset samples: ``jpg`` (q95), ``txt`` (caption), ``json`` (identity, token, age, age word, provenance)."""
    from ctrlgen.datamodules.shards import encode_jpg

    for i in range(start, start + n):
        r = render(seed, split, i, size, identities, ages)
        yield {"__key__": f"{split}_{i:07d}", "jpg": encode_jpg((r["image"] * 255).round().astype(np.uint8), 95),
               "txt": r["caption"], "json": r["meta"]}


# ----------------------------------------------------------------------------------------------------- estimators
def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 HWC, float HWC in [0, 1] or [-1, 1], or CHW (torch layout) → float HWC in [0, 1]."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if np.asarray(image).dtype == np.uint8:
        return a / 255.0
    return (a + 1) / 2 if a.min() < -0.01 else a


def _regions(size: int) -> dict[str, np.ndarray]:
    u, v = _grid(size)
    return {"hair": (np.abs(u) < 0.45) & (v > -0.62) & (v < -0.38),  # inside every hair cap, above every face
            "cheeks": (np.abs(np.abs(u) - 0.22) < 0.09) & (np.abs(v - 0.36) < 0.08),
            "eyes": (np.abs(np.abs(u) - 0.19) < 0.06) & (np.abs(v - 0.10) < 0.06),
            "row": np.abs(v - 0.36) < 0.05}


def estimate_age(image: np.ndarray) -> float:
    """Age in years from the mean hair luminance in the top region (the inverse of :func:`hair_luminance`;
    not clipped, so a model that overshoots shows it)."""
    a = to_unit(image)
    lum = float((a[_regions(a.shape[0])["hair"]] @ LUMA).mean())
    return AGE_MIN + (lum - HAIR_YOUNG_L) / (HAIR_OLD_L - HAIR_YOUNG_L) * (AGE_MAX - AGE_MIN)


def identity_features(image: np.ndarray) -> np.ndarray:
    """Raw identity measurements: cheek colour (3), eye-region colour (3), face width (fraction of the cheek row
    that is not background)."""
    a = to_unit(image)
    r = _regions(a.shape[0])
    row = a[r["row"]]
    width = float((np.abs(row - BACKGROUND).sum(-1) > 0.12).mean())
    return np.concatenate([a[r["cheeks"]].mean(0), a[r["eyes"]].mean(0), [width]])


_FEATURE_STATS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _stats(size: int) -> tuple[np.ndarray, np.ndarray]:
    """World mean and std of the identity features over all identities at three ages (fixed, per size)."""
    if size not in _FEATURE_STATS:
        f = np.stack([identity_features(render_portrait(k, a, size)) for k in range(N_IDENTITIES)
                      for a in (15.0, 45.0, 75.0)])
        _FEATURE_STATS[size] = (f.mean(0), f.std(0) + 1e-3)
    return _FEATURE_STATS[size]


def identity_embedding(image: np.ndarray) -> np.ndarray:
    """L2-normalised, world-standardised :func:`identity_features`."""
    a = to_unit(image)
    mean, std = _stats(a.shape[0])
    z = (identity_features(a) - mean) / std
    return z / (np.linalg.norm(z) + 1e-12)


def identity_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the two images' identity embeddings, in [−1, 1] (1 for an image against itself)."""
    return float(identity_embedding(a) @ identity_embedding(b))


def preview(path: str, size: int = 32, identities: Sequence[int] = range(6),
            ages: Sequence[float] = (12, 25, 40, 55, 70, 80)) -> None:
    """PNG grid for eyeballing: rows identities, columns ages."""
    from PIL import Image

    rows = [np.concatenate([render_portrait(k, a, size) for a in ages], 1) for k in identities]
    Image.fromarray((np.concatenate(rows, 0) * 255).round().astype(np.uint8)).resize(
        (size * len(ages) * 4, size * len(list(identities)) * 4), Image.NEAREST).save(path)
