"""Several named WebDataset streams in one training batch ``{name: batch}``, and proportional mixing of unpaired sets.

```yaml
data:
  class_path: ctrlgen.datamodules.multi.MultiStreamDataModule
  init_args:
    batch_size: 8                      # default batch size of every stream and of the mixed stream
    train_batches_per_epoch: 1000      # per rank, the same for every stream (or train_samples_per_epoch: N)
    streams:
      prompts: {train_shards: "/d/prompts-{000000..000003}.tar", keys: {json: meta}, batch_size: 4}
      shallow: {train_shards: "/d/shallow-{000000..000099}.tar", keys: {jpg: image, json: exif}}
      deep:    {train_shards: "/d/deep-{000000..000099}.tar", keys: {jpg: image, json: exif}, val_shards: ...}
    mix: {shallow: 0.5, deep: 0.5}     # optional: these sources become ONE stream named `mix_name`
    mix_name: real
```

**Streams.** Each stream is exactly a ``BaseWdsDataModule`` training stream (resampled shards, shuffle buffer, decode,
batch; ``ctrlgen.datamodules.base.ShardStream``) with its own shards, batch size and decoding, seeded with ``(seed,
stream name)``: its batches depend on ``(seed, name, rank, worker, epoch)`` only, so adding a stream never changes
another one. All streams are read in the same worker processes and zipped there, so every training batch holds one batch
of each stream and every rank gets ``train_batches_per_epoch`` of them. Resume is the base bookkeeping
(``ResumableDataModule``): N straight batches == N/2, checkpoint, resume, N/2 for every stream. Skips of all streams are
counted by ``SKIPS`` and carried as one top-level ``_data_health`` (the per-stream ones are removed).

**Mixing.** With ``mix: {a: p_a, b: p_b}`` (weights are normalised), every sample slot of a mixed batch picks its source
with probability p from ``random.Random(seed("mix", seed, rank, worker, epoch))`` and takes that source's next item;
each source keeps its own resampled stream. Mixed items carry ``source``: the index of their set in ``mix`` order
(``self.mix_sources``). Sources must produce the same item keys; they are read only through the mix. Batch size of the
mix: ``batch_size``.

**Decoding.** ``to_item(stream, sample, rng, stage)`` is the hook (override it for a method); the default maps shard keys
to batch keys with the stream's ``keys`` (default ``{jpg: image}``): images (jpg/png/webp) of a sample share one resize
+ crop to the stream's ``resolution`` (random crop in training if ``random_crop``) and become float CHW in [-1, 1]
(1-channel maps replicated to 3); everything else (json dicts, txt, cls, npy) is kept as decoded. Every item has ``key``.

**Evaluation.** Streams with ``val_shards``/``test_shards`` read every sample once (exact splits, as the base); one loader
per such stream, batches shaped ``{name: batch}``; several streams → a list of loaders (``dataloader_idx``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ctrlgen.datamodules.base import (
    ResumableDataModule,
    ShardStream,
    collate,
    eval_workers,
    make_loader,
    worker_info,
)
from ctrlgen.datamodules.images import resize_crop, to_signed
from ctrlgen.datamodules.seeding import derive_seed
from ctrlgen.datamodules.shards import SKIPS, check_required_keys, resolve_shards

STREAM_FIELDS = {"train_shards", "val_shards", "test_shards", "batch_size", "eval_batch_size", "keys", "required_keys",
                 "resolution", "random_crop", "shuffle_buffer"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")


def _health(batch: dict) -> dict:
    batch.pop("_data_health", None)
    return batch


class _MultiStream(IterableDataset):
    """Zips the named training streams (and the mixed one) into ``{name: batch}``; endless, cut by ``_EpochLoader``."""

    def __init__(self, streams: dict[str, ShardStream], sources: list[ShardStream], weights: list[float], mix_name: str,
                 mix_batch_size: int, seed: int, rank: int, start_epoch: int = 0):
        self.streams, self.sources, self.weights, self.mix_name = streams, sources, weights, mix_name
        self.mix_batch_size, self.seed, self.rank, self.start_epoch, self._iters = mix_batch_size, seed, rank, start_epoch, 0

    def _mixed(self, worker: int, epoch: int) -> Iterator[dict]:
        rng = random.Random(derive_seed("mix", self.seed, self.rank, worker, epoch))
        items = [src.items(*src.epoch_rng()) for src in self.sources]
        while True:
            picks = rng.choices(range(len(items)), weights=self.weights, k=self.mix_batch_size)
            yield collate([{**next(items[i])[1], "source": i} for i in picks])

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_info()
        epoch = self.start_epoch + self._iters
        self._iters += 1
        its = {name: iter(s) for name, s in self.streams.items()}
        mixed = self._mixed(worker, epoch) if self.sources else None
        while True:
            out: dict[str, Any] = {name: _health(next(it)) for name, it in its.items()}
            if mixed is not None:
                out[self.mix_name] = next(mixed)
            out["_data_health"] = torch.tensor([worker, SKIPS.total])  # all streams share the worker's counter
            yield out


class _Named(IterableDataset):
    """An eval stream whose batches are wrapped as ``{name: batch}`` (same structure as training)."""

    def __init__(self, stream: ShardStream, name: str):
        self.stream, self.name = stream, name

    def __iter__(self) -> Iterator[dict]:
        for b in self.stream:
            health = b.pop("_data_health")
            yield {self.name: b, "_data_health": health}


class MultiStreamDataModule(ResumableDataModule):
    """Named WebDataset streams → ``{name: batch}``; optional proportional mix of unpaired sets (module docstring)."""

    def __init__(self, streams: dict[str, dict[str, Any]], mix: dict[str, float] | None = None, mix_name: str = "mix",
                 batch_size: int = 8, num_workers: int = 2, resolution: int = 256, seed: int = 0,
                 train_batches_per_epoch: int | None = None, train_samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 500):
        super().__init__(batch_size=batch_size, num_workers=num_workers, resolution=resolution, seed=seed,
                         train_batches_per_epoch=train_batches_per_epoch,
                         train_samples_per_epoch=train_samples_per_epoch)
        if not streams:
            raise ValueError("data.streams: at least one named stream is needed")
        self.streams: dict[str, dict[str, Any]] = {}
        for name, spec in streams.items():
            spec = dict(spec or {})
            unknown = sorted(set(spec) - STREAM_FIELDS)
            if unknown or name.startswith("_"):
                what = f"unknown field(s) {unknown}; expected some of {sorted(STREAM_FIELDS)}" if unknown else \
                    "names starting with '_' are reserved"
                raise ValueError(f"data.streams.{name}: {what}")
            if not spec.get("train_shards"):
                raise ValueError(f"data.streams.{name}: train_shards is not set")
            spec.setdefault("keys", {"jpg": "image"})
            spec.setdefault("required_keys", list(spec["keys"]))
            spec.setdefault("batch_size", batch_size)
            spec.setdefault("eval_batch_size", spec["batch_size"])
            spec.setdefault("resolution", resolution)
            spec.setdefault("random_crop", True)
            spec.setdefault("shuffle_buffer", shuffle_buffer)
            self.streams[name] = spec
        mix = dict(mix or {})
        bad = [n for n in mix if n not in self.streams]
        if bad:
            raise ValueError(f"data.mix: unknown stream(s) {bad}; streams are {list(self.streams)}")
        if mix and (min(mix.values()) < 0 or sum(mix.values()) <= 0):
            raise ValueError(f"data.mix: weights must be >= 0 with a positive sum, got {mix}")
        if mix and mix_name in self.streams:
            raise ValueError(f"data.mix_name {mix_name!r} is also a stream name")
        self.mix_sources = list(mix)
        self.mix_weights = [float(mix[n]) / sum(mix.values()) for n in self.mix_sources]
        self.mix_name = mix_name
        self._urls: dict[tuple[str, str], list[str]] = {}

    # ---------------------------------------------------------------------------------------------- decoding hook
    def to_item(self, stream: str, sample: dict[str, Any], rng: random.Random, stage: str) -> dict[str, Any] | None:
        """Decoded sample of ``stream`` → item (see the module docstring); raise to skip a bad sample (counted)."""
        spec = self.streams[stream]
        item: dict[str, Any] = {"key": sample["__key__"]}
        images: list[tuple[str, np.ndarray]] = []
        for k, out in spec["keys"].items():
            if k not in sample:
                raise KeyError(f"stream {stream!r}: sample {sample.get('__key__')!r} in {sample.get('__url__')!r} "
                               f"lacks key {k!r}")
            v = sample[k]
            if k.rsplit(".", 1)[-1].lower() in IMAGE_KEYS and isinstance(v, np.ndarray):
                images.append((out, v))
            else:
                item[out] = v
        if images:
            crop_rng = rng if stage == "train" and spec["random_crop"] else None
            crops = resize_crop([v for _, v in images], spec["resolution"], crop_rng)
            item.update({out: to_signed(c) for (out, _), c in zip(images, crops)})
        return item

    # ---------------------------------------------------------------------------------------------------- set up
    def stream_urls(self, name: str, stage: str) -> list[str]:
        if (name, stage) not in self._urls:
            what = f"data.streams.{name}.{stage}_shards"
            urls = resolve_shards(self.streams[name][f"{stage}_shards"], what)  # names stream and pattern
            check_required_keys(urls, self.streams[name]["required_keys"], what)  # names stream, file and key
            self._urls[(name, stage)] = urls
        return self._urls[(name, stage)]

    def _eval_names(self, stage: str) -> list[str]:
        return [n for n, spec in self.streams.items() if spec.get(f"{stage}_shards")]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage or "fit", [])
        for s in wanted:
            for name in (list(self.streams) if s == "train" else self._eval_names(s)):
                self.stream_urls(name, s)  # fail before the first step

    def _stream(self, name: str, stage: str, start_epoch: int = 0) -> ShardStream:
        rank, world = self.rank_and_world
        spec, train = self.streams[name], stage == "train"
        return ShardStream(self.stream_urls(name, stage), lambda s, rng: self.to_item(name, s, rng, stage),
                           spec["batch_size"] if train else spec["eval_batch_size"], train,
                           seed=derive_seed(self.seed, name), rank=rank, world_size=world,
                           shuffle_buffer=spec["shuffle_buffer"] if train else 0, start_epoch=start_epoch)

    # ------------------------------------------------------------------------------------------------- loaders
    def train_dataloader(self):
        epoch, skip = self.resume_position()
        rank, _ = self.rank_and_world
        plain = {n: self._stream(n, "train", epoch) for n in self.streams if n not in self.mix_sources}
        sources = [self._stream(n, "train", epoch) for n in self.mix_sources]
        ds = _MultiStream(plain, sources, self.mix_weights, self.mix_name, self.batch_size, self.seed, rank, epoch)
        return self.epoch_loader(make_loader(ds, self.num_workers, self.seed, rank, "train"), epoch, skip)

    def _eval_loader(self, stage: str):
        rank, world = self.rank_and_world
        loaders = []
        for name in self._eval_names(stage):
            workers = eval_workers(self.stream_urls(name, stage), world, self.num_workers,
                                   f"data.streams.{name}.{stage}_shards")
            loaders.append(make_loader(_Named(self._stream(name, stage), name), workers, self.seed, rank, stage, name))
        return loaders[0] if len(loaders) == 1 else loaders
