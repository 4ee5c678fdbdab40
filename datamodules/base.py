"""Base datamodules: ``BaseDataModule`` (what every method's data shares) and ``BaseWdsDataModule`` (WebDataset shards).

Training streams are resampled (shards drawn with replacement) and cut into epochs of exactly ``train_batches_per_epoch``
batches per rank, so every DDP rank steps equally (platform.md §3, the ``with_epoch`` recipe). The stream is a function
of ``(seed, rank, worker, epoch)`` only, and the datamodule records how many batches of the current epoch were consumed,
so a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen (it re-reads at most
one epoch). Val/test/predict read every sample once, shards split over ranks then workers (exact splits).
Corrupt samples are skipped and counted (``ctrlgen.datamodules.shards.SKIPS``; logged by ``ctrlgen.callbacks.DataHealthCallback``).
``ResumableDataModule`` holds the epoch cut and the resume bookkeeping that ``BaseWdsDataModule``,
``ctrlgen.datamodules.multi.MultiStreamDataModule`` and ``ctrlgen.datamodules.prompts.PromptDataModule`` share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import count, islice
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctrlgen.datamodules.seeding import derive_seed
from ctrlgen.datamodules.shards import SKIPS, LazySample, check_required_keys, probe_decodable, resolve_shards

# a stream whose last this-many samples/shards all failed, with none decoded since the last good one, stops with an
# error instead of spinning for ever (a resampled training stream over shards that are all unreadable)
MAX_CONSECUTIVE_SKIPS = 1000


class FatalSampleError(ValueError):
    """A sample fault the configuration says must stop the run (e.g. ``strict_labels``) instead of being skipped."""


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Dict samples → dict batch: tensors/arrays/numbers stacked, everything else (str, dict) kept as a list."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(v0, np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        elif isinstance(v0, (bool, int, float, np.integer, np.floating)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def worker_info() -> tuple[int, int]:
    """(DataLoader worker id, worker count); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardStream(IterableDataset):
    """Decoded, batched samples from shards. ``train=True``: endless resampled stream; else each shard once."""

    def __init__(self, urls: list[str], item_fn: Callable[[dict, random.Random], dict | None], batch_size: int,
                 train: bool, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 start_epoch: int = 0):
        self.urls, self.item_fn, self.batch_size, self.train = urls, item_fn, batch_size, train
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.start_epoch, self._iters = start_epoch, 0
        self._failed_in_a_row = 0

    def _skip(self, exn: BaseException, key: str | None = None, url: str | None = None) -> bool:
        """Count a skipped sample or shard; too many in a row with nothing decoded is an error, not an endless loop."""
        SKIPS.handler(exn, key=key, url=url)
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"data: the last {self._failed_in_a_row} samples/shards of {len(self.urls)} shard(s) "
                               f"(e.g. {self.urls[0]!r}) all failed to decode; {SKIPS.summary()}. Check the shards "
                               f"(`ctrlgen data inspect`) and the loader's keys")
        return True

    def _raw(self, rng: random.Random, worker: int, nworkers: int) -> Iterator[dict]:
        if self.train:
            def shard_iter():
                while True:
                    yield {"url": rng.choice(self.urls)}
        else:
            mine = self.urls[self.rank :: self.world_size][worker::nworkers]

            def shard_iter():
                yield from ({"url": u} for u in mine)
        yield from wds.tariterators.tarfile_samples(shard_iter(), handler=self._skip)

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle_buffer:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def epoch_rng(self) -> tuple[random.Random, int, int]:
        """Start the next pass: its rng (a function of seed, rank, worker and epoch), worker id and worker count."""
        worker, nworkers = worker_info()
        epoch = self.start_epoch + self._iters
        self._iters += 1
        return random.Random(derive_seed(self.seed, self.rank, "shards", worker, epoch)), worker, nworkers

    def items(self, rng: random.Random, worker: int, nworkers: int) -> Iterator[tuple[str | None, dict]]:
        """Decoded single items with their shard URL (unbatched; corrupt samples skipped and counted)."""
        for raw in self._shuffled(self._raw(rng, worker, nworkers), rng):
            try:
                item = self.item_fn(LazySample(raw), rng)  # values decoded when the loader reads them
            except FatalSampleError:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt or incomplete sample: skip and count, never crash
                self._skip(e, key=raw.get("__key__"), url=raw.get("__url__"))
                continue
            if item is not None:
                self._failed_in_a_row = 0
                yield raw.get("__url__"), item

    def __iter__(self) -> Iterator[dict]:
        rng, worker, nworkers = self.epoch_rng()
        batch: list[dict] = []
        url = None
        for item_url, item in self.items(rng, worker, nworkers):
            if not self.train and batch and item_url != url:
                yield self._finish(batch, worker)  # eval batches never span shards: same batches for any world size
                batch = []
            url = item_url
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._finish(batch, worker)
                batch = []
        if batch and not self.train:
            yield self._finish(batch, worker)

    @staticmethod
    def _finish(batch: list[dict], worker: int) -> dict:
        out = collate(batch)
        out["_data_health"] = torch.tensor([worker, SKIPS.total])  # (worker id, cumulative skips in that worker)
        return out


