"""Shard I/O shared by every method: URL expansion and checks, counted error handling, writing and packing.

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
from typing import Any, Iterable, Sequence

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
class SkipCounter:
    """Per-process count of skipped samples by reason. Each sample carries (worker, cumulative count) to the main process."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.warned: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def handler(self, exn: BaseException) -> bool:
        reason = type(exn).__name__
        self.counts[reason] += 1
        msg = f"skipping corrupt sample ({reason}: {str(exn)[:300]}); skipped so far in this worker: {self.total}"
        if reason not in self.warned:  # warn once per reason per worker; the count is logged as data/skipped
            self.warned.add(reason)
            warnings.warn(msg, stacklevel=2)
        log.debug(msg)
        return True


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


def check_out_pattern(out_pattern: str, overwrite: bool = False) -> list[str]:
    """``--out`` must hold one ``%d``-style field (``train-%06d.tar``); shards it already matches are refused unless
    ``overwrite`` (then they are removed, so no stale shard of an earlier run is left for a later glob to read).
    Returns the removed paths."""
    try:
        first = out_pattern % 0
    except (TypeError, ValueError):
        raise ValueError(f"pack: --out {out_pattern!r} needs one integer field for the shard number, e.g. "
                         f"'DIR/train-%06d.tar'") from None
    if first == out_pattern % 1:
        raise ValueError(f"pack: --out {out_pattern!r} names the same file for every shard; use e.g. 'DIR/train-%06d.tar'")
    head, _, tail = out_pattern.partition("%")
    tail = tail.lstrip("0123456789")[1:]  # drop the field's width and conversion letter
    existing = sorted(glob.glob(glob.escape(head) + "*" + glob.escape(tail)))
    if existing and not overwrite:
        raise FileExistsError(f"pack: {len(existing)} file(s) already match {out_pattern!r} (e.g. {existing[0]!r}); "
                              f"a later glob would read them with the new shards. Pass --overwrite to replace them, "
                              f"or pick another --out")
    for path in existing:
        os.remove(path)
    return existing


def sample_key(rel: str) -> str:
    """A file's WebDataset key: its relative path without extension, ``/`` → ``__`` and ``.`` → ``_``."""
    return rel.rsplit(".", 1)[0].replace("/", "__").replace(".", "_")


def pack_folder(
    src: str | Path,
    out_pattern: str,
    labels: str | Path | None = None,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    progress: bool = True,
    shuffle_seed: int | None = 0,
    image_format: str = "jpg",
    overwrite: bool = False,
    allow_unlabelled: bool = False,
) -> dict[str, Any]:
    """Pack an image folder into shards. ``labels`` is an optional JSON {relative path or stem: int | str | dict}.

    Keys are deterministic (:func:`sample_key`); two files with one key (``a.jpg`` + ``a.png``, ``sub/x.jpg`` +
    ``sub__x.jpg``) fail before anything is written, listing them. The sorted file list is shuffled with
    ``shuffle_seed`` (None: sorted order): a class-per-folder tree (ImageNet) would otherwise give one class per shard,
    and the training stream, which reads a few shards at a time through a shuffle buffer, would see batches of a
    handful of classes. Every image is stored under one key, ``image_format``: ``jpg`` keeps JPEG bytes as they are
    and encodes other formats as JPEG (quality 95); ``png`` stores every image losslessly as PNG. With ``labels``,
    images without an entry fail the pack, listed, unless ``allow_unlabelled``. Unreadable files are skipped, named
    with the reason, and counted in the returned summary. Existing shards of ``out_pattern``: see
    :func:`check_out_pattern`.
    """
    from rich.progress import track

    if image_format not in ("jpg", "png"):
        raise ValueError(f"pack: --image-format must be 'jpg' or 'png', got {image_format!r}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"pack: image folder {str(src)!r} does not exist")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"pack: no images ({', '.join(IMAGE_EXTS)}) under {str(src)!r}")
    by_key: dict[str, list[str]] = {}
    for p in files:
        by_key.setdefault(sample_key(p.relative_to(src).as_posix()), []).append(p.relative_to(src).as_posix())
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes:
        shown = "; ".join(f"{' + '.join(v)} -> {k!r}" for k, v in sorted(clashes.items())[:10])
        raise ValueError(f"pack: {len(clashes)} sample key(s) would be shared by several files under {str(src)!r}: "
                         f"{shown}. Rename or remove one file of each group")
    meta: dict = {}
    if labels is not None:
        try:
            meta = json.loads(Path(labels).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"pack: cannot read labels JSON {str(labels)!r}: {e}") from e
        unlabelled = [p.relative_to(src).as_posix() for p in files
                      if p.relative_to(src).as_posix() not in meta and p.stem not in meta]
        if unlabelled and not allow_unlabelled:
            raise KeyError(f"pack: {len(unlabelled)} of {len(files)} images have no entry in {str(labels)!r} (by "
                           f"relative path or stem), e.g. {unlabelled[:5]}; add them, or pass --allow-unlabelled to "
                           f"pack them without a label")
    existing = check_out_pattern(out_pattern, overwrite)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    bad: list[tuple[str, str]] = []

    def gen():
        it = track(files, description=f"packing {src}") if progress else files
        for p in it:
            rel = p.relative_to(src).as_posix()
            data = p.read_bytes()
            try:
                pixels = decode_image(data)
                is_jpeg = Image.open(io.BytesIO(data)).format == "JPEG"
            except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
                why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", repr(rel), str(e))  # name the file
                bad.append((rel, f"{type(e).__name__}: {why}"))
                continue
            if image_format == "png":
                data = encode_png(pixels)
            elif not is_jpeg:
                data = encode_jpg(pixels)
            sample: dict[str, Any] = {"__key__": sample_key(rel), image_format: data}
            m = meta.get(rel, meta.get(p.stem))
            if isinstance(m, int):
                sample["cls"] = m
            elif isinstance(m, str):
                sample["txt"] = m
            elif isinstance(m, dict):
                sample["json"] = m
            yield sample

    shards = write_shards(gen(), out_pattern, maxcount=maxcount, maxsize=maxsize)
    for rel, why in bad:
        log.warning("pack: skipped unreadable %s (%s)", rel, why)
    return {"shards": shards, "written": len(files) - len(bad), "skipped": len(bad), "skipped_files": bad,
            "replaced": existing}


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
