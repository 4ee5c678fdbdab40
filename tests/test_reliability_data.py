"""Fault injection for data and weights (issue 18): labels out of range, sample faults naming key and shard, the skip
total at the end of a run, test results stating their sample count, and every way a weights file can be bad."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ctrlgen.datamodules.base import FatalSampleError
from ctrlgen.datamodules.ecm import ECMDataModule
from ctrlgen.datamodules.shards import SKIPS, encode_png, write_shards
from ctrlgen.datamodules.synth import shapes
from ctrlgen.lightning_modules.ecm.checkpoint import load_state_dict_strict, read_state_dict_file
from ctrlgen.lightning_modules.ecm.module_var import VARBase


@pytest.fixture
def fresh_skips(monkeypatch):
    """This test's skips only: the counter is per process."""
    monkeypatch.setattr(SKIPS, "counts", Counter())
    monkeypatch.setattr(SKIPS, "examples", {})
    monkeypatch.setattr(SKIPS, "warned", set())
    return SKIPS


def _shard(tmp_path: Path, name: str, edit=None, n: int = 8) -> str:
    samples = list(shapes.samples(0, "train", n, 32))
    if edit is not None:
        edit(samples)
    write_shards(samples, str(tmp_path / f"{name}-%06d.tar"), maxcount=100)
    return str(tmp_path / f"{name}-000000.tar")


def _val_keys(dm: ECMDataModule) -> list[str]:
    dm.setup("validate")
    return [k for b in dm.val_dataloader() for k in b["key"]]


def _dm(shard: str, **kw) -> ECMDataModule:
    return ECMDataModule(val_shards=shard, resolution=32, mid_reso=1.0, batch_size=4, num_workers=0, **kw)


def _bad_labels(samples):
    samples[2]["cls"] = 12  # >= num_classes (10)
    samples[3]["cls"] = b"cat"  # not an int
    samples[4]["cls"] = -1
    samples[5]["cls"] = 10  # == num_classes: the unconditional class row, not a label


# ---------------------------------------------------------------------------------------------------------- labels
def test_label_out_of_range_is_skipped_and_counted_with_key_and_shard(tmp_path, fresh_skips):
    shard = _shard(tmp_path, "lab", _bad_labels)
    with pytest.warns(UserWarning, match=r"key 'cls' of sample 'train_0000002' in '.*lab-000000\.tar' is 12, out of "
                                         r"range: num_classes is 10"):
        keys = _val_keys(_dm(shard, num_classes=10))
    assert keys == [f"train_{i:07d}" for i in (0, 1, 6, 7)]  # exactly the good ones: nothing else lost
    assert fresh_skips.counts == {"LabelError": 4}
    assert fresh_skips.examples["LabelError"][0] == f"train_0000002 @ {shard}"
    summary = fresh_skips.summary()
    assert "4 samples skipped: LabelError ×4 (e.g. train_0000002 @ " in summary and "train_0000003 @ " in summary


def test_strict_labels_stops_the_run_naming_the_sample(tmp_path, fresh_skips):
    shard = _shard(tmp_path, "lab", _bad_labels)
    dm = _dm(shard, num_classes=10, strict_labels=True)
    dm.setup("validate")
    with pytest.raises(FatalSampleError, match=r"sample 'train_0000002' in '.*lab-000000\.tar' is 12, out of range.*"
                                               r"strict_labels: true"):
        list(dm.val_dataloader())


def test_datamodule_learns_num_classes_from_the_model_or_fails_on_a_mismatch(tmp_path):
    model = SimpleNamespace(var=SimpleNamespace(num_classes=10))
    dm = _dm(_shard(tmp_path, "ok"))
    assert dm.num_classes is None
    VARBase.check_num_classes(model, dm)
    assert dm.num_classes == 10
    with pytest.raises(ValueError, match=r"data\.init_args\.num_classes 5 differs from the VAR's num_classes 10"):
        VARBase.check_num_classes(model, _dm(_shard(tmp_path, "ok"), num_classes=5))


