"""ECM data: images + class labels + condition maps (canny/depth/normal), optionally pre-tokenised VQ codes.

Shard keys (ecm.md §5): ``jpg`` (or ``png``), ``cls``, ``canny.png``/``depth.png``/``normal.png`` (lossless, computed on
exactly the stored crop), optional ``vq.npy`` (680 uint16 codes in VAR order) and ``json``. Image and condition share one
resize + crop, VAR-style (shorter side → ``mid_reso`` × resolution, then a random crop for training, the centre for
evaluation; pre-tokenised samples are used as stored); both are returned in [-1, 1], conditions as 3 channels
(canny/depth replicated, normal as RGB). With ``canny_on_the_fly`` the canny map is extracted in the workers by the
shared edge extractor (the same object the F1 metric uses), so shards need no ``canny.png``.

Labels are range-checked as they are decoded: a ``cls`` that is not an int in [0, ``num_classes``) is skipped and
counted (reason ``LabelError``, with the sample key and shard), or stops the run with ``strict_labels: true``.
``num_classes`` is given, or taken from the model by its datamodule check (``VARBase.check_datamodule``). Every other
fault of a sample (a key that does not decode, an image that is not RGB, a map of another size) names the key, the
sample and the shard. ``ctrlgen predict`` reads ``predict_shards`` or, with ``predict_files``, a folder or glob of
condition maps (PNG/NPY) with classes from ``predict_labels`` (JSON ``{stem: class}``) and/or ``predict_class``.
"""

from __future__ import annotations

import glob
import json
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from ctrlgen.datamodules.base import BaseWdsDataModule, FatalSampleError, collate, make_loader, worker_info
from ctrlgen.datamodules.images import (MAP_EXTS, check_mid_reso, crop_prefix, read_map_file, resize_crop,
                                        stored_crops, to_signed)
from ctrlgen.datamodules.shards import IMAGE_EXTS

CONDITION_TYPES = ("canny", "depth", "normal")


