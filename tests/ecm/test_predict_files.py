"""``ctrlgen predict`` from condition-map files (issue 18): a folder or glob of PNG/NPY maps with classes from a JSON
file or one default class; bad inputs fail naming the file; the writer says how many images it wrote and skipped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ctrlgen.datamodules.ecm import ECMDataModule
from ctrlgen.datamodules.synth import shapes
from ctrlgen.lightning_modules.ecm.module_var import VARBase

TINY = ["-c", "configs/ecm/demo_ecm.yaml", "--model.init_args.var_preset=tiny",
        "--model.init_args.var_overrides={embed_dim: 32, num_heads: 2, depth: 2}", "--model.init_args.var_weights=null",
        "--model.init_args.vqvae_weights=null", "--data.init_args.train_shards=null", "--data.init_args.val_shards=null",
        "--data.init_args.test_shards=null", "--data.init_args.eval_batch_size=2", "-c", "configs/logger/csv.yaml"]


def _maps(folder: Path, n: int = 3, npy: int = 1) -> list[str]:
    """``n`` canny PNG maps (one 48×40, resized and centre-cropped) and ``npy`` float depth maps in [0, 1]."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(n):
        edges = shapes.canny(shapes.render(0, "test", i, 48 if i == 0 else 32)["image"])
        if i == 0:
            edges = edges[:40]
        Image.fromarray(edges).save(folder / f"edge{i}.png")
        stems.append(f"edge{i}")
    for i in range(npy):
        np.save(folder / f"depth{i}.npy", shapes.render(0, "test", 10 + i, 32)["inv_depth"].astype(np.float32))
        stems.append(f"depth{i}")
    return stems


def _dm(files, **kw) -> ECMDataModule:
    dm = ECMDataModule(predict_files=files, resolution=32, mid_reso=1.0, eval_batch_size=2, num_workers=0, **kw)
    VARBase.check_num_classes(SimpleNamespace(var=SimpleNamespace(num_classes=10)), dm)  # as the module's setup does
    return dm


