"""MultiStreamDataModule: named streams in one batch, proportional mixing, exact resume, errors naming stream/pattern/key."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ctrlgen.datamodules.multi import MultiStreamDataModule
from ctrlgen.datamodules.shards import encode_jpg, write_shards


def _set(tmp, name: str, n: int, fnum: float, shards: int = 2) -> str:
    rng = np.random.default_rng(len(name))
    samples = [{"__key__": f"{name}_{i:04d}", "jpg": encode_jpg(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
                "json": {"f_number": fnum, "i": i}} for i in range(n)]
    write_shards(samples, str(tmp / f"{name}-%06d.tar"), maxcount=n // shards)
    return str(tmp / f"{name}-{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    prompts = [{"__key__": f"prompts_{i:04d}", "json": {"prompt": f"prompt {i}"}} for i in range(24)]
    write_shards(prompts, str(tmp / "prompts-%06d.tar"), maxcount=12)
    return {"shallow": _set(tmp, "shallow", 24, 1.8), "deep": _set(tmp, "deep", 24, 11.0),
            "prompts": str(tmp / "prompts-{000000..000001}.tar"), "dir": tmp}


def _dm(sets, mix=None, **kw) -> MultiStreamDataModule:
    streams = {"prompts": {"train_shards": sets["prompts"], "keys": {"json": "meta"}, "batch_size": 2},
               "shallow": {"train_shards": sets["shallow"], "keys": {"jpg": "image", "json": "exif"}, "batch_size": 3},
               "deep": {"train_shards": sets["deep"], "keys": {"jpg": "image", "json": "exif"}, "val_shards": sets["deep"]}}
    base = {"streams": streams, "mix": mix, "batch_size": 4, "num_workers": 0, "resolution": 16,
            "train_batches_per_epoch": 4, "shuffle_buffer": 8}
    base.update(kw)
    dm = MultiStreamDataModule(**base)
    dm.setup("fit")
    return dm


def _keys(batch) -> dict:
    return {n: list(b["key"]) for n, b in batch.items() if not n.startswith("_")}


def test_batch_structure_and_sizes(sets):
    batches = list(_dm(sets).train_dataloader())
    assert len(batches) == 4
    for b in batches:
        assert set(b) == {"prompts", "shallow", "deep", "_data_health"}
        assert len(b["prompts"]["meta"]) == 2 and b["prompts"]["meta"][0]["prompt"].startswith("prompt ")
        assert b["shallow"]["image"].shape == (3, 3, 16, 16) and b["deep"]["image"].shape == (4, 3, 16, 16)
        assert -1 <= float(b["deep"]["image"].min()) and float(b["deep"]["image"].max()) <= 1
        for name in ("prompts", "shallow", "deep"):
            assert all(k.startswith(name) for k in b[name]["key"]), (name, b[name]["key"])
            assert "_data_health" not in b[name]


def test_streams_are_independent_of_each_other(sets):
    """A stream's batches depend on (seed, name, rank, worker, epoch) only: dropping another stream changes nothing."""
    full = [_keys(b)["shallow"] for b in _dm(sets).train_dataloader()]
    dm = _dm(sets)
    dm2 = MultiStreamDataModule(streams={"shallow": dm.streams["shallow"]}, num_workers=0, train_batches_per_epoch=4)
    assert [_keys(b)["shallow"] for b in dm2.train_dataloader()] == full


def test_workers_and_epochs(sets):
    dm = _dm(sets, num_workers=2)
    loader = dm.train_dataloader()
    e0, e1 = [_keys(b) for b in loader], [_keys(b) for b in loader]
    assert len(e0) == len(e1) == 4 and e0 != e1  # a new epoch draws new batches
    again = _dm(sets, num_workers=2).train_dataloader()
    assert [_keys(b) for b in again] == e0  # deterministic


def test_mix_proportions(sets):
    dm = _dm(sets, mix={"shallow": 0.25, "deep": 0.75}, mix_name="real", train_batches_per_epoch=60)
    assert dm.mix_sources == ["shallow", "deep"]
    batches = list(dm.train_dataloader())
    assert set(batches[0]) == {"prompts", "real", "_data_health"}  # sources are read only through the mix
    src = np.concatenate([b["real"]["source"].numpy() for b in batches])
    assert len(src) == 60 * 4
    frac_deep = float((src == 1).mean())
    assert abs(frac_deep - 0.75) < 0.07, frac_deep  # 240 draws: 3 sigma ≈ 0.084
    assert 0 < (src == 1).sum() < len(src) and any(len(set(b["real"]["source"].tolist())) == 2 for b in batches)
    for b in batches:  # each sample really comes from the set its source says
        for s, exif, key in zip(b["real"]["source"].tolist(), b["real"]["exif"], b["real"]["key"]):
            assert key.startswith(dm.mix_sources[s]) and exif["f_number"] == (1.8 if s == 0 else 11.0)
    only_deep = _dm(sets, mix={"shallow": 0.0, "deep": 1.0}, train_batches_per_epoch=5)
    assert all(b["mix"]["source"].eq(1).all() for b in only_deep.train_dataloader())