class ECMDataModule(BaseWdsDataModule):
    def __init__(self, condition_types: list[str] | None = None, image_key: str = "jpg", canny_on_the_fly: bool = False,
                 edge_extractor: str = "cv2_canny_100_200", pretokenized: bool = False, random_crop: bool = True,
                 mid_reso: float = 1.125, num_classes: int | None = None, strict_labels: bool = False,
                 predict_files: str | list[str] | None = None, predict_labels: str | None = None,
                 predict_class: int | None = None, predict_condition: str | None = None, **kwargs: Any):
        """``mid_reso``: the shorter side is first resized to ``mid_reso`` × resolution (VAR: 1.125, i.e. 288 for
        256), then cropped; 1.0 crops the shorter side whole (e.g. for images rendered at the training size).
        ``num_classes``: labels must lie in [0, num_classes) (unset: the model's); ``strict_labels``: a label out of
        range stops the run instead of being skipped and counted.
        ``predict_files``: a folder, glob or list of condition-map files (PNG/NPY) to predict from instead of
        ``predict_shards``; each map's class comes from ``predict_labels`` (a JSON file ``{file stem: class}``),
        else ``predict_class``; ``predict_condition``: the type of those maps (default: the first condition type).
        Maps are resized (shorter side) to ``resolution`` and centre-cropped; output images are named by file stem."""
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
        self.num_classes, self.strict_labels = (None if num_classes is None else int(num_classes)), strict_labels
        self.predict_files, self.predict_labels, self.predict_class = predict_files, predict_labels, predict_class
        self.predict_condition = predict_condition or self.condition_types[0]
        if self.predict_condition not in self.condition_types:
            raise ValueError(f"data.init_args.predict_condition {predict_condition!r} is not one of the condition "
                             f"types {self.condition_types}")
        self._predict_entries: list[tuple[Path, Any, str]] | None = None

    # ---------------------------------------------------------------------------------------------- decoding
    def to_item(self, sample: dict[str, Any], rng: random.Random, stage: str) -> dict[str, Any]:
        for k in self.required_keys:
            if k not in sample:
                raise KeyError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} lacks key {k!r}")
        n_types = len(self.condition_types)
        # training: a random type per sample; evaluation: a fixed type per sample key (the same on every rank, worker
        # and epoch), so every type is evaluated on about 1/n of the images
        ctype = rng.randrange(n_types) if stage == "train" else zlib.crc32(str(sample["__key__"]).encode()) % n_types
        name = self.condition_types[ctype]
        label = self.label_of(sample)
        crop = ""  # pre-tokenised shards may store several crops (tokenize --crops-per-image): one per epoch
        if self.pretokenized and stage == "train" and self.random_crop:
            n = stored_crops(sample)
            crop = crop_prefix(rng.randrange(n)) if n > 1 else ""
        image = _rgb(_read(sample, crop + self.image_key), _where(sample, crop + self.image_key))
        if name == "canny" and self.canny_on_the_fly:
            cond = None
        else:
            ckey = f"{crop}{name}.png"
            cond = _read(sample, ckey)
            if np.ndim(cond) not in (2, 3) or cond.shape[:2] != image.shape[:2]:
                raise ValueError(f"{_where(sample, ckey)} has shape {np.shape(cond)} but its image "
                                 f"{crop + self.image_key!r} is {image.shape[:2]}: condition maps must be computed on "
                                 "exactly the stored image (pack again, or set canny_on_the_fly for canny)")
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
        item = {"image": to_signed(image), "cond": to_signed(cond), "label": label, "cond_type": ctype,
                "key": sample["__key__"]}
        if self.pretokenized:
            item["codes"] = _read(sample, crop + "vq.npy").astype(np.int64).reshape(-1)
        return item

    def label_of(self, sample: dict[str, Any]) -> int:
        """The sample's ``cls`` as an int in [0, num_classes): else ``LabelError`` (skipped and counted), or
        ``FatalSampleError`` with ``strict_labels``."""
        raw = dict.get(sample, "cls")
        try:
            value = sample["cls"]
        except (ValueError, UnicodeDecodeError):
            value = raw
        problem = label_problem(value, self.num_classes)
        if problem is None:
            return int(value)
        msg = (f"{_where(sample, 'cls')} is {_show(value)}, {problem}; fix the labels, or check that the model's "
               "num_classes is the data's")
        if self.strict_labels:
            raise FatalSampleError(f"{msg} (data.init_args.strict_labels: true stops the run on such a sample; "
                                   "false skips and counts it)")
        raise LabelError(msg)

    # ------------------------------------------------------------------------------------ predict from map files
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if self.predict_files is not None and self.shards["predict"] is not None:
                raise ValueError("data.init_args: give predict_shards or predict_files, not both (set the other to "
                                 "null)")
            if self.predict_files is None and self.shards["predict"] is None:
                raise ValueError("ctrlgen predict needs data.init_args.predict_shards (shards) or "
                                 "data.init_args.predict_files (a folder or glob of PNG/NPY condition maps)")
            if self.predict_files is not None:
                self._predict_entries = self.predict_entries()
                return
        super().setup(stage)

    def predict_entries(self) -> list[tuple[Path, Any, str]]:
        """(file, class, where the class came from) for every map of ``predict_files``; fails naming the pattern, file or stem at fault."""
        files = list_map_files(self.predict_files, "data.init_args.predict_files")
        labels: dict[str, Any] = {}
        if self.predict_labels is not None:
            path = Path(self.predict_labels).expanduser()
            try:
                labels = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"data.init_args.predict_labels {str(path)!r} cannot be read as JSON ({e}); it must "
                                 "be an object {\"<file stem>\": <class>, ...}") from None
            if not isinstance(labels, dict):
                raise ValueError(f"data.init_args.predict_labels {str(path)!r} holds a {type(labels).__name__}, "
                                 "expected an object {\"<file stem>\": <class>, ...}")
        if self.predict_labels is None and self.predict_class is None:
            raise ValueError("data.init_args.predict_files: give each map a class with predict_class (one class for "
                             "all) or predict_labels (a JSON file {\"<file stem>\": <class>})")
        unlabelled = [f for f in files if f.stem not in labels and self.predict_class is None]
        if unlabelled:
            raise ValueError(f"data.init_args.predict_labels {self.predict_labels!r} has no class for "
                             f"{len(unlabelled)} of {len(files)} maps, e.g. {[str(f) for f in unlabelled[:5]]}; add "
                             "their stems or set predict_class as the default")
        return [(f, labels[f.stem] if f.stem in labels else self.predict_class,
                 f"data.init_args.predict_labels {self.predict_labels!r}" if f.stem in labels
                 else "data.init_args.predict_class") for f in files]

    def check_predict_labels(self, entries: list[tuple[Path, Any, str]]) -> None:
        """Every class an int in [0, num_classes): else a ValueError naming the file and where its class came from."""
        for f, cls, source in entries:
            problem = label_problem(cls, self.num_classes)
            if problem is not None:
                raise ValueError(f"{f}: class {_show(cls)} (from {source}) is {problem}")

    def read_map(self, path: Path, cls: Any) -> dict[str, Any]:
        """One predict item from a map file: the condition in [-1, 1] at ``resolution`` (centre crop), its class,
        its condition type and its stem as key."""
        cond = read_map_file(path)
        cond = resize_crop([cond], self.resolution, None, 1.0)[0]
        return {"cond": to_signed(cond), "label": int(cls), "cond_type": self.condition_types.index(
            self.predict_condition), "key": path.stem}

    def _eval_loader(self, stage: str) -> Any:
        if stage != "predict" or self.predict_files is None:
            return super()._eval_loader(stage)
        entries = self._predict_entries if self._predict_entries is not None else self.predict_entries()
        self.check_predict_labels(entries)
        rank, world = self.rank_and_world
        return make_loader(MapFiles(entries, self.read_map, self.eval_batch_size, rank, world), 0, self.seed, rank,
                           stage)