def test_predict_from_a_folder_of_maps_writes_one_image_per_map_and_says_so(tmp_path, monkeypatch):
    import ctrlgen.callbacks.predictions as predictions
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    said = []
    monkeypatch.setattr(predictions, "rank_zero_info", said.append)
    stems = _maps(tmp_path / "maps")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"edge0": 3, "edge1": 7}))  # the others take predict_class
    args = ["predict", *TINY, f"--data.init_args.predict_files={tmp_path / 'maps'}",
            f"--data.init_args.predict_labels={labels}", "--data.init_args.predict_class=1",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    cli = CtrlgenCLI(args=args)
    out = tmp_path / "run" / "predictions"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(stems)  # one image per map, named by its stem
    assert all(Image.open(p).size == (32, 32) for p in out.glob("*.png"))
    writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PredictionWriter")
    assert (writer.written, writer.skipped) == (4, 0)
    assert said[-1] == f"predict: 4 images written to {out}, 0 skipped (already there)"
    labels_seen = {k: int(v) for k, v in zip(*(lambda b: (b["key"], b["label"]))(
        next(iter(cli.datamodule.predict_dataloader()))))}
    assert labels_seen == {"depth0": 1, "edge0": 3}  # sorted files: depth0.npy, edge0.png in the first batch
    (out / "edge1.png").unlink()
    said.clear()
    CtrlgenCLI(args=args)  # a rerun regenerates only the missing image
    assert said[-1] == f"predict: 1 images written to {out}, 3 skipped (already there; skip_existing: false " \
                       "regenerates them)"


def test_map_files_are_read_at_the_training_resolution(tmp_path):
    _maps(tmp_path / "maps", n=2, npy=1)
    dm = _dm(str(tmp_path / "maps" / "*"), predict_class=0)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [k for b in batches for k in b["key"]] == ["depth0", "edge0", "edge1"]
    cond = batches[0]["cond"]
    assert cond.shape == (2, 3, 32, 32) and float(cond.min()) >= -1 and float(cond.max()) <= 1
    depth = shapes.render(0, "test", 10, 32)["inv_depth"]
    assert np.allclose((cond[0, 0].numpy() + 1) * 127.5, np.round(depth * 255), atol=0.51)  # NPY in [0,1] → 0..255


def test_bad_predict_inputs_fail_naming_the_file(tmp_path):
    _maps(tmp_path / "maps", n=2, npy=0)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "maps" / "photo.jpg")
    with pytest.raises(ValueError, match=r"1 of 3 files are not PNG/NPY condition maps, e\.g\. \['.*photo\.jpg'\].*"
                                         r"JPEG is lossy"):
        _dm(str(tmp_path / "maps"), predict_class=0).setup("predict")
    with pytest.raises(ValueError, match=r"photo\.jpg"):  # a glob that matches a JPEG
        _dm(str(tmp_path / "maps" / "*.jpg"), predict_class=0).setup("predict")
    with pytest.raises(FileNotFoundError, match=r"predict_files: no file matches '.*nothing-\*\.png'"):
        _dm(str(tmp_path / "nothing-*.png"), predict_class=0).setup("predict")
    with pytest.raises(FileNotFoundError, match=r"predict_files: '.*absent\.png' does not exist"):
        _dm(str(tmp_path / "absent.png"), predict_class=0).setup("predict")
    glob = str(tmp_path / "maps" / "*.png")
    with pytest.raises(ValueError, match=r"give each map a class with predict_class .* or predict_labels"):
        _dm(glob).setup("predict")
    for cls, problem in ((10, r"is out of range: num_classes is 10"), ("cat", "is not an int"),
                         (2.0, "is not an int"), (-1, "is negative")):
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({"edge0": 0, "edge1": cls}))
        dm = _dm(glob, predict_labels=str(labels))
        dm.setup("predict")
        with pytest.raises(ValueError, match=rf"edge1\.png: class .* \(from data\.init_args\.predict_labels "
                                             rf"'.*labels\.json'\) {problem}"):
            dm.predict_dataloader()
    labels.write_text(json.dumps({"edge0": 0}))
    with pytest.raises(ValueError, match=r"has no class for 1 of 2 maps, e\.g\. \['.*edge1\.png'\]"):
        _dm(glob, predict_labels=str(labels)).setup("predict")
    dm = _dm(glob, predict_class=10)
    dm.setup("predict")
    with pytest.raises(ValueError, match=r"edge0\.png: class 10 \(from data\.init_args\.predict_class\) is out of"):
        dm.predict_dataloader()
    np.save(tmp_path / "maps" / "edge0.npy", np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match=r"several files share one: \['.*edge0\.npy', '.*edge0\.png'\]"):
        _dm(str(tmp_path / "maps" / "edge*"), predict_class=0).setup("predict")


def test_predict_needs_shards_or_files_and_a_jpeg_shard_fails(tmp_path):
    with pytest.raises(ValueError, match=r"ctrlgen predict needs data\.init_args\.predict_shards .* or "
                                         r"data\.init_args\.predict_files"):
        ECMDataModule(resolution=32).setup("predict")
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpg)
    with pytest.raises(ValueError, match=r"data\.predict_shards: nothing decodable .*photo\.jpg.*not a readable tar"):
        ECMDataModule(predict_shards=str(jpg), resolution=32).setup("predict")
    with pytest.raises(ValueError, match=r"give predict_shards or predict_files, not both"):
        ECMDataModule(predict_shards=str(jpg), predict_files=str(jpg), resolution=32).setup("predict")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    dm = _dm(str(bad), predict_class=0)
    dm.setup("predict")
    with pytest.raises(ValueError, match=r"bad\.png: cannot read the condition map"):
        next(iter(dm.predict_dataloader()))
