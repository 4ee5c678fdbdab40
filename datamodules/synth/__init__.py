"""Deterministic synthetic worlds that write real WebDataset shards (for demos and tests); one module per world.

A world is a module with ``samples(seed, split, n, size)``, registered here by import path: shared worlds live in
this package, a method's own world in its method package (``scenes`` renders with the Defocus lens code), so this
shared registry imports none of them until one is asked for."""

from __future__ import annotations

from pathlib import Path

WORLDS = {  # name -> module
    "shapes": "ctrlgen.datamodules.synth.shapes",  # geometry + classes (ECM, platform tests)
    "scenes": "ctrlgen.lightning_modules.defocus.world",  # metric depth + subject + camera record (Defocus)
    "faces": "ctrlgen.lightning_modules.agebooth.world",  # portraits: identity + rendered age + captions (AgeBooth)
}


def synth(world: str, out_dir: str | Path, n_train: int = 512, n_val: int = 64, n_test: int = 64, size: int = 64,
          seed: int = 0, shard_size: int = 128) -> dict[str, list[str]]:
    """Write ``{out_dir}/{split}-%06d.tar`` shards of a world; returns the shard paths per split."""
    from ctrlgen.datamodules.shards import write_shards

    if world not in WORLDS:
        raise ValueError(f"unknown synthetic world {world!r}; available: {', '.join(WORLDS)}")
    import importlib

    module = importlib.import_module(WORLDS[world])

    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n > 0:
            out[split] = write_shards(module.samples(seed, split, n, size), str(Path(out_dir) / f"{split}-%06d.tar"),
                                      maxcount=shard_size)
    return out
