"""ECM data: images + class labels + condition maps (canny/depth/normal), optionally pre-tokenised VQ codes.

Shard keys (ecm.md §5): ``jpg`` (or ``png``), ``cls``, ``canny.png``/``depth.png``/``normal.png`` (lossless, computed on
exactly the stored crop), optional ``vq.npy`` (680 uint16 codes in VAR order) and ``json``. Image and condition share one
resize + crop, VAR-style (shorter side → ``mid_reso`` × resolution, then a random crop for training, the centre for
evaluation; pre-tokenised samples are used as stored); both are returned in [-1, 1], conditions as 3 channels
(canny/depth replicated, normal as RGB). With ``canny_on_the_fly`` the canny map is extracted in the workers by the
shared edge extractor (the same object the F1 metric uses), so shards need no ``canny.png``.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Any

import cv2
import numpy as np

from ctrlgen.datamodules.base import BaseWdsDataModule

CONDITION_TYPES = ("canny", "depth", "normal")


def check_mid_reso(mid_reso: float, what: str = "mid_reso") -> float:
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


CROP_KEY = re.compile(r"^c\d+\.")  # keys of extra stored crops (c1.jpg, c1.canny.png, c1.vq.npy; tokenize)


def crop_prefix(j: int) -> str:
    """Key prefix of stored crop ``j`` of a pre-tokenised sample (0 = the centre crop, unprefixed)."""
    return "" if j == 0 else f"c{j}."


def stored_crops(sample: Any) -> int:
    """Crops a pre-tokenised sample holds: 1 + the number of ``c<j>.vq.npy`` keys (no value is decoded)."""
    return 1 + sum(1 for k in sample if CROP_KEY.match(k) and k.endswith(".vq.npy"))


def to_signed(a: np.ndarray) -> np.ndarray:
    """uint8 HW or HWC → float32 CHW in [-1, 1], 1-channel maps replicated to 3."""
    x = a.astype(np.float32) / 127.5 - 1.0
    if x.ndim == 2:
        x = np.repeat(x[None], 3, 0)
    else:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x)


class ECMDataModule(BaseWdsDataModule):
    def __init__(self, condition_types: list[str] | None = None, image_key: str = "jpg", canny_on_the_fly: bool = False,
                 edge_extractor: str = "cv2_canny_100_200", pretokenized: bool = False, random_crop: bool = True,
                 mid_reso: float = 1.125, **kwargs: Any):
        """``mid_reso``: the shorter side is first resized to ``mid_reso`` × resolution (VAR: 1.125, i.e. 288 for
        256), then cropped; 1.0 crops the shorter side whole (e.g. for images rendered at the training size)."""
        super().__init__(**kwargs)
        self.mid_reso = check_mid_reso(mid_reso, "data.init_args.mid_reso")
        self.condition_types = list(condition_types or ["canny"])
        bad = [t for t in self.condition_types if t not in CONDITION_TYPES]
        if bad:
            raise ValueError(f"data.condition_types: unknown {bad}; expected a subset of {list(CONDITION_TYPES)}")
        self.image_key, self.canny_on_the_fly, self.edge_extractor = image_key, canny_on_the_fly, edge_extractor
        self.pretokenized, self.random_crop = pretokenized, random_crop
        keys = [image_key, "cls"] + [f"{t}.png" for t in self.condition_types if not (t == "canny" and canny_on_the_fly)]
        self.required_keys = keys + (["vq.npy"] if pretokenized else [])

    def to_item(self, sample: dict[str, Any], rng: random.Random, stage: str) -> dict[str, Any]:
        for k in self.required_keys:
            if k not in sample:
                raise KeyError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} lacks key {k!r}")
        n_types = len(self.condition_types)
        # training: a random type per sample; evaluation: a fixed type per sample key (the same on every rank, worker
        # and epoch), so every type is evaluated on about 1/n of the images
        ctype = rng.randrange(n_types) if stage == "train" else zlib.crc32(str(sample["__key__"]).encode()) % n_types
        name = self.condition_types[ctype]
        crop = ""  # pre-tokenised shards may store several crops (tokenize --crops-per-image): one per epoch
        if self.pretokenized and stage == "train" and self.random_crop:
            n = stored_crops(sample)
            crop = crop_prefix(rng.randrange(n)) if n > 1 else ""
        image = sample[crop + self.image_key]
        if name == "canny" and self.canny_on_the_fly:
            cond = None
        else:
            cond = sample[f"{crop}{name}.png"]
        crop_rng = rng if (stage == "train" and self.random_crop and not self.pretokenized) else None
        mid = 1.0 if self.pretokenized else self.mid_reso  # pre-tokenised: the stored crop is the crop of the codes
        arrays = resize_crop([image] + ([cond] if cond is not None else []), self.resolution, crop_rng, mid)
        image = arrays[0]
        if cond is None:
            from ctrlgen.lightning_modules.metrics.edges import get_edge_extractor

            cond = np.asarray(get_edge_extractor(self.edge_extractor)(image)).reshape(image.shape[:2])
            cond = (cond > 0).astype(np.uint8) * 255
        else:
            cond = arrays[1]
        item = {"image": to_signed(image), "cond": to_signed(cond), "label": int(sample["cls"]), "cond_type": ctype,
                "key": sample["__key__"]}
        if self.pretokenized:
            item["codes"] = sample[crop + "vq.npy"].astype(np.int64).reshape(-1)
        return item
