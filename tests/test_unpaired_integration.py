"""The shared pieces the Defocus method combines, together through the CLI: ManualOptimModule (generator + critic, two
optimizers from YAML, generator every 2nd iteration) on a MultiStreamDataModule with two unpaired streams of different
batch sizes (``shallow`` 4, ``deep`` 3) and one eval loader per stream, with the default callbacks (checkpoint on
``val/loss``, data health, RNG state). tests/helpers/tiny_unpaired.py, tests/configs/tiny_unpaired.yaml.

Pins fixes to shared code found by these tests (each named test fails without its fix):
- ``BaseGenModule.validation_step/test_step`` accept ``dataloader_idx`` (Lightning refuses several eval loaders
  otherwise: every test using a fit) and log an overall ``val/loss`` over all loaders, weighted by batch size (the
  checkpoint monitor; Lightning alone only has ``val/loss/dataloader_idx_<i>``): test_logs_per_optimizer_...;
  ``batch_size_of`` looks into nested ``{stream: batch}`` batches for that weighting: test_batch_size_of_nested_...;
- ``ManualOptimModule`` no longer re-logs an optimizer's last loss/lr/grad_norm at iterations where it sits out
  (Lightning repeats on_step values for the rest of the epoch): test_update_logs_only_on_their_turns;
- ``DataHealthCallback`` counts a process once: with ``num_workers: 0`` training and evaluation batches carry the same
  main-process skip counter, which was summed twice: test_corrupt_sample_..._counted[0].
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import data as pl_data

from ctrlgen.callbacks.data_health import DataHealthCallback
from ctrlgen.datamodules.shards import SKIPS, iter_samples, write_shards
from ctrlgen.lightning_modules.cli import CtrlgenCLI
from ctrlgen.lightning_modules.common.recipe import batch_size_of as _batch_size
from tests.conftest import assert_same_state

CONFIG = "tests/configs/tiny_unpaired.yaml"
AMBIGUOUS = "ambiguous collection"


def _env(shards: dict[str, str], deep: str | None = None) -> dict[str, str]:
    d = shards["dir"]
    return {"CTRLGEN_TEST_SHALLOW": f"{d}/train-{{000000..000003}}.tar",  # train samples 0..31
            "CTRLGEN_TEST_DEEP": deep or f"{d}/train-{{000004..000007}}.tar",  # train samples 32..63
            "CTRLGEN_TEST_SHALLOW_VAL": f"{d}/val-000000.tar", "CTRLGEN_TEST_DEEP_VAL": f"{d}/val-000001.tar"}


def _fit(env: dict[str, str], root: Path, *extra: str) -> CtrlgenCLI:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        return CtrlgenCLI(args=["fit", "-c", CONFIG, f"--trainer.default_root_dir={root}", *extra])


def _rows(root: Path) -> list[dict[str, str]]:
    """Logged rows of all runs in ``root`` (a resumed run writes the next CSV version), in order."""
    rows = []
    for path in sorted(root.rglob("metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])  # shapes keys: "<split>_<global index>", 8 samples per shard


@pytest.fixture(scope="module")
def run(shapes_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("unpaired")
    pl_data.warning_cache.clear()  # Lightning warns once per process: make an earlier test's warning not hide ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(_env(shapes_shards), root)
    return cli, root, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------- a real fit
def test_streams_reach_the_module_with_their_own_batch_sizes(run):
    m = run[0].model
    assert m.iteration == 4 and len(m.seen_keys) == 4
    for keys in m.seen_keys:
        assert len(keys["shallow"]) == 4 and len(keys["deep"]) == 3
        assert all(_index(k) < 32 for k in keys["shallow"]) and all(_index(k) >= 32 for k in keys["deep"])
    assert len({k for keys in m.seen_keys for k in keys["deep"]}) > 3  # a stream, not one batch repeated


def test_each_net_updates_on_its_turns_only(run):
    cli = run[0]
    m = cli.model
    assert [(u["iteration"], u["name"]) for u in m.updates] == [
        (0, "generator"), (0, "critic"), (1, "critic"), (2, "generator"), (2, "critic"), (3, "critic")]
    for u in m.updates:  # parameter snapshots before/after each update: only its own net moved, the frozen conv never
        assert u["changed"] == {u["name"]}, u
    assert not any(p.requires_grad for p in m.features.parameters())
    in_opts = {id(p) for o in cli.trainer.optimizers for g in o.param_groups for p in g["params"]}
    assert not in_opts & {id(p) for p in m.features.parameters()}
    assert cli.trainer.global_step == 6  # 2 generator + 4 critic optimizer steps
    assert m.scheduler("generator").last_epoch == 2 and m.scheduler("critic").last_epoch == 4


def test_logs_per_optimizer_loss_lr_and_overall_val_loss(run):
    cli, root, _ = run
    rows = _rows(root)
    for name, n in (("generator", 2), ("critic", 4)):
        for key in ("loss", "lr", "grad_norm"):
            assert sum(bool(r.get(f"train/{name}/{key}")) for r in rows) == n, (name, key)
        assert any(r.get(f"lr-{name}") for r in rows)  # LearningRateMonitor sees both schedulers
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2  # validation after iterations 2 and 4
    for r in val:  # one eval loader per stream; val/loss is the mean over all their samples (batches of 4 and 3)
        real, fake = float(r["val/d_real/dataloader_idx_0"]), float(r["val/d_fake/dataloader_idx_1"])
        assert float(r["val/loss"]) == pytest.approx((4 * real + 3 * fake) / 7, rel=1e-5)
        assert float(r["val/loss/dataloader_idx_0"]) == pytest.approx(real)
    ckpt = cli.trainer.checkpoint_callback
    assert ckpt.monitor == "val/loss" and Path(ckpt.best_model_path).is_file()
    assert float(ckpt.best_model_score) == pytest.approx(min(float(r["val/loss"]) for r in val))
    assert {r["data/skipped"] for r in rows if r.get("data/skipped")} == {"0.0"}


def test_update_logs_only_on_their_turns(run):
    """Lightning re-sends an on_step key's last value at every later step of the epoch; the generator sits out odd
    iterations, so its loss/lr/grad_norm must not appear there (ManualOptimModule._log_updates)."""
    rows = [r for r in _rows(run[1]) if r.get("train/critic/loss")]  # one row per iteration
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    for key in ("loss", "lr", "grad_norm"):
        assert [bool(r.get(f"train/generator/{key}")) for r in rows] == [True, False, True, False], key


def test_no_ambiguous_batch_size_warning(run):
    assert not [w for w in run[2] if AMBIGUOUS in w]


def test_batch_size_of_nested_stream_batches():
    """``_step`` passes an explicit batch size: the first stream's leading size (the only stream of an eval loader).
    Lightning's own inference finds one here only by luck of key order (``key`` strings first, then the image) and
    warns on a two-stream batch of different sizes."""
    eval_batch = {"deep": {"key": ["a", "b", "c"], "image": torch.zeros(3, 3, 4, 4)}, "_data_health": torch.zeros(2)}
    train_batch = {"shallow": {"key": list("abcd"), "image": torch.zeros(4, 3)}, **eval_batch}
    assert _batch_size(eval_batch) == 3 and _batch_size(train_batch) == 4
    pl_data.warning_cache.clear()
    with pytest.warns(UserWarning, match=AMBIGUOUS):
        pl_data.extract_batch_size(train_batch)
    assert _batch_size({"image": torch.zeros(2, 1), "deep": {"image": torch.zeros(3)}}) == 2
    assert _batch_size({"key": ["a"]}) is None


# ---------------------------------------------------------------------------------------------------------- resume
def _adam_states(m, name: str) -> list[dict[str, torch.Tensor]]:
    return list(m.optimizer(name).state_dict()["state"].values())


def test_exact_resume_of_both_streams(shapes_shards, tmp_path):
    """6 iterations straight == 3 + resume (--ckpt_path=last) + 3: both streams' samples, parameters, RNG streams,
    optimizer and scheduler states (crosses a data epoch of 4 batches; validation, which draws generator noise, after
    every iteration).

    Two things of lightning 2.6.6's ModelCheckpoint (configs/base.yaml) that the appended latest-checkpoint callback
    works around: with a monitor, ``save_last`` refreshes last.ckpt only when a top-k checkpoint is saved, i.e. when
    val/loss improved (a GAN's often does not: here last.ckpt stayed at iteration 1), and nothing is saved when
    max_iterations stops the run between validations (val_check_interval 2 and a stop at 3 leave iteration 2)."""
    latest = ("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
              "--trainer.callbacks.filename=latest", "--trainer.callbacks.enable_version_counter=false")
    env, extra = _env(shapes_shards), ("--data.init_args.num_workers=1", "--trainer.val_check_interval=1", *latest)
    straight = _fit(env, tmp_path / "a", "--model.init_args.max_iterations=6", *extra)
    half = _fit(env, tmp_path / "b", "--model.init_args.max_iterations=3", *extra)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ctrlgen_iteration"] == 3 and len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    resumed = _fit(env, tmp_path / "b", "--model.init_args.max_iterations=6", "--ckpt_path=last", *extra)
    a, b = straight.model, resumed.model
    assert b.iteration == a.iteration == 6 and resumed.trainer.global_step == straight.trainer.global_step == 9
    assert half.model.seen_keys + b.seen_keys == a.seen_keys  # the same samples of BOTH streams, in order
    assert [u["name"] for u in b.updates] == ["critic", "generator", "critic", "critic"]  # TTUR phase kept (it 3, 4, 5)
    assert torch.equal(torch.cat(a.seen_noise[3:]), torch.cat(b.seen_noise))  # the per-rank noise stream continued
    sa, sb = a.state_dict(), b.state_dict()
    assert_same_state(sa, sb)
    assert not torch.allclose(half.model.state_dict()["critic.0.weight"], sb["critic.0.weight"])
    for name in ("generator", "critic"):
        sched_a, sched_b = a.scheduler(name), b.scheduler(name)
        assert sched_b.last_epoch == sched_a.last_epoch and sched_b.get_last_lr() == pytest.approx(sched_a.get_last_lr())
        for oa, ob in zip(_adam_states(a, name), _adam_states(b, name), strict=True):
            assert float(oa["step"]) == float(ob["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(oa[k], ob[k], atol=1e-9, rtol=0), (name, k)
    assert resumed.datamodule.state_dict() == straight.datamodule.state_dict() == {"epoch": 1, "consumed": 2}
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    val_a = [float(r["val/loss"]) for r in rows_a if r.get("val/loss")]
    val_b = [float(r["val/loss"]) for r in rows_b if r.get("val/loss")]
    assert len(val_a) == len(val_b) == 6 and val_b == pytest.approx(val_a, abs=1e-6)  # val/loss after every iteration


# ---------------------------------------------------------------------------------------------------------- faults
def _corrupt_copy(src: str, out: Path, bad: int) -> tuple[str, str]:
    samples = [{k: v for k, v in s.items() if k in ("__key__",) or not k.startswith("__")} for s in iter_samples(src)]
    samples[bad]["jpg"] = b"this is not an image"
    (path,) = write_shards(samples, str(out / "deep-bad-%06d.tar"), maxcount=100)
    return path, samples[bad]["__key__"]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_sample_in_one_stream_is_skipped_and_counted(shapes_shards, tmp_path, monkeypatch, workers):
    """One undecodable image in the deep stream's only shard: skipped every time the resampled stream reads it, counted
    once per skip in data/skipped, and training runs all its iterations with full batches of both streams.

    With num_workers 0 training and evaluation batches both carry this process's one skip counter: the logged count
    equals the counter (it was the sum of both, twice the skips, before the DataHealthCallback fix)."""
    path, bad_key = _corrupt_copy(f"{shapes_shards['dir']}/train-000005.tar", tmp_path, bad=2)
    monkeypatch.setattr(SKIPS, "counts", Counter())  # this run's skips only (num_workers 0 reads in this process)
    cli = _fit(_env(shapes_shards, deep=path), tmp_path / "run", "--model.init_args.max_iterations=6",
               f"--data.init_args.num_workers={workers}")
    m = cli.model
    assert m.iteration == 6 and all(len(k["deep"]) == 3 and len(k["shallow"]) == 4 for k in m.seen_keys)
    deep_keys = [k for keys in m.seen_keys for k in keys["deep"]]
    assert bad_key not in deep_keys and len(deep_keys) == 18
    logged = [float(r["data/skipped"]) for r in _rows(tmp_path / "run") if r.get("data/skipped")]
    assert len(logged) == 6 and logged == sorted(logged)
    assert logged[0] >= 1  # the first pass over the shard (shuffle buffer 8) already met the bad sample
    assert logged[-1] >= 2  # 18 good samples from a shard of 7: the stream read the bad one again
    health = next(c for c in cli.trainer.callbacks if isinstance(c, DataHealthCallback))
    assert health.skipped == logged[-1]  # the last validations (eval shards are clean) added nothing
    if workers == 0:  # every skip happened in this process
        assert SKIPS.counts == Counter({"UnidentifiedImageError": int(logged[-1])}), SKIPS.counts
    else:
        assert SKIPS.total == 0  # ... or in the worker, which reported its own count
