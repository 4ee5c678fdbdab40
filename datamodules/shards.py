"""Shard I/O shared by every method: URL expansion and checks, counted skips, start-up probes, writing, inspection.

Facts behind the choices are in ``shared/specs/platform.md`` §3 (webdataset 1.0.2): condition maps are PNG/NPY, never JPEG;
metadata lives in one ``json``; ``__key__`` has no dots; a sample's files are adjacent in the tar (ShardWriter does that).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------------------------------- urls
def expand_urls(spec: str | Sequence[str] | None) -> list[str]:
    """Expand brace ranges, ``::``-joined lists and globs into a list of shard URLs (``pipe:``/http kept as is)."""
    if spec is None:
        return []
    parts: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        for piece in str(item).split("::"):
            piece = piece.strip()
            if piece:
                parts.extend(braceexpand.braceexpand(piece))
    urls: list[str] = []
    for p in parts:
        if is_remote(p) or not any(c in p for c in "*?["):
            urls.append(p)
        else:
            urls.extend(sorted(glob.glob(os.path.expanduser(p))))
    return urls


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "gs:", "hf:", "ais:"))


def resolve_shards(spec: str | Sequence[str] | None, what: str) -> list[str]:
    """Expand and check a shard spec; a spec that matches no file fails here, before any training step."""
    urls = expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"{what}: no shards match {spec!r} (after brace and glob expansion)")
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.exists(u.removeprefix("file:"))]
    if missing and len(missing) == len(local) and len(local) == len(urls):
        raise FileNotFoundError(f"{what}: no shards found for pattern {spec!r}; e.g. {missing[0]!r} does not exist")
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(urls)} shards of {spec!r} are missing, e.g. {missing[0]!r}")
    return urls


def iter_samples(url: str, handler=wds.reraise_exception):
    """Raw samples (bytes per key) of one shard, in order; no node/worker splitting (any rank may call it)."""
    yield from wds.tariterators.tarfile_samples([{"url": url}], handler=handler)


def check_required_keys(urls: list[str], required: Iterable[str], what: str, max_samples: int = 64) -> None:
    """Open the first local shard; a required key that no sample carries is a config error (names file and key)."""
    required = list(required)
    local = [u for u in urls if not is_remote(u)]
    if not required or not local:
        return
    path = local[0].removeprefix("file:")
    seen: Counter[str] = Counter()
    n = 0
    try:
        for sample in iter_samples(path, handler=wds.ignore_and_continue):
            n += 1
            seen.update(k for k in sample if not k.startswith("__"))
            if n >= max_samples:
                break
    except (tarfile.TarError, OSError) as e:  # a corrupt first shard is reported by the stream itself, counted
        log.warning("could not pre-check %s: %s", path, e)
        return
    if n == 0:
        return
    absent = [k for k in required if seen[k] == 0]
    if absent:
        found = sorted(seen)
        raise KeyError(f"{what}: required key(s) {absent} missing in all {n} samples checked in {path!r}; found keys {found}")


# ---------------------------------------------------------------------------------------------------- counted errors
def describe_error(exn: BaseException, name: str | None) -> str:
    """``Type: message`` with Pillow's ``<_io.BytesIO object at 0x...>`` replaced by ``name`` (the file or key)."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", repr(name) if name else "the sample's bytes", str(exn))
    return f"{type(exn).__name__}: {text}"


def fault_origin(exn: BaseException) -> str | None:
    """The shard URL webdataset appends to the arguments of a tar-level error, if any."""
    for arg in reversed(getattr(exn, "args", ())):
        if isinstance(arg, str) and (arg.endswith(".tar") or "://" in arg or arg.startswith("pipe:")):
            return arg
    return None