def test_fit_with_out_of_range_labels_counts_them_and_prints_the_total(tmp_path, fresh_skips, monkeypatch):
    """A VAR run whose shards hold labels >= the model's num_classes trains (no IndexError), skips and counts them, and
    says so in one line at the end of fit, naming reason, key and shard."""
    import ctrlgen.callbacks.data_health as health
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    said = []
    monkeypatch.setattr(health, "rank_zero_info", said.append)

    def edit(samples):
        for s in samples[::2]:
            s["cls"] = 500  # the tiny VAR has 10 classes; its class embedding has 11 rows
    shard = _shard(tmp_path, "lab", edit)
    cli = CtrlgenCLI(args=["fit", "-c", "configs/ecm/demo_var.yaml", "--model.init_args.var_preset=tiny",
                           "--model.init_args.var_overrides={embed_dim: 32, num_heads: 2, depth: 1}",
                           "--model.init_args.vqvae_weights=null", f"--data.init_args.train_shards={shard}",
                           "--data.init_args.val_shards=null", "--data.init_args.test_shards=null",
                           "--data.init_args.batch_size=2", "--trainer.max_steps=2",
                           "--data.init_args.train_batches_per_epoch=2", "--trainer.val_check_interval=null",
                           "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path / 'run'}",
                           "-c", "configs/logger/csv.yaml"])
    assert cli.trainer.global_step == 2 and cli.datamodule.num_classes == 10
    assert fresh_skips.counts["LabelError"] >= 1
    line = [s for s in said if s.startswith("data (fit)")]
    assert len(line) == 1 and "samples skipped" in line[0] and "LabelError ×" in line[0], said
    assert "@ " + shard in line[0]


# -------------------------------------------------------------------------------------------- faults name the key
def test_condition_of_another_size_names_key_sample_and_shard(tmp_path, fresh_skips):
    def edit(samples):
        samples[1]["canny.png"] = encode_png(np.zeros((16, 16), np.uint8))
        samples[3]["canny.png"] = b"not a png"
    shard = _shard(tmp_path, "shape", edit)
    with pytest.warns(UserWarning) as rec:
        keys = _val_keys(_dm(shard))
    assert len(keys) == 6 and "train_0000001" not in keys and "train_0000003" not in keys
    text = "\n".join(str(w.message) for w in rec)
    assert f"key 'canny.png' of sample 'train_0000001' in '{shard}' has shape (16, 16) but its image 'jpg' is " \
           "(32, 32)" in text
    assert f"key 'canny.png' of sample 'train_0000003' in '{shard}' does not decode" in text
    assert fresh_skips.total == 2


def test_grey_png_images_decode_as_rgb_with_canny_on_the_fly(tmp_path, fresh_skips):
    """A grey PNG image (where the edge extractor used to fail with "expected an (H,W,3) ... got (32, 32)", naming no
    key) is read as RGB like a grey JPEG: every sample is kept."""
    def edit(samples):
        for s in samples:
            img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(s.pop("jpg"))).convert("L"))
            s["png"] = encode_png(img)
    shard = _shard(tmp_path, "grey", edit, n=4)
    dm = _dm(shard, image_key="png", canny_on_the_fly=True)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["cond"].shape == (4, 3, 32, 32)
    assert fresh_skips.total == 0


# ------------------------------------------------------------------------------------------------- test results
def test_test_results_state_how_many_samples_they_cover(tmp_path, shapes_shards, monkeypatch):
    import ctrlgen.callbacks.results as results
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    said = []
    monkeypatch.setattr(results, "rank_zero_info", said.append)
    root = tmp_path / "run"
    CtrlgenCLI(args=["test", "-c", "tests/configs/tiny.yaml", f"--data.init_args.test_shards={shapes_shards['test']}",
                     "--data.init_args.eval_batch_size=4", f"--trainer.default_root_dir={root}"])
    md = (root / "results.md").read_text()
    assert md.startswith("# TinyAEModule test results on 16 test samples"), md[:200]  # 2 shards × 8
    assert any("over 16 test samples" in s for s in said), said


# ------------------------------------------------------------------------------------------------------ weights
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


class NotAStateDict:  # a pickled Python object: a safe (weights_only) load refuses it
    def __init__(self):
        self.sd = Tiny().state_dict()


def _good(tmp_path: Path) -> Path:
    p = tmp_path / "good.pth"
    torch.save(Tiny().state_dict(), p)
    return p


def _no_torch_advice(msg: str) -> None:
    assert "Re-running" not in msg and "WeightsUnpickler" not in msg and "Traceback" not in msg, msg


