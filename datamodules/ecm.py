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
import zlib
from typing import Any

import numpy as np

from ctrlgen.datamodules.base import BaseWdsDataModule
from ctrlgen.datamodules.images import check_mid_reso, crop_prefix, resize_crop, stored_crops, to_signed

CONDITION_TYPES = ("canny", "depth", "normal")


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
