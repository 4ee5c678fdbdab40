"""Read an offline W&B run file (``run-<id>.wandb``, wandb 0.31): LevelDB-log framing of protobuf ``Record``s.

Format (platform.md §4): 7-byte header starting ``:W&B``; then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32 u32, length u16, type u8: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST); block tails < 7 bytes and type-0 chunks are padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024


def records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        if kind == 1:
            buf = payload
        elif kind == 2:
            buf = payload
            continue
        elif kind == 3:
            buf += payload
            continue
        elif kind == 4:
            buf += payload
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(buf)
        yield rec
        buf = b""


def history(path: str | Path) -> list[dict[str, Any]]:
    """History rows as dicts ``{"train/loss": value, ...}``."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def settled_history(path: str | Path, done: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``history(path)`` once ``done(rows)`` holds, re-reading while W&B's writer process may still be flushing the
    offline file (``wandb.finish`` can return first on a loaded machine); the last read after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    rows = history(path)
    while not done(rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = history(path)
    return rows


def config_keys(path: str | Path) -> set[str]:
    keys: set[str] = set()
    for rec in records(path):
        if rec.WhichOneof("record_type") == "config":
            keys.update(item.key or "/".join(item.nested_key) for item in rec.config.update)
    return keys
