"""Prompt-only data for on-policy training (GRPO): JSONL, TXT or tar shards → batches of prompts.

Sources (``train_prompts`` etc.; several joined with ``::`` or given as a list):
- ``*.jsonl`` / ``*.json``: one JSON object per line (T2I-R1 schema: ``prompt`` plus any metadata fields such as
  ``task_type``, ``nouns``, ``spatial_info``); a ``.json`` file holding one JSON list of such objects also works;
- ``*.txt``: one prompt per line (blank lines ignored);
- tar shards (``.tar``, brace patterns, ``pipe:``): per sample a ``json`` member (as a JSONL line) or a ``txt`` member.

A batch is ``{"prompt": [str], "meta": [dict], "index": LongTensor, "key": [str], "valid": BoolTensor}``: ``index`` is
the prompt's position in the loaded set, ``key`` its ``file:line`` (or shard sample key), ``meta`` every other field.

**Training.** Every epoch draws a permutation of all N prompts from ``(seed, epoch)`` (identical on every rank) and
deals it out disjointly: rank r takes ``perm[:N - N % world][r::world]``, i.e. ``N // world`` prompts each; the
``N % world`` left over and a final partial batch are **dropped** for that epoch (equal step counts on every rank; a
new permutation next epoch gives them their turn). An epoch is ``(N // world) // prompts_per_batch`` batches; mid-epoch
resume is exact (``ResumableDataModule``). Workers take batches round-robin, so the order does not depend on them.

**Val/test/predict.** Each prompt exactly once across ranks: rank r takes ``range(N)[r::world]``; ranks with one prompt
fewer are **padded** with a copy of their first prompt flagged ``valid=False`` so every rank runs the same number of
batches (uneven splits hang DDP); evaluation must ignore rows with ``valid`` false.

**Bad input.** ``on_bad="error"`` (default): a line that is not JSON, not an object, or lacks a non-empty string
``prompt`` fails at setup with ``file:line`` and what was found. ``on_bad="skip"``: such lines are skipped, warned about
and counted in ``ctrlgen.datamodules.shards.SKIPS`` (logged as ``data/skipped``). A source with no prompt at all always fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ctrlgen.datamodules.base import ResumableDataModule, collate, make_loader, worker_info
from ctrlgen.datamodules.seeding import derive_seed
from ctrlgen.datamodules.shards import SKIPS, expand_urls, iter_samples, resolve_shards

Prompt = dict[str, Any]


def _bad(where: str, why: str, found: str, on_bad: str) -> None:
    msg = f"{where}: {why}; found {found[:200]!r}"
    if on_bad == "error":
        raise ValueError(msg)
    SKIPS.handler(ValueError(msg))


def _record(obj: Any, where: str, prompt_key: str, on_bad: str, raw: str) -> Prompt | None:
    if not isinstance(obj, dict):
        _bad(where, f"expected a JSON object with a {prompt_key!r} field", raw, on_bad)
        return None
    text = obj.get(prompt_key)
    if not isinstance(text, str) or not text.strip():
        _bad(where, f"no non-empty string {prompt_key!r} field (keys: {sorted(obj)})", raw, on_bad)
        return None
    return {"prompt": text.strip(), "meta": {k: v for k, v in obj.items() if k != prompt_key}, "key": where}


def load_prompts(spec: str | list[str], prompt_key: str = "prompt", on_bad: str = "error") -> list[Prompt]:
    """Read every prompt of a source spec (see the module docstring) in file order."""
    out: list[Prompt] = []
    for url in expand_urls(spec):
        path = url.removeprefix("file:")
        if path.endswith(".tar") or url.startswith("pipe:"):
            for shard in resolve_shards(url, "prompts"):
                for s in iter_samples(shard):
                    where = f"{shard}:{s['__key__']}"
                    if "json" in s:
                        raw = s["json"].decode(errors="replace")
                        try:
                            obj = json.loads(raw)
                        except json.JSONDecodeError as e:
                            _bad(where, f"json member is not valid JSON ({e.msg})", raw, on_bad)
                            continue
                    elif "txt" in s:
                        raw = s["txt"].decode(errors="replace")
                        obj = {prompt_key: raw}
                    else:
                        _bad(where, "sample has neither a json nor a txt member", str(sorted(s)), on_bad)
                        continue
                    rec = _record(obj, where, prompt_key, on_bad, raw)
                    if rec is not None:
                        out.append(rec)
            continue
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompts: {path!r} does not exist (from {spec!r})")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".txt":
            out += [{"prompt": line.strip(), "meta": {}, "key": f"{path}:{i}"}
                    for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        elif p.suffix == ".json" and text.lstrip().startswith("["):
            for i, obj in enumerate(json.loads(text)):
                rec = _record(obj, f"{path}[{i}]", prompt_key, on_bad, json.dumps(obj))
                if rec is not None:
                    out.append(rec)
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(f"{path}:{i}", f"not valid JSON ({e.msg})", line, on_bad)
                    continue
                rec = _record(obj, f"{path}:{i}", prompt_key, on_bad, line)
                if rec is not None:
                    out.append(rec)
    if not out:
        raise ValueError(f"prompts: no prompts found in {spec!r}")
    return out


def train_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's prompts of ``epoch``: disjoint across ranks, ``n // world`` each (the rest dropped this epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("prompts", seed, epoch))).tolist()
    return perm[: n - n % world][rank::world]


def eval_indices(n: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """This rank's (index, valid) pairs: every prompt once across ranks, padded to ``ceil(n / world)`` per rank."""
    mine = [(i, True) for i in range(rank, n, world)]
    per_rank = -(-n // world)
    return mine + [(mine[0][0] if mine else 0, False)] * (per_rank - len(mine))


class _PromptBatches(IterableDataset):
    """Batches of prompts; pass k of a training set is epoch ``start_epoch + k``; eval sets give one fixed pass."""

    def __init__(self, prompts: list[Prompt], batch_size: int, train: bool, seed: int, rank: int, world: int,
                 start_epoch: int = 0):
        self.prompts, self.batch_size, self.train = prompts, batch_size, train
        self.seed, self.rank, self.world, self.start_epoch, self._iters = seed, rank, world, start_epoch, 0

    def __iter__(self) -> Iterator[dict]:
        worker, nworkers = worker_info()
        if self.train:
            epoch = self.start_epoch + self._iters
            self._iters += 1
            order = [(i, True) for i in train_indices(len(self.prompts), self.seed, epoch, self.rank, self.world)]
            nb = len(order) // self.batch_size  # drop the partial batch: equal steps on every rank
        else:
            order = eval_indices(len(self.prompts), self.rank, self.world)
            nb = -(-len(order) // self.batch_size)
        for b in range(worker, nb, nworkers):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            out = collate([{**self.prompts[i], "index": i, "valid": ok} for i, ok in chunk])
            out["_data_health"] = torch.tensor([worker, SKIPS.total])
            yield out


class PromptDataModule(ResumableDataModule):
    """Prompt-only datamodule for GRPO-style on-policy training (module docstring: sources, splits, bad input)."""

    def __init__(self, train_prompts: str | list[str] | None = None, val_prompts: str | list[str] | None = None,
                 test_prompts: str | list[str] | None = None, predict_prompts: str | list[str] | None = None,
                 prompts_per_batch: int = 1, eval_prompts_per_batch: int | None = None, prompt_key: str = "prompt",
                 on_bad: str = "error", num_workers: int = 0, resolution: int = 256, seed: int = 0):
        super().__init__(batch_size=prompts_per_batch, num_workers=num_workers, resolution=resolution, seed=seed)
        self.train_batches_per_epoch = 0  # one pass over the prompts per rank: set in setup, from the prompt count
        if on_bad not in ("error", "skip"):
            raise ValueError(f"data.on_bad must be 'error' or 'skip', got {on_bad!r}")
        if prompts_per_batch < 1:
            raise ValueError(f"data.prompts_per_batch must be >= 1, got {prompts_per_batch}")
        self.sources = {"train": train_prompts, "val": val_prompts, "test": test_prompts, "predict": predict_prompts}
        self.prompts_per_batch = prompts_per_batch
        self.eval_prompts_per_batch = eval_prompts_per_batch or prompts_per_batch
        self.prompt_key, self.on_bad = prompt_key, on_bad
        self.prompts: dict[str, list[Prompt]] = {}

    def stage_prompts(self, stage: str) -> list[Prompt]:
        if stage not in self.prompts:
            if self.sources[stage] is None:
                raise ValueError(f"data.{stage}_prompts is not set but the {stage} loop needs it")
            try:
                self.prompts[stage] = load_prompts(self.sources[stage], self.prompt_key, self.on_bad)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"data.{stage}_prompts: {e}") from e
        return self.prompts[stage]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}.get(stage or "fit")
        for s in wanted:
            if s == "train" or self.sources[s] is not None:
                self.stage_prompts(s)  # fail before the first step
        if "train" in self.prompts:
            _, world = self.rank_and_world
            n = len(self.prompts["train"])
            self.train_batches_per_epoch = (n // world) // self.prompts_per_batch
            if self.train_batches_per_epoch == 0:
                raise ValueError(f"data.train_prompts: {n} prompts over {world} ranks give no full batch of "
                                 f"{self.prompts_per_batch} prompts per rank")

    def train_dataloader(self):
        if not self.train_batches_per_epoch:
            self.setup("fit")
        epoch, skip = self.resume_position()
        rank, world = self.rank_and_world
        ds = _PromptBatches(self.stage_prompts("train"), self.prompts_per_batch, True, self.seed, rank, world, epoch)
        return self.epoch_loader(make_loader(ds, self.num_workers, self.seed, rank, "train"), epoch, skip)

    def _eval_loader(self, stage: str):
        if self.sources[stage] is None:
            return []
        rank, world = self.rank_and_world
        ds = _PromptBatches(self.stage_prompts(stage), self.eval_prompts_per_batch, False, self.seed, rank, world)
        return make_loader(ds, self.num_workers, self.seed, rank, stage)