class _EpochLoader:
    """Main-process view of the training stream: exactly ``n`` batches per epoch, minus batches already consumed."""

    def __init__(self, loader: DataLoader, n: int, skip: int = 0, on_epoch: Callable[[int], None] | None = None):
        self.loader, self.n, self.skip, self.on_epoch = loader, n, skip, on_epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        return self._epoch()  # a generator: Lightning's iter() probe (no next()) must not consume the resume skip

    def _epoch(self) -> Iterator[dict]:
        skip, self.skip = self.skip, 0
        if self.on_epoch is not None:
            self.on_epoch(skip)
        yield from islice(iter(self.loader), skip, self.n)


def make_loader(ds: IterableDataset, workers: int, *seed_parts: int | str) -> DataLoader:
    """A DataLoader of already-batched items with its own generator: creating loader iterators must not draw from the
    global RNG (resume reproducibility)."""
    gen = torch.Generator().manual_seed(derive_seed(*seed_parts))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=gen)


def eval_workers(urls: list[str], world: int, workers: int, what: str) -> int:
    """Check an exact eval split (shards a multiple of world size) and cap workers at the shards per rank."""
    if world > 1 and len(urls) % world:
        raise ValueError(f"{what}: {len(urls)} shards cannot be split equally over {world} ranks; "
                         "write a multiple of world_size equal-sized shards (uneven eval splits hang DDP)")
    return min(workers, max(1, len(urls) // world))


class BaseDataModule(L.LightningDataModule):
    """What every method's data shares: batch size, workers, resolution and a data seed."""

    def __init__(self, batch_size: int = 8, num_workers: int = 2, resolution: int = 256, seed: int = 0):
        super().__init__()
        self.batch_size, self.num_workers, self.resolution, self.seed = batch_size, num_workers, resolution, seed
        self._rank_world: tuple[int, int] | None = None

    @property
    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) from the trainer; tests may set it to simulate a rank without a process group."""
        if self._rank_world is not None:
            return self._rank_world
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    @rank_and_world.setter
    def rank_and_world(self, value: tuple[int, int]) -> None:
        self._rank_world = (int(value[0]), int(value[1]))


class ResumableDataModule(BaseDataModule):
    """Training data cut into epochs of ``train_batches_per_epoch`` batches per rank, with exact mid-epoch resume.

    Subclasses build a loader whose dataset's pass ``k`` is epoch ``start_epoch + k`` (a function of seed, rank, worker
    and epoch only) and hand it to ``epoch_loader``; the consumed-batch count travels in checkpoints.
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 2, resolution: int = 256, seed: int = 0,
                 train_batches_per_epoch: int | None = None, train_samples_per_epoch: int | None = None):
        """An epoch is ``train_batches_per_epoch`` batches per rank (default 1000), or, with
        ``train_samples_per_epoch``, ⌈samples / (batch_size × world size)⌉ batches per rank: one pass over that many
        samples on any number of GPUs (e.g. 1,281,167 for ImageNet-1k)."""
        super().__init__(batch_size=batch_size, num_workers=num_workers, resolution=resolution, seed=seed)
        if train_batches_per_epoch is not None and train_samples_per_epoch is not None:
            raise ValueError(f"data.init_args: give train_batches_per_epoch ({train_batches_per_epoch}) or "
                             f"train_samples_per_epoch ({train_samples_per_epoch}), not both (set the other to null)")
        for key, v in (("train_batches_per_epoch", train_batches_per_epoch),
                       ("train_samples_per_epoch", train_samples_per_epoch)):
            if v is not None and int(v) < 1:
                raise ValueError(f"data.init_args.{key} must be >= 1, got {v}")
        self.train_batches_per_epoch = 1000 if train_batches_per_epoch is None and train_samples_per_epoch is None \
            else train_batches_per_epoch
        self.train_samples_per_epoch = train_samples_per_epoch
        self._epoch, self._consumed = 0, 0  # stream epoch being read, batches of it consumed (saved in checkpoints)
        self._resume: dict[str, int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch per rank (``train_samples_per_epoch`` resolved with this run's world size)."""
        if self.train_samples_per_epoch is None:
            return int(self.train_batches_per_epoch)
        _, world = self.rank_and_world
        return max(1, math.ceil(self.train_samples_per_epoch / (self.batch_size * world)))

    def resume_position(self) -> tuple[int, int]:
        """(epoch to start the training stream at, batches of it to skip); consumes the loaded checkpoint state."""
        epoch, skip = 0, 0
        if self._resume:
            epoch, skip = self._resume["epoch"], self._resume["consumed"]
            if skip >= self.batches_per_epoch:
                epoch, skip = epoch + 1, 0
            self._resume = None
        return epoch, skip

    def epoch_loader(self, loader: DataLoader, start_epoch: int, skip: int) -> _EpochLoader:
        """Cut ``loader`` (whose pass k is stream epoch ``start_epoch + k``) into epochs, skipping ``skip`` batches once.

        The stream epoch is counted here, not read from ``trainer.current_epoch``: Lightning counts an epoch stopped by
        ``max_steps`` as completed before ``on_train_end`` saves ``last.ckpt``, which would resume one epoch too far."""
        passes = count(start_epoch)

        def on_epoch(consumed: int) -> None:
            self._epoch, self._consumed = next(passes), consumed

        return _EpochLoader(loader, self.batches_per_epoch, skip, on_epoch=on_epoch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        t = self.trainer
        if t is not None and t.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    # -------------------------------------------------------------------------------- eval: each sample once per stage
    def _eval_loader(self, stage: str) -> Any:
        """The loader(s) of ``stage`` (val/test/predict) reading every sample once over all ranks; ``[]`` if none."""
        raise NotImplementedError(f"{type(self).__name__} must implement _eval_loader(stage)")

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("predict")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)


class BaseWdsDataModule(ResumableDataModule):
    """WebDataset shards → batches of dicts. Subclasses implement ``to_item`` and declare ``required_keys``."""

    required_keys: Sequence[str] = ()

    def __init__(self, train_shards: str | list[str] | None = None, val_shards: str | list[str] | None = None,
                 test_shards: str | list[str] | None = None, predict_shards: str | list[str] | None = None,
                 batch_size: int = 8, num_workers: int = 2, resolution: int = 256, seed: int = 0,
                 train_batches_per_epoch: int | None = None, train_samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 500, eval_batch_size: int | None = None, probe_samples: int = 64):
        """``probe_samples``: at set-up, each stage's first samples are decoded through ``to_item`` until one
        decodes; none within this many fails before the first step (0: no probe)."""
        super().__init__(batch_size=batch_size, num_workers=num_workers, resolution=resolution, seed=seed,
                         train_batches_per_epoch=train_batches_per_epoch,
                         train_samples_per_epoch=train_samples_per_epoch)
        self.probe_samples = int(probe_samples)
        self.shards = {"train": train_shards, "val": val_shards, "test": test_shards, "predict": predict_shards}
        self.shuffle_buffer = shuffle_buffer
        self.eval_batch_size = eval_batch_size or batch_size
        self._urls: dict[str, list[str]] = {}

    # ---------------------------------------------------------------------------------------------- subclass hooks
    def to_item(self, sample: dict[str, Any], rng: random.Random, stage: str) -> dict[str, Any] | None:
        """Sample (a ``LazySample``: each value decoded by ``decode_value`` when read) → dict of arrays/tensors/scalars;
        raise to skip a bad sample. Keys it never reads are never decoded."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_item")

    # ---------------------------------------------------------------------------------------------------- set up
    def _stage_urls(self, stage: str) -> list[str]:
        if stage not in self._urls:
            spec = self.shards[stage]
            if spec is None:
                raise ValueError(f"data.{stage}_shards is not set but the {stage} loop needs it")
            urls = resolve_shards(spec, f"data.{stage}_shards")
            check_required_keys(urls, self.required_keys, f"data.{stage}_shards")
            probe_decodable(urls, lambda smp, rng: self.to_item(smp, rng, stage), f"data.{stage}_shards",
                            max_samples=self.probe_samples)
            self._urls[stage] = urls
        return self._urls[stage]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}.get(stage or "fit")
        for s in wanted:
            if s == "train" or self.shards[s] is not None:
                self._stage_urls(s)  # fail before the first step: missing shards, missing keys

    # ------------------------------------------------------------------------------------------------- loaders
    def _loader(self, stage: str, batch_size: int, train: bool, workers: int, start_epoch: int = 0) -> DataLoader:
        rank, world = self.rank_and_world
        urls = self._stage_urls(stage)
        if not train:
            workers = eval_workers(urls, world, workers, f"data.{stage}_shards")
        ds = ShardStream(urls, lambda s, rng: self.to_item(s, rng, stage), batch_size, train, seed=self.seed,
                         rank=rank, world_size=world, shuffle_buffer=self.shuffle_buffer if train else 0,
                         start_epoch=start_epoch)
        return make_loader(ds, workers, self.seed, rank, stage)

    def train_dataloader(self) -> _EpochLoader:
        epoch, skip = self.resume_position()
        return self.epoch_loader(self._loader("train", self.batch_size, True, self.num_workers, start_epoch=epoch),
                                 epoch, skip)

    def _eval_loader(self, stage: str) -> DataLoader | list:
        if self.shards[stage] is None:
            return []
        return self._loader(stage, self.eval_batch_size, False, self.num_workers)
