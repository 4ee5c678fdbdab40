"""``derive_seed``: one seed rule for every stream (ranks, batches, loaders, iterations, truncation draws)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ctrlgen.datamodules.seeding import MODULUS, derive_seed, part_value


def _batch_seed_formula(seed: int, rank: int, *counters: int) -> int:
    """The per-batch mixing the training loop used before derive_seed existed (its values must not move: resumed runs
    and the demo's dropout draws depend on them)."""
    mixed = (seed * 0x9E3779B1 + rank * 0x7FEB352D + 0x165667B1) % (2**63 - 1)
    for c in counters:
        mixed = (mixed * 0x85EBCA77 + c + 0x27D4EB2F) % (2**63 - 1)
    return mixed


def test_int_parts_reproduce_the_per_batch_mixing():
    for parts in [(0, 0), (7, 1, 3, 0), (1234, 3, 10**6, 2), (2**62, 5, 1), (-3, 2, 4)]:
        assert derive_seed(*parts) == _batch_seed_formula(*parts), parts


def test_parts_are_positional_distinct_and_in_range():
    seeds = {derive_seed(7, r, e, b) for r in range(3) for e in range(4) for b in range(5)}
    assert len(seeds) == 60 and all(0 <= s < MODULUS for s in seeds)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0, "mix", 1) != derive_seed(0, "prompts", 1) != derive_seed(0, "mix", 2)
    assert derive_seed(5, "trunc", 3) != derive_seed(5, 3)  # a label separates streams with the same counters
    assert derive_seed(3) == derive_seed(3, 0)  # documented: a single part is the pair with a second part 0
    # numpy / torch integers count as the int they hold
    assert derive_seed(np.int64(4), torch.tensor(2)) == derive_seed(4, 2)
    assert part_value("a") == part_value(b"a") != part_value("b")


def test_bad_parts_fail_clearly():
    with pytest.raises(TypeError, match=r"ints or strings, got float 0\.5"):
        derive_seed(1, 0.5)
    with pytest.raises(TypeError, match="at least one part"):
        derive_seed()


def test_same_seed_in_another_python_process_with_another_hash_seed():
    """No hash(): a fresh interpreter with a different PYTHONHASHSEED derives the same seeds (resume on another
    node, data-loading workers)."""
    code = ("from ctrlgen.datamodules.seeding import derive_seed; "
            "print(derive_seed(11, 'mix', 2, 'val'), derive_seed('prompts', 3, 4))")
    outs = set()
    for hash_seed in ("1", "12345"):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": ""})
        outs.add(res.stdout.strip())
    assert outs == {f"{derive_seed(11, 'mix', 2, 'val')} {derive_seed('prompts', 3, 4)}"}


def test_every_stream_draws_from_derive_seed(monkeypatch):
    """The per-rank generator, the per-batch global RNG and the truncation draw are seeded by derive_seed (patched
    here to a recorder: each caller must go through it)."""
    import ctrlgen.datamodules.seeding as seeding
    from ctrlgen.lightning_modules.common import base
    from ctrlgen.lightning_modules.ecm import sampling

    calls = []
    real = seeding.derive_seed

    def spy(*parts):
        calls.append(parts)
        return real(*parts)

    for mod in (base, sampling):
        monkeypatch.setattr(mod, "derive_seed", spy)
    monkeypatch.setenv("PL_GLOBAL_SEED", "9")
    m = base.BaseGenModule()
    m.ensure_generator()
    m.on_train_batch_start({}, 0)
    sampling.trunc_generator(9, 4)
    assert calls == [(9, 0), (9, 0, 0, 0), (9, "trunc", 4)]
    g = torch.Generator().manual_seed(real(9, 0))
    assert torch.equal(torch.rand(3, generator=m.gen), torch.rand(3, generator=g))
