"""``ctrlgen data pack``: an image folder → WebDataset shards, refusing what would lose or mix data.

Two files that map to one sample key, stale shards of the output pattern, images missing from the labels file and an
output pattern without a shard-number field fail before anything is written, each naming the files; unreadable images
are skipped and named with the reason. Every image is stored under one key (``jpg`` or ``png``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np

from PIL import Image

from ctrlgen.datamodules.shards import IMAGE_EXTS, decode_image, describe_error, encode_jpg, encode_png, write_shards

log = logging.getLogger(__name__)


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
    metadata: Callable[[bytes], tuple[dict[str, Any], np.ndarray | None]] | None = None,
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

    ``metadata``: a function of each file's original bytes → (record, upright pixels or None), e.g. the Defocus
    camera record (``ctrlgen data pack --exif``: f-number, focal lengths, depth-of-field split, upright size); the
    record goes into the sample's ``json`` with a dict label merged over it (its keys win), and pixels it returns
    (an image with an EXIF rotation, turned upright) are stored instead of the file's, so pixels and record agree.
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
                bad.append((rel, describe_error(e, rel)))
                continue
            record = None
            if metadata is not None:
                record, turned = metadata(data)
                if turned is not None:
                    pixels, is_jpeg = turned, False
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
            if record is not None:
                sample["json"] = {**record, **sample.get("json", {})}
            yield sample

    shards = write_shards(gen(), out_pattern, maxcount=maxcount, maxsize=maxsize)
    for rel, why in bad:
        log.warning("pack: skipped unreadable %s (%s)", rel, why)
    return {"shards": shards, "written": len(files) - len(bad), "skipped": len(bad), "skipped_files": bad,
            "replaced": existing}
