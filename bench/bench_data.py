"""CPU loader cost of lazy vs eager sample decoding (ratios only; CPU timings on a shared machine are noisy).

Shards of the shapes world at ``--size`` px hold ``jpg``, ``canny.png``, ``depth.png``, ``normal.png`` and ``json``, as
multi-condition ECM shards do. A canny-only ``ECMDataModule`` reads one evaluation pass of them (every sample once,
``num_workers=0``, so the main process does all decoding), in two variants measured alternately in one run:

* ``lazy``  — the loader as shipped: ``LazySample`` decodes only the keys ``to_item`` reads (jpg, cls, canny.png);
* ``eager`` — the previous behaviour: every key of the sample decoded before ``to_item`` (depth and normal maps too).

Reports the median seconds per pass, samples/s and the ratio eager / lazy.

    python bench/bench_data.py --size 256 --samples 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    from ctrlgen.datamodules.ecm import ECMDataModule
    from ctrlgen.datamodules.synth import synth

    class EagerECMDataModule(ECMDataModule):
        def to_item(self, sample, rng, stage):
            for k in list(sample):  # decode every key first, as the loader did before LazySample
                sample[k]
            return super().to_item(sample, rng, stage)

    with tempfile.TemporaryDirectory() as tmp:
        shards = synth("shapes", Path(tmp), n_train=0, n_val=a.samples, n_test=0, size=a.size, shard_size=a.samples)
        times: dict[str, list[float]] = {"lazy": [], "eager": []}
        for rep in range(a.repeats + 1):  # the first pass of each warms caches and is dropped
            for name, cls in (("lazy", ECMDataModule), ("eager", EagerECMDataModule)):
                dm = cls(val_shards=shards["val"][0], condition_types=["canny"], resolution=a.size, mid_reso=1.0,
                         batch_size=32, num_workers=0)
                dm.setup("validate")
                t0 = time.perf_counter()
                n = sum(len(b["key"]) for b in dm.val_dataloader())
                dt = time.perf_counter() - t0
                assert n == a.samples, (name, n)
                if rep:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"size": a.size, "samples": a.samples, "repeats": a.repeats, "median_s": med,
           "samples_per_s": {k: a.samples / v for k, v in med.items()}, "eager_over_lazy": med["eager"] / med["lazy"],
           "eager_over_lazy_min": min(times["eager"]) / min(times["lazy"])}
    for k in ("lazy", "eager"):
        print(f"{k:5s}: median {med[k]:.3f} s per pass of {a.samples} samples at {a.size} px "
              f"({res['samples_per_s'][k]:.0f} samples/s; runs {', '.join(f'{t:.3f}' for t in times[k])})")
    print(f"eager / lazy = {res['eager_over_lazy']:.2f}x (median), {res['eager_over_lazy_min']:.2f}x (min)")
    return res


if __name__ == "__main__":
    main()
