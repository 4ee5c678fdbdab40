"""One rule for every derived seed: :func:`derive_seed` maps ints and strings to a 63-bit int.

Every random stream of a run that must be reproducible (per-rank noise, per-batch dropout draws, the data order of each
rank/worker/epoch, the rank-identical draws of an iteration or step) is seeded with ``derive_seed(run seed, ...)``. The
value depends only on the parts, never on the process (no ``hash()``, which Python salts per run), so a resumed or
rerun job on any machine derives the same seeds::

    torch.manual_seed(derive_seed(seed, rank, step, micro_batch))      # dropout draws of one batch on one rank
    random.Random(derive_seed(seed, rank, worker, epoch))              # one loader worker's shuffle
    torch.Generator().manual_seed(derive_seed(seed, "iteration", it))  # the same on every rank

The first two parts are mixed linearly (``a·0x9E3779B1 + b·0x7FEB352D + 0x165667B1``), each further part is folded in
(``m·0x85EBCA77 + c + 0x27D4EB2F``), all modulo 2⁶³ − 1; a string part enters as the first 8 bytes of its sha256.
Parts are positional: ``derive_seed(1, 2) != derive_seed(2, 1)``; a single part equals it with a second part 0.
It lives beside the datamodules, the lowest shared layer: it imports nothing from ctrlgen, so loaders, callbacks and
LightningModules all import it without pulling in a method package (``ctrlgen.lightning_modules`` imports every method).
"""

from __future__ import annotations

import hashlib
import os

MODULUS = 2**63 - 1


def part_value(part: int | str | bytes) -> int:
    """A seed part as a non-negative int: ints as they are (mod 2⁶³ − 1), strings/bytes by their sha256."""
    if isinstance(part, bool) or not isinstance(part, (int, str, bytes)):
        if hasattr(part, "__index__") and not isinstance(part, bool):  # numpy / 0-d torch integers
            return int(part.__index__()) % MODULUS
        raise TypeError(f"derive_seed parts must be ints or strings, got {type(part).__name__} {part!r}")
    if isinstance(part, int):
        return part % MODULUS
    data = part.encode() if isinstance(part, str) else part
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % MODULUS


def derive_seed(*parts: int | str | bytes) -> int:
    """A seed in ``[0, 2⁶³ − 1)`` from ``parts`` (ints, strings): the same in every process and Python run, and
    different for different parts. Usually ``derive_seed(run seed, rank or stream name, counters...)``."""
    if not parts:
        raise TypeError("derive_seed needs at least one part (usually the run's seed)")
    vals = [part_value(p) for p in parts]
    mixed = (vals[0] * 0x9E3779B1 + (vals[1] if len(vals) > 1 else 0) * 0x7FEB352D + 0x165667B1) % MODULUS
    for c in vals[2:]:
        mixed = (mixed * 0x85EBCA77 + c + 0x27D4EB2F) % MODULUS
    return mixed


def global_seed() -> int:
    """The run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``), identical on every rank; 0 when unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))