class SkipCounter:
    """Per-process count of skipped samples by reason, with example ``key @ shard`` per reason.

    The first skip of each reason is warned with its key and shard; every ``report_every`` skips a summary of all
    reasons is logged, so later different samples are never dropped without a word. Each batch carries (worker,
    cumulative count) to the main process (``DataHealthCallback``)."""

    def __init__(self, report_every: int = 100, examples: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.warned: set[str] = set()
        self.report_every, self.max_examples = report_every, examples

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def handler(self, exn: BaseException, key: str | None = None, url: str | None = None) -> bool:
        reason = type(exn).__name__
        self.counts[reason] += 1
        where = " @ ".join(x for x in (key, url or fault_origin(exn)) if x) or "?"
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples and where not in shown:
            shown.append(where)
        msg = f"skipping sample {where} ({describe_error(exn, key)[:300]}); skipped so far in this process: {self.total}"
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(msg, stacklevel=2)
        elif self.total % self.report_every == 0:
            log.warning("data: %s", self.summary())
        log.debug(msg)
        return True

    def summary(self) -> str:
        """``N samples skipped: Reason ×n (e.g. key @ shard, ...); ...``"""
        parts = [f"{r} ×{n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in self.counts.most_common()]
        return f"{self.total} samples skipped: " + "; ".join(parts) if parts else "no samples skipped"


SKIPS = SkipCounter()


# ------------------------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """Bytes → uint8 HWC (RGB) or HW (L) array; raises on undecodable data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert(mode))


def decode_value(key: str, data: bytes) -> Any:
    """Per-key decoding: ``*.png`` condition maps keep their channel count, ``npy``, ``json``, ``cls``, ``txt``."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in ("jpg", "jpeg", "webp", "bmp"):
        return decode_image(data, "RGB")
    if ext == "png":
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I"):  # 16-bit grey (e.g. depth): rescale 0..65535 → 0..255 (Pillow's convert clips)
                a = np.asarray(im).astype(np.int64)
                return ((a.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
            mode = "L" if im.mode in ("L", "1") else "RGB"
            return np.asarray(im.convert(mode))
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data)
    if ext in ("cls", "cls2", "index"):
        return int(data.decode().strip())
    if ext == "txt":
        return data.decode()
    return data


class LazySample(dict):
    """A raw WebDataset sample whose values are decoded (``decode_value``) on first access and then cached: keys a
    loader never reads (other condition maps, extra crops) cost no decoding. ``__``-keys stay raw. Decoding errors
    surface where the key is read, inside the loader's skip-and-count guard."""

    def __init__(self, raw: dict[str, Any]):
        super().__init__(raw)
        self._done = {k for k in raw if k.startswith("__")}

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if key not in self._done:
            value = decode_value(key, value)
            super().__setitem__(key, value)
            self._done.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self):  # type: ignore[override]
        return [self[k] for k in self]

    def items(self):  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def decoded_keys(self) -> set[str]:
        """Keys decoded so far (``__`` keys excluded)."""
        return {k for k in self._done if not k.startswith("__")}


def probe_decodable(urls: list[str], item_fn: Callable[[LazySample, random.Random], Any], what: str,
                    max_samples: int = 64, max_shards: int = 4) -> int:
    """Decode the first samples of the first local shards through the loader's own ``item_fn`` until one yields an
    item; a stream that yields nothing decodable within ``max_samples`` samples (or ``max_shards`` shards) fails
    here, before training, with the shards and the reasons. Returns the number of samples tried (0: not checked)."""
    local = [u for u in urls if not is_remote(u)][:max_shards]
    if not local or max_samples <= 0:
        return 0
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    tried = 0
    rng = random.Random(0)
    for url in local:
        path = url.removeprefix("file:")
        try:
            for raw in iter_samples(path):
                tried += 1
                try:
                    if item_fn(LazySample(raw), rng) is not None:
                        if reasons:
                            log.warning("%s: %d of the first %d samples did not decode (%s); going on",
                                        what, sum(reasons.values()), tried, "; ".join(examples[:3]))
                        return tried
                    reasons["rejected by the loader"] += 1
                except Exception as e:  # noqa: BLE001 - reported below, with the shard and key
                    reasons[type(e).__name__] += 1
                    examples.append(f"{raw.get('__key__')} @ {path}: {describe_error(e, raw.get('__key__'))[:200]}")
                if tried >= max_samples:
                    break
        except Exception as e:  # noqa: BLE001 - not a tar, truncated, unreadable
            reasons[type(e).__name__] += 1
            examples.append(f"{path}: {type(e).__name__}: {str(e)[:200]} (not a readable tar shard?)")
        if tried >= max_samples:
            break
    counts = ", ".join(f"{r} ×{n}" for r, n in reasons.most_common()) or "no samples"
    raise ValueError(f"{what}: nothing decodable in the first {tried} samples of {len(local)} shard(s) "
                     f"({counts}); e.g. {'; '.join(examples[:3]) or local[0]}. Check the shard pattern and the "
                     f"loader's keys (a key the samples lack, or an image that does not decode)")


# ------------------------------------------------------------------------------------------------------------- writing
def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(samples: Iterable[dict], pattern: str, maxcount: int = 1000, maxsize: float = 1e9) -> list[str]:
    """Write samples (``__key__`` + ext→bytes/obj) with ``wds.ShardWriter``; returns the written shard paths."""
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for s in samples:
            if "." in s["__key__"]:
                raise ValueError(f"sample key {s['__key__']!r} contains a dot; webdataset groups files by basename")
            sink.write(s)
        written = [pattern % i for i in range(sink.shard + 1)] if sink.count or sink.shard else []
    return [p for p in written if os.path.exists(p)]


def inspect_shards(spec: str, limit: int = 3) -> dict[str, Any]:
    """Count samples and keys per shard; report tar errors per shard instead of crashing."""
    report: dict[str, Any] = {"shards": [], "total": 0}
    for url in resolve_shards(spec, "inspect"):
        keys: Counter[str] = Counter()
        n, err = 0, None
        try:
            for s in iter_samples(url):
                n += 1
                keys.update(k for k in s if not k.startswith("__"))
        except Exception as e:  # noqa: BLE001 - report, never crash an inspection
            err = f"{type(e).__name__}: {e}"
        report["shards"].append({"url": url, "samples": n, "keys": dict(keys), "error": err})
        report["total"] += n
    return report