def test_weights_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file '.*nope\.pth' does not exist"):
        load_state_dict_strict(Tiny(), tmp_path / "nope.pth")
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match=r"weights file '.*weights' is a directory; give the weights file itself"):
        load_state_dict_strict(Tiny(), tmp_path / "weights")
    from ctrlgen.lightning_modules.ecm.bases import load_weights

    with pytest.raises(ValueError, match=r"'.*weights' is a directory"):  # the VAR/VQVAE path says the same
        load_weights(Tiny(), tmp_path / "weights", "var.")


@pytest.mark.parametrize("fault", ["truncated_zip", "garbage", "empty", "truncated_safetensors", "legacy_truncated"])
def test_unreadable_weights_name_the_file_and_the_fault(tmp_path, fault):
    good = _good(tmp_path)
    data = good.read_bytes()
    if fault == "truncated_zip":
        assert zipfile.is_zipfile(good)
        bad, what = tmp_path / "cut.pth", r"truncated or corrupt PyTorch \(zip\) file"
        bad.write_bytes(data[: len(data) // 2])
    elif fault == "garbage":
        bad, what = tmp_path / "garbage.pth", "not a PyTorch or safetensors weights file"
        bad.write_bytes(b"<html>404 not found</html>" * 20)
    elif fault == "empty":
        bad, what = tmp_path / "empty.pth", r"is empty \(0 bytes\)"
        bad.write_bytes(b"")
    elif fault == "truncated_safetensors":
        from safetensors.torch import save_file

        bad, what = tmp_path / "cut.safetensors", "truncated or corrupt .safetensors file"
        save_file(Tiny().state_dict(), str(bad))
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        legacy = tmp_path / "legacy.pth"
        torch.save(Tiny().state_dict(), legacy, _use_new_zipfile_serialization=False)
        bad, what = tmp_path / "legacy_cut.pth", "cannot be read"
        bad.write_bytes(legacy.read_bytes()[:-20])
    with pytest.raises(ValueError, match=rf"weights file '{bad}' .*{what}") as e:
        load_state_dict_strict(Tiny(), bad)
    _no_torch_advice(str(e.value))
    assert load_state_dict_strict(Tiny(), good)["num_tensors"] == 2  # the intact file still loads


def test_pickled_objects_are_not_a_plain_state_dict_and_the_message_says_how_to_convert(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"model": NotAStateDict()}, bad)
    with pytest.raises(ValueError, match=rf"weights file '{bad}' is not a plain state dict: it pickles Python objects "
                                         r"\(it needs tests\.test_reliability_data\.NotAStateDict\)") as e:
        read_state_dict_file(bad)
    msg = str(e.value)
    _no_torch_advice(msg)
    assert "convert it once" in msg and "torch.save(" in msg
    assert pickle.loads(pickle.dumps(NotAStateDict())).sd  # the object itself is fine: only the format is refused


def test_a_file_without_a_state_dict_and_a_wrong_model_name_the_file(tmp_path):
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(ValueError, match=rf"weights file '{lst}': checkpoint does not hold a state dict \(got list\)"):
        load_state_dict_strict(Tiny(), lst)
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 5).state_dict(), other)
    with pytest.raises(ValueError, match=rf"state dict in {other} .* does not match[\s\S]*weight: expected \(2, 3\), "
                                         r"found \(5, 3\)"):
        load_state_dict_strict(_Lin(), other)


class _Lin(nn.Module):  # same key names as nn.Linear(3, 2)
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 3))
        self.bias = nn.Parameter(torch.zeros(2))


class TinyLocal(nn.Module):
    """A stand-in for a transformers/diffusers class: ``from_pretrained`` reads ``model.safetensors`` of a folder."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        from safetensors.torch import load_file

        m = cls()
        m.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return m


def test_pretrained_directory_faults_name_the_directory(tmp_path):
    from safetensors.torch import save_file

    from ctrlgen.lightning_modules.common.pretrained import load_frozen

    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file(TinyLocal().state_dict(), str(d / "model.safetensors"))
    assert isinstance(load_frozen(TinyLocal, d), TinyLocal)
    with pytest.raises(NotADirectoryError, match=r"path '.*model\.safetensors' is a file, but a save_pretrained "
                                                 r"directory is expected: give the folder that holds config\.json"):
        load_frozen(TinyLocal, d / "model.safetensors")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:30])
    with pytest.raises(OSError, match=rf"directory '{d}' could not be loaded by TinyLocal\.from_pretrained .*"
                                      r"truncated, garbage or of another model"):
        load_frozen(TinyLocal, d)