def _consume(dm, loader, epoch: int, n: int | None = None) -> list[dict]:
    """Iterate like the trainer: each batch passes on_after_batch_transfer while training."""
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, global_rank=0, world_size=1)
    out = []
    for b in loader:
        dm.on_after_batch_transfer(b, 0)
        out.append(_keys(b))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume(sets, workers):
    """6 batches straight == 3 batches, state_dict, a fresh datamodule resumed from it, 3 batches (epochs of 4)."""
    mix = {"shallow": 0.5, "deep": 0.5}
    dm = _dm(sets, mix=mix, num_workers=workers)
    loader = dm.train_dataloader()
    straight = _consume(dm, loader, 0) + _consume(dm, loader, 1, 2)
    half = _dm(sets, mix=mix, num_workers=workers)
    first = _consume(half, half.train_dataloader(), 0, 3)
    state = half.state_dict()
    assert state == {"epoch": 0, "consumed": 3}
    resumed = _dm(sets, mix=mix, num_workers=workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = _consume(resumed, loader, 0) + _consume(resumed, loader, 1, 2)
    assert len(rest) == 3 and first + rest == straight
    assert resumed.state_dict() == {"epoch": 1, "consumed": 2}


def test_eval_stream_reads_each_sample_once(sets):
    dm = _dm(sets)
    loader = dm.val_dataloader()  # only "deep" has val_shards → one loader
    batches = list(loader)
    assert all(set(b) == {"deep", "_data_health"} for b in batches)
    keys = [k for b in batches for k in b["deep"]["key"]]
    assert sorted(keys) == [f"deep_{i:04d}" for i in range(24)]


def test_missing_shards_name_stream_and_pattern(sets, tmp_path):
    bad = str(tmp_path / "nope-{000000..000003}.tar")
    streams = {"shallow": {"train_shards": sets["shallow"]}, "deep": {"train_shards": bad}}
    with pytest.raises(FileNotFoundError, match=r"data\.streams\.deep\.train_shards.*nope-\{000000\.\.000003\}\.tar"):
        MultiStreamDataModule(streams=streams).setup("fit")


def test_missing_key_names_stream_key_and_file(sets):
    streams = {"deep": {"train_shards": sets["deep"], "keys": {"jpg": "image", "depth.png": "depth"}}}
    with pytest.raises(KeyError, match=r"data\.streams\.deep\.train_shards.*depth\.png.*deep-000000\.tar"):
        MultiStreamDataModule(streams=streams).setup("fit")


def test_config_errors(sets):
    with pytest.raises(ValueError, match=r"data\.streams\.deep: unknown field\(s\) \['shards'\]"):
        MultiStreamDataModule(streams={"deep": {"shards": sets["deep"]}})
    with pytest.raises(ValueError, match=r"data\.streams\.deep: train_shards is not set"):
        MultiStreamDataModule(streams={"deep": {"batch_size": 2}})
    with pytest.raises(ValueError, match=r"data\.mix: unknown stream\(s\) \['shalow'\]"):
        MultiStreamDataModule(streams={"deep": {"train_shards": sets["deep"]}}, mix={"shalow": 1.0})


def test_cli_config_instantiates(sets, monkeypatch):
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    for n in ("prompts", "shallow", "deep"):
        monkeypatch.setenv(f"CTRLGEN_TEST_{n.upper()}", sets[n])
    cli = CtrlgenCLI(args=["-c", "tests/configs/tiny.yaml", "-c", "tests/configs/tiny_multistream.yaml"], run=False)
    dm = cli.datamodule
    assert isinstance(dm, MultiStreamDataModule) and dm.mix_sources == ["shallow", "deep"]
    assert dm.streams["prompts"]["batch_size"] == 2 and dm.streams["deep"]["batch_size"] == 4
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"prompts", "real", "_data_health"} and b["real"]["image"].shape == (4, 3, 16, 16)