class LabelError(ValueError):
    """A sample's class label is not an int in [0, num_classes) (skipped and counted under this reason)."""


def label_problem(value: Any, num_classes: int | None) -> str | None:
    """Why ``value`` is not a class label in [0, num_classes) (``None``: it is one; no upper bound when unknown)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return "not an int"
    if value < 0:
        return "negative (classes are 0 .. num_classes-1)"
    if num_classes is not None and value >= num_classes:
        return f"out of range: num_classes is {num_classes} (classes 0 .. {num_classes - 1})"
    return None


def list_map_files(spec: str | list[str], what: str) -> list[Path]:
    """The map files of a folder (its PNG/NPY files), a glob or a file (or a list of these), sorted and checked: a
    pattern matching nothing, an image that is not PNG/NPY (JPEG is lossy) or two files with one stem fail."""
    files: list[Path] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        p = Path(str(item)).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS + MAP_EXTS)
            if not found:
                raise FileNotFoundError(f"{what}: the folder {str(p)!r} holds no PNG/NPY condition maps")
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
            if not found:
                raise FileNotFoundError(f"{what}: no file matches {str(item)!r}")
        elif p.is_file():
            found = [p]
        else:
            raise FileNotFoundError(f"{what}: {str(item)!r} does not exist")
        files.extend(found)
    bad = [f for f in files if f.suffix.lower() not in MAP_EXTS]
    if bad:
        raise ValueError(f"{what}: {len(bad)} of {len(files)} files are not PNG/NPY condition maps, e.g. "
                         f"{[str(f) for f in bad[:3]]}; give edge/depth/normal maps as PNG or NPY (JPEG is lossy and "
                         "blurs them), or predict_shards for shards")
    stems = Counter(f.stem for f in files)
    dup = sorted(str(f) for f in files if stems[f.stem] > 1)
    if dup:
        raise ValueError(f"{what}: outputs are named by file stem, and several files share one: {dup[:6]}; rename them")
    return files


class MapFiles(IterableDataset):
    """Batches of predict items from map files: ranks take every ``world``-th file, workers split a rank's files."""

    def __init__(self, entries: list[tuple[Path, Any, str]], read: Any, batch_size: int, rank: int, world: int):
        self.entries, self.read, self.batch_size, self.rank, self.world = entries, read, batch_size, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, nworkers = worker_info()
        mine = self.entries[self.rank :: self.world][worker::nworkers]
        for i in range(0, len(mine), self.batch_size):
            yield collate([self.read(f, c) for f, c, _ in mine[i : i + self.batch_size]])


# -------------------------------------------------------------------------------------------------------- helpers
def _where(sample: dict[str, Any], key: str) -> str:
    return f"key {key!r} of sample {sample.get('__key__')!r} in {sample.get('__url__')!r}"


def _show(value: Any) -> str:
    return repr(value.decode(errors="replace") if isinstance(value, bytes) else value)


def _read(sample: dict[str, Any], key: str) -> Any:
    """``sample[key]`` decoded; a decoding error is re-raised (same type where possible) naming key, sample, shard."""
    try:
        return sample[key]
    except Exception as e:  # noqa: BLE001 - re-raised with the key named; the stream skips and counts it
        from ctrlgen.datamodules.shards import describe_error

        msg = f"{_where(sample, key)} does not decode: {describe_error(e, key)[:300]}"
        try:
            err = type(e)(msg)
        except Exception:  # noqa: BLE001 - an exception type without a message constructor
            err = ValueError(msg)
        raise err from None


def _rgb(image: Any, where: str) -> np.ndarray:
    """A decoded image as uint8 (H,W,3): grey (H,W) is replicated to 3 channels (as JPEG decoding does)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{where}: expected an (H,W,3) RGB image, got shape {a.shape}")
    return a
